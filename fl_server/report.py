"""`fl-report OUT_DIR`: a run's metrics.jsonl as pictures and a summary.

Writes into OUT_DIR: `accuracy.png` and `loss.png` (per round, the server's evaluation: its held-out data
or the operator's server_evaluation; left out when the server evaluated nothing), `server_metrics.png`
(the server_evaluation's other metrics), `federated.png` (the clients' evaluation on data they hold out,
with eval_fraction), `client_metrics.png` (each metric clients report, its per-round mean over them),
`participation.png` (which client contributed to which round), `report.md`, and `report_data.json`, the
exact numbers behind the plots. Each plot is left out when the run has nothing to put in it.
"""
from __future__ import annotations

import argparse
import json
import math
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


MAX_PLOTTED_METRICS = 12  # client metrics plotted (in name order); report_data.json holds them all


def report_data(records: list[RoundRecord]) -> dict[str, Any]:
    # Rounds the server evaluated; an autoencoder's have a loss (its reconstruction error) and no accuracy.
    evaluated = [r for r in records if r.evaluated]
    aggregated = [r for r in records if r.aggregated]
    clients = sorted({c for r in records for c in r.selected}, key=lambda c: (len(c), c))
    federated = [(r.round, r.federated_evaluation) for r in aggregated if r.federated_evaluation]
    return {
        "rounds": [r.round for r in evaluated],
        "accuracy": [r.accuracy for r in evaluated],
        "loss": [r.loss for r in evaluated],
        "server_metrics": series({r.round: r.server_metrics for r in evaluated}),
        # The clients' evaluation, reported with round r, is of model version r - 1 (the one they received).
        "federated": {"rounds": [round_ for round_, _ in federated],
                      "model_version": [e["model_version"] for _, e in federated],
                      "loss": [e["loss"] for _, e in federated],
                      "accuracy": [e.get("accuracy") for _, e in federated]},
        "client_metrics": series({r.round: client_means(r.client_metrics) for r in aggregated}),
        "clients": clients,
        "participation_rounds": [r.round for r in aggregated],
        # participation[i][j]: 1 if clients[i] contributed to participation_rounds[j], 0.5 if selected but
        # dropped, else 0
        "participation": [[1.0 if c in r.clients else 0.5 if c in r.dropped else 0.0 for r in aggregated]
                          for c in clients],
    }


