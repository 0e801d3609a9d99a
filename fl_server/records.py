"""One round of a run, as a line of metrics.jsonl: written by the coordinator, read by the monitoring
endpoint, fl-report, the benchmark and a resumed server.

`to_dict()` is the line's JSON object, key for key what README.md describes; `from_dict()` reads lines
of older versions too, which lack keys added since.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_server.rounds import RoundOutcome

MAX_SHOWN_METRICS = 6  # of an operator's evaluation, in a round's line


@dataclass
class RoundRecord:
    """A round re-run for lack of updates has `aggregated` False, no accuracy, and another record after it.
    `accuracy` and `loss` are None until the evaluation, which runs beside the next round, is done; an
    autoencoder's rounds have a loss (its reconstruction error) and never an accuracy. A server without a
    data set or server_evaluation never evaluates: its records are complete without them.
    `server_metrics`: all that the operator's server_evaluation returned (left out of the JSON when empty)."""

    round: int
    aggregated: bool = True
    accuracy: float | None = None
    loss: float | None = None
    server_metrics: dict[str, float] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)  # those that contributed
    num_samples: int = 0
    bytes_in: int = 0  # payload bytes of the counted updates
    seconds: float = 0.0
    aggregate_seconds: float = 0.0
    selected: list[str] = field(default_factory=list)
    population: int = 0  # live clients the sample was drawn from
    dropped: list[str] = field(default_factory=list)
    drop_reasons: dict[str, str] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    federated_evaluation: dict[str, Any] | None = None
    opened_at: float = 0.0
    closed_at: float = 0.0
    time: float = 0.0
    # Differential privacy only (left out of the JSON otherwise): the epsilon spent so far, at `delta`.
    epsilon: float | None = None
    delta: float | None = None

    @classmethod
    def of(cls, outcome: RoundOutcome) -> RoundRecord:
        return cls(round=outcome.round, aggregated=outcome.aggregated, clients=outcome.contributors,
                   num_samples=outcome.num_samples, bytes_in=outcome.bytes_in, seconds=round(outcome.seconds, 4),
                   aggregate_seconds=round(outcome.aggregate_seconds, 4), selected=outcome.selected,
                   population=outcome.population, dropped=outcome.dropped, drop_reasons=outcome.drop_reasons,
                   client_metrics=outcome.client_metrics,
                   federated_evaluation=federated_evaluation(outcome.client_metrics, outcome.round - 1),
                   opened_at=outcome.opened_at, closed_at=outcome.closed_at, time=time.time())

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("epsilon", "delta", "server_metrics"):
            if out[key] is None or out[key] == {}:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> RoundRecord:
        if not isinstance(data, dict):
            raise TypeError(f"a round record is a JSON object, not {str(data)[:80]}")
        if not isinstance(data.get("round"), int):
            raise TypeError(f"a round record without a round number: {str(data)[:80]}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # Records older than `selected` named only the contributors.
        values.setdefault("selected", list(values.get("clients", [])))
        return cls(**values)

    def copy(self) -> RoundRecord:
        """A copy whose accuracy and loss stay as they are when the evaluation fills in the original's."""
        return dataclasses.replace(self)

    @property
    def evaluated(self) -> bool:
        """An aggregated round whose model the server has evaluated (loss: an autoencoder has no accuracy;
        server_metrics: an operator's evaluation may return neither)."""
        return self.aggregated and (self.loss is not None or bool(self.server_metrics))

    def quality(self) -> str:
        """How good the round's model is, in words: the server's test result (its data set's, or the
        operator's evaluation), else the clients' federated evaluation of the model they trained from (the
        previous version: this round's is known only in the next round), else "no test result"."""
        if self.server_metrics:
            first = [k for k in ("accuracy", "loss") if k in self.server_metrics]
            names = first + sorted(k for k in self.server_metrics if k not in first)
            shown = ", ".join(f"{k} {self.server_metrics[k]:.4g}" for k in names[:MAX_SHOWN_METRICS])
            return shown + (f" (and {len(names) - MAX_SHOWN_METRICS} more)" if len(names) > MAX_SHOWN_METRICS else "")
        if self.loss is not None:
            if self.accuracy is None:
                return f"reconstruction error (MSE) {self.loss:.4f}"
            return f"accuracy {self.accuracy:.4f}, loss {self.loss:.4f}"
        evaluation = self.federated_evaluation
        if evaluation:
            accuracy = f"accuracy {evaluation['accuracy']:.4f}, " if "accuracy" in evaluation else ""
            return (f"clients' evaluation of model version {evaluation['model_version']}: {accuracy}loss "
                    f"{evaluation['loss']:.4f} ({evaluation['clients']} clients, {evaluation['samples']} samples)")
        return "no test result"


def federated_evaluation(client_metrics: dict[str, dict[str, float]], model_version: int) -> dict[str, Any] | None:
    """The clients' evaluations of the model they trained from (version `model_version`, the previous
    round's), on the data each holds out, weighted by sample count; None when no client evaluated.
    The server checks these fields when it receives them (fl_server/uploads.py check_metrics); a report
    that is still incomplete or out of range here is left out rather than allowed to fail the round."""
    reports = [m for m in client_metrics.values() if _evaluation_report(m)]
    if not reports:
        return None
    # Plain sums: they overflow to infinity (left out below) where math.fsum would raise.
    samples = sum(m["eval_samples"] for m in reports)
    loss = sum(m["eval_loss"] * m["eval_samples"] for m in reports) / samples
    if not (_finite(samples) and _finite(loss)):
        return None
    out: dict[str, Any] = {"model_version": model_version, "clients": len(reports), "samples": int(samples),
                           "loss": loss}
    if all(_finite(m.get("eval_accuracy")) for m in reports):
        accuracy = sum(m["eval_accuracy"] * m["eval_samples"] for m in reports) / samples
        if _finite(accuracy):
            out["accuracy"] = accuracy
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _evaluation_report(metrics: dict[str, float]) -> bool:
    """A client's federated evaluation, complete and usable: a finite loss over a finite, positive number
    of samples."""
    samples, loss = metrics.get("eval_samples", 0.0), metrics.get("eval_loss", math.nan)
    return _finite(samples) and _finite(loss) and samples > 0


def to_jsonl(records: list[RoundRecord]) -> str:
    return "".join(json.dumps(r.to_dict()) + "\n" for r in records)


def read_jsonl(path: str | Path) -> list[RoundRecord]:
    """The records of a metrics.jsonl; ValueError (not JSON) or TypeError (not a record) for a bad line."""
    return [RoundRecord.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
