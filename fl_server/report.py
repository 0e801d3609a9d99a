"""`fl-report OUT_DIR`: a run's metrics.jsonl as pictures and a summary.

Writes into OUT_DIR: `accuracy.png` and `loss.png` (per round, on the server's held-out data),
`participation.png` (which client contributed to which round), `report.md`, and `report_data.json`,
the exact numbers behind the plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fl_server.checkpoint import METRICS
from fl_server.records import RoundRecord, read_jsonl


class ReportError(ValueError):
    pass


def read_metrics(out: Path) -> list[RoundRecord]:
    path = out / METRICS
    if not path.is_file():
        raise ReportError(f"{path} does not exist; point fl-report at a server's --out folder")
    try:
        records = read_jsonl(path)
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not JSON lines ({e})") from None
    except (ValueError, TypeError) as e:
        raise ReportError(f"{path} is not a metrics log ({e})") from None
    if not records:
        raise ReportError(f"{path} holds no rounds yet")
    return records


def report_data(records: list[RoundRecord]) -> dict[str, Any]:
    # Evaluated rounds; an autoencoder's have a loss (its reconstruction error) and no accuracy.
    done = [r for r in records if r.evaluated]
    clients = sorted({c for r in records for c in r.selected}, key=lambda c: (len(c), c))
    return {
        "rounds": [r.round for r in done],
        "accuracy": [r.accuracy for r in done],
        "loss": [r.loss for r in done],
        "clients": clients,
        # participation[i][j]: 1 if clients[i] contributed to rounds[j], 0.5 if selected but dropped, else 0
        "participation": [[1.0 if c in r.clients else 0.5 if c in r.dropped else 0.0 for r in done]
                          for c in clients],
    }


def write_report(out: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    records = read_metrics(out)
    data = report_data(records)
    written = []

    def line_plot(name: str, ylabel: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(data["rounds"], data[name], marker="o")
        ax.set(xlabel="round", ylabel=ylabel, title=f"global model {ylabel} per round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
        written.append(out / f"{name}.png")

    if has_accuracy(data):
        line_plot("accuracy", "accuracy")
    line_plot("loss", "loss")
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(data["clients"]) + 1)), dpi=100)
    if data["participation"] and data["rounds"]:
        ax.imshow(data["participation"], aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest",
                  extent=(data["rounds"][0] - 0.5, data["rounds"][-1] + 0.5, len(data["clients"]) - 0.5, -0.5))
    ax.set_yticks(range(len(data["clients"])), data["clients"])
    ax.set(xlabel="round", ylabel="client", title="participation (dark: contributed, light: dropped)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(out / "participation.png")
    plt.close(fig)
    written.append(out / "participation.png")

    (out / "report_data.json").write_text(json.dumps(data, indent=1) + "\n")
    written.append(out / "report_data.json")
    (out / "report.md").write_text(summary(records, data))
    written.append(out / "report.md")
    return written


def has_accuracy(data: dict[str, Any]) -> bool:
    """False for an autoencoder's run, whose rounds have a reconstruction error and no accuracy."""
    return any(a is not None for a in data["accuracy"])


def summary(records: list[RoundRecord], data: dict[str, Any]) -> str:
    done = [r for r in records if r.aggregated]
    reruns = len(records) - len(done)
    lines = ["# Run report", ""]
    if data["accuracy"] and not has_accuracy(data):  # an autoencoder: reconstruction error only
        lines += [f"- rounds aggregated: {len(done)} (re-run for lack of updates: {reruns})",
                  f"- final reconstruction error (MSE): {data['loss'][-1]:.4f} after round {data['rounds'][-1]}",
                  f"- best: {min(data['loss']):.4f}", ""]
    elif data["accuracy"]:
        best = max(range(len(data["accuracy"])), key=data["accuracy"].__getitem__)
        lines += [f"- rounds aggregated: {len(done)} (re-run for lack of updates: {reruns})",
                  f"- final accuracy: {data['accuracy'][-1]:.4f} (loss {data['loss'][-1]:.4f}) after round "
                  f"{data['rounds'][-1]}",
                  f"- best accuracy: {data['accuracy'][best]:.4f} in round {data['rounds'][best]}",
                  f"- time in rounds: {sum(r.seconds for r in done):.1f} s; update bytes received: "
                  f"{sum(r.bytes_in for r in done) / 1e6:.1f} MB",
                  f"- clients: {len(data['clients'])}; dropped selections: {sum(len(r.dropped) for r in records)}", ""]
    plots = "![accuracy](accuracy.png) ![loss](loss.png)" if has_accuracy(data) else "![loss](loss.png)"
    lines += [plots, "", "![participation](participation.png)", "",
              "| round | accuracy | loss | clients | seconds |", "|---|---|---|---|---|"]
    for r in done:
        accuracy = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
        loss = "-" if r.loss is None else f"{r.loss:.4f}"
        lines.append(f"| {r.round} | {accuracy} | {loss} | {', '.join(r.clients)} | {r.seconds:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-report", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the server's --out folder (holding metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.out)
    except ReportError as e:
        print(f"fl-report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fl-report: error: cannot write into {args.out} ({e.strerror})", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