def client_means(client_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the clients that reported it: eval_* metrics weighted by the client's
    eval_samples when it reported them (a mean over the samples held out), others with equal weights."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in client_metrics.values():
        samples = metrics.get("eval_samples")
        for name, value in metrics.items():
            weight = samples if name.startswith("eval_") and name != "eval_samples" and samples else 1.0
            if not (_finite(value) and _finite(weight) and weight > 0):
                continue
            sums[name] = sums.get(name, 0.0) + weight * value
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sorted(sums) if math.isfinite(sums[name] / weights[name])}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def series(per_round: dict[int, dict[str, float]]) -> dict[str, dict[str, list]]:
    """{round: {name: value}} as {name: {"rounds": [...], "values": [...]}}, names in order."""
    out: dict[str, dict[str, list]] = {}
    for round_, values in per_round.items():
        for name, value in values.items():
            entry = out.setdefault(name, {"rounds": [], "values": []})
            entry["rounds"].append(round_)
            entry["values"].append(value)
    return dict(sorted(out.items()))


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

    def grid_plot(name: str, panels: dict[str, tuple[list, list]], title: str) -> None:
        """One small plot per panel (its x and y values), three to a row."""
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), dpi=100, squeeze=False)
        for ax, (label, (x, y)) in zip(axes.flat, panels.items()):
            ax.plot(x, y, marker="o")
            ax.set(xlabel="round", title=label)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png")
        plt.close(fig)
        written.append(out / f"{name}.png")

    if plotted("accuracy", data):
        line_plot("accuracy", "accuracy")
    if plotted("loss", data):
        line_plot("loss", "loss")
    federated = data["federated"]
    if plotted("federated", data):
        panels = {"loss": (federated["rounds"], federated["loss"])}
        if all(a is not None for a in federated["accuracy"]):
            panels = {"accuracy": (federated["rounds"], federated["accuracy"]), **panels}
        grid_plot("federated", panels, "clients' evaluation of the model they received (held-out data)")
    if plotted("server_metrics", data):
        grid_plot("server_metrics", {name: (m["rounds"], m["values"]) for name, m in own_metrics(data).items()},
                  "the server's evaluation (server_evaluation), per round")
    if plotted("client_metrics", data):
        shown = dict(list(data["client_metrics"].items())[:MAX_PLOTTED_METRICS])
        grid_plot("client_metrics", {name: (m["rounds"], m["values"]) for name, m in shown.items()},
                  "clients' metrics, mean per round (eval_*: weighted by eval_samples)")
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(data["clients"]) + 1)), dpi=100)
    rounds = data["participation_rounds"]
    if data["participation"] and rounds:
        ax.imshow(data["participation"], aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest",
                  extent=(rounds[0] - 0.5, rounds[-1] + 0.5, len(data["clients"]) - 0.5, -0.5))
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
    lines = ["# Run report", "", f"- rounds aggregated: {len(done)} (re-run for lack of updates: {reruns})"]
    losses = [loss for loss in data["loss"] if loss is not None]
    if data["rounds"] and has_accuracy(data) and data["accuracy"][-1] is not None and data["loss"][-1] is not None:
        accuracies = [(a, r) for a, r in zip(data["accuracy"], data["rounds"]) if a is not None]
        best, best_round = max(accuracies, key=lambda pair: pair[0])  # the first round of the best
        lines += [f"- final accuracy: {data['accuracy'][-1]:.4f} (loss {data['loss'][-1]:.4f}) after round "
                  f"{data['rounds'][-1]}",
                  f"- best accuracy: {best:.4f} in round {best_round}"]
    elif data["rounds"] and not data["server_metrics"] and losses:  # an autoencoder: reconstruction error only
        lines += [f"- final reconstruction error (MSE): {data['loss'][-1]:.4f} after round {data['rounds'][-1]}",
                  f"- best: {min(losses):.4f}"]
    elif data["rounds"]:  # the operator's evaluation, whatever it measures
        lines.append(f"- final server evaluation: {records_by_round(records)[data['rounds'][-1]].quality()} "
                     f"after round {data['rounds'][-1]}")
    else:
        lines.append("- the server evaluated no model (no data set, no server_evaluation)")
    federated = data["federated"]
    if federated["rounds"]:
        accuracy = federated["accuracy"][-1]
        lines.append(f"- clients' final evaluation (of model version {federated['model_version'][-1]}, on data "
                     f"they hold out): {'' if accuracy is None else f'accuracy {accuracy:.4f}, '}loss "
                     f"{federated['loss'][-1]:.4f}")
    lines += [f"- time in rounds: {sum(r.seconds for r in done):.1f} s; update bytes received: "
              f"{sum(r.bytes_in for r in done) / 1e6:.1f} MB",
              f"- clients: {len(data['clients'])}; dropped selections: {sum(len(r.dropped) for r in records)}", ""]
    names = list(data["client_metrics"])
    if names:
        left_out = names[MAX_PLOTTED_METRICS:]
        lines += [f"- metrics clients reported (per-round means in client_metrics.png; eval_* weighted by "
                  f"eval_samples): {', '.join(names[:MAX_PLOTTED_METRICS])}"
                  + (f" (not plotted: {', '.join(left_out)}; all are in report_data.json)" if left_out else ""), ""]
    plots = [f"![{name}]({name}.png)" for name in ("accuracy", "loss", "server_metrics", "federated",
                                                   "client_metrics") if plotted(name, data)]
    if plots:
        lines += [" ".join(plots), ""]
    lines += ["![participation](participation.png)", "",
              "| round | accuracy | loss | clients' accuracy | clients' loss | clients | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in done:
        evaluation = r.federated_evaluation or {}
        lines.append(f"| {r.round} | {number(r.accuracy)} | {number(r.loss)} | {number(evaluation.get('accuracy'))} "
                     f"| {number(evaluation.get('loss'))} | {', '.join(r.clients)} | {r.seconds:.2f} |")
    return "\n".join(lines) + "\n"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def records_by_round(records: list[RoundRecord]) -> dict[int, RoundRecord]:
    return {r.round: r for r in records if r.aggregated}


def plotted(name: str, data: dict[str, Any]) -> bool:
    """Whether write_report draws `name`.png for this data."""
    return {"accuracy": has_accuracy(data), "loss": any(loss is not None for loss in data["loss"]),
            "federated": bool(data["federated"]["rounds"]), "server_metrics": bool(own_metrics(data)),
            "client_metrics": bool(data["client_metrics"])}[name]


def own_metrics(data: dict[str, Any]) -> dict[str, Any]:
    """The server_evaluation's metrics other than accuracy and loss (which accuracy.png and loss.png show),
    as many as are plotted."""
    names = [n for n in data["server_metrics"] if n not in ("accuracy", "loss")][:MAX_PLOTTED_METRICS]
    return {name: data["server_metrics"][name] for name in names}


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
