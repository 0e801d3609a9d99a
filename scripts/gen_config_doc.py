"""Write docs/config.md from the Config dataclass, so the reference cannot drift from the code.

    python scripts/gen_config_doc.py [--check]
"""
import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import ALIASES, Config  # noqa: E402

TARGET = ROOT / "docs" / "config.md"


def render() -> str:
    seed_names = {v: k for k, v in ALIASES.items()}
    lines = [
        "# Configuration reference",
        "",
        "Generated from `common/config.py` by `python scripts/gen_config_doc.py`; a test fails when it is stale.",
        "",
        "`fl-server --config FILE` reads TOML (`.toml`) or JSON (`.json`); every key is also a flag",
        "(`clients_per_round` is `--clients-per-round`), and flags override the file. The seed's `conf.json`",
        "keys are accepted as aliases (right column). Unknown keys and bad values stop the server with a",
        "message naming the key. Clients need no config: the server sends them what they need each round.",
        "",
        "| key | default | seed's name | meaning |",
        "|---|---|---|---|",
    ]
    for f in dataclasses.fields(Config):
        alias = f"`{seed_names[f.name]}`" if f.name in seed_names else ""
        lines.append(f"| `{f.name}` | `{f.default!r}` | {alias} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is stale")
    text = render()
    if parser.parse_args().check:
        sys.exit(0 if TARGET.read_text() == text else 1)
    TARGET.parent.mkdir(exist_ok=True)
    TARGET.write_text(text)
