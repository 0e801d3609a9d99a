"""Write docs/config.md from the settings' declarations, so the reference cannot drift from the code.

    python scripts/gen_config_doc.py [--check]
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fl_server.config import SETTINGS, sent_to_clients  # noqa: E402

TARGET = ROOT / "docs" / "config.md"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the declarations in `fl_server/config.py` and `common/messages.py` (the settings clients",
        "receive) by `python scripts/gen_config_doc.py`; a test fails when it is stale.",
        "",
        "`fl-server --config FILE` reads TOML (`.toml`) or JSON (`.json`); every key is also a flag",
        "(`clients_per_round` is `--clients-per-round`), and flags override the file. The seed's `conf.json`",
        "keys are accepted as aliases (third column). Unknown keys and bad values stop the server with a",
        "message naming the key. Clients need no config: the server sends them what they need each round",
        "(the keys marked \"sent to clients\", and the model `model_name` makes). A checkpoint is resumed only",
        "with the values it was made with of the keys marked \"fixed on resume\" (or with --allow-config-change).",
        "",
        "| key | default | seed's name | sent to clients | fixed on resume | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for d in SETTINGS.values():
        alias = f"`{d.setting.alias}`" if d.setting.alias else ""
        sent = "yes" if sent_to_clients(d.name) else ""
        fixed = "yes" if d.setting.defines_run else ""
        lines.append(f"| `{d.name}` | `{d.default!r}` | {alias} | {sent} | {fixed} | {d.setting.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is stale")
    text = render()
    if parser.parse_args().check:
        sys.exit(0 if TARGET.read_text() == text else 1)
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
