"""The round loop: sample, send and wait, aggregate, then evaluate and save beside the next round.

The next round opens the moment a round is aggregated. Its evaluation, checkpoint and `metrics.jsonl`
line are made on one background thread while the next round runs, in that order, and that work is
waited for before the next round is aggregated: so the checkpoint of round r exists before round r+2
opens, and a crash loses at most the round in progress and the one before it, which a resumed server
re-runs exactly (each client's round is seeded by its round, the sample by the checkpointed sampler).
The server evaluates on its data set's test split, or with the operator's server_evaluation function;
with neither (dataset none), a round's record is complete when it is aggregated.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from common.datasets import ArrayData, BatchLoader
from common.logs import brief
from common.messages import ModelSpec
from common.training import EvalResult, evaluate
from fl_server.aggregation import epsilon
from fl_server.checkpoint import METRICS, Checkpoint, RunFolder
from fl_server.model_source import EvaluationFunction, make_model
from fl_server.records import RoundRecord
from fl_server.rounds import RoundOutcome, RoundState

log = logging.getLogger("fl_server.coordinator")


def _accuracy(result: EvalResult) -> float | None:
    """None for models without one (an autoencoder), which JSON and the report tools understand."""
    return None if math.isnan(result.accuracy) else result.accuracy


@dataclass
class Evaluation:
    """A model's test result: `metrics` is what the operator's server_evaluation returned (empty for the
    data set's test split), whose "accuracy" and "loss" are also these."""

    accuracy: float | None
    loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)

    def fill(self, record: RoundRecord) -> None:
        record.accuracy, record.loss, record.server_metrics = self.accuracy, self.loss, dict(self.metrics)


def checked_metrics(result: object) -> dict[str, float]:
    """What a server_evaluation returned, as {name: finite float}; ValueError, in one sentence, otherwise."""
    if not isinstance(result, Mapping):
        raise ValueError(f"it returned a {type(result).__name__}, not a dict of metrics")
    out = {}
    for name, value in result.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"it returned a metric named {name!r}; names must be non-empty strings")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"its metric {name!r} is {str(value)[:80]!r}, not a number") from None
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError(f"its metric {name!r} is {value!r}, not a finite number")
        out[name] = number
    return out


class Coordinator:
    def __init__(self, state: RoundState, *, rounds: int, model_spec: ModelSpec, test_data: ArrayData | None,
                 run: RunFolder, config_hash: str, metrics: list[RoundRecord] | None = None,
                 device: torch.device | str = "cpu", report: Callable[[str], None] = print,
                 write_report: bool = False, privacy: tuple[float, float] | None = None,
                 server_evaluation: EvaluationFunction | None = None, model: nn.Module | None = None):
        """`privacy`: (noise multiplier, delta) of a DP-FedAvg run, whose epsilon each record reports.
        `test_data`: what the server evaluates each round's model on; `server_evaluation`, the operator's
        evaluation, is used instead when given; with neither, rounds are not evaluated on the server.
        `model`: one built from `model_spec` already (fl-server's, at start-up), or None to build it here."""
        self.state = state
        self.rounds = rounds
        self.server_evaluation = server_evaluation
        self.evaluates = server_evaluation is not None or test_data is not None
        self.model = (model if model is not None else make_model(model_spec)) if self.evaluates else None
        self.test_loader = (BatchLoader(test_data, batch_size=128, device=device)
                            if test_data is not None and server_evaluation is None else None)
        self.device = torch.device(device)
        self.run_folder = run
        self.model_spec = model_spec
        self.config_hash = config_hash  # saved with each checkpoint, to check on resume (Checkpoint.resume_error)
        self.metrics = list(metrics or [])
        self.report = report  # one human-readable line per round, on stdout
        self.write_report = write_report  # PNG plots and report.md at the end (fl_server.report)
        self.privacy = privacy
        self._metrics_lock = threading.Lock()
        # One worker: each round's evaluation, checkpoint and metrics line, in round order, beside the
        # next round (see the module's docstring).
        self._evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self._last_evaluation: Future | None = None

    def run(self) -> bool:
        """Run rounds until `rounds` models have been aggregated; False if stopped before that."""
        try:
            if not self.evaluates:
                log.info("the server evaluates no model (no data set, no server_evaluation); with eval_fraction > 0 "
                         "clients evaluate each model they receive on data they hold out")
            self._finish_pending_evaluation()
            while self.state.model_version < self.rounds:
                self.state.wait_for_clients()
                if self.state.stopping:
                    return False
                self.state.open_round()
                self.state.wait_until_complete()
                # The round before's evaluation and checkpoint have had this whole round to finish. Waiting
                # here, before this round's aggregate replaces the state they read, keeps them consistent,
                # and the checkpoint of every round on disk before the round after next opens.
                self._wait_for_evaluation()
                outcome = self.state.close_round()
                if not outcome.aggregated:
                    if self.state.stopping:
                        return False
                    log.warning("round %d: only %d of %d updates (min_fit %d); re-running it with a fresh "
                                "sample; dropped: %s", outcome.round, len(outcome.contributors),
                                len(outcome.selected), self.state.rules.min_fit, outcome.drop_reasons)
                    self._add_record(self._record_of(outcome))
                    continue
                record = self._record_of(outcome)
                if self.privacy is not None:
                    self._add_privacy_spent(record)
                with self._metrics_lock:
                    self.metrics.append(record)
                # Taken now: the next round's sample moves the sampler on. The model and the server
                # optimizer's state stay as they are until the next round is aggregated, which waits for
                # this work first.
                checkpoint = self._checkpoint()
                self._last_evaluation = self._evaluator.submit(self._after_round, record, checkpoint,
                                                               self.state.global_checksum, outcome)
            self._wait_for_evaluation()
            path = self.run_folder.save_final_model(self.state.global_state)
            self.state.finish()
            done = [r for r in self.metrics if r.aggregated]
            status = self.state.status()
            self.report(f"finished {self.rounds} rounds: final {self.metrics[-1].quality()}; "
                        f"model saved to {path}")
            log.info("summary: %d rounds (%d re-run), %.1f s in rounds, final %s, best accuracy %s, %d clients, "
                     "%.1f MB of updates received, %.1f MB of models sent", len(done), len(self.metrics) - len(done),
                     sum(r.seconds for r in done), done[-1].quality(),
                     max((r.accuracy for r in done if r.accuracy is not None), default="-"),
                     len(status["clients"]), status["bytes_received"] / 1e6, status["bytes_sent"] / 1e6)
            if self.write_report:
                from fl_server.report import write_report

                log.info("report written: %s", ", ".join(str(p) for p in write_report(self.run_folder.path)))
            return True
        finally:
            self._evaluator.shutdown(wait=True)

    def records(self) -> list[RoundRecord]:
        """A copy of the metrics so far (for monitoring, from other threads)."""
        with self._metrics_lock:
            return [r.copy() for r in self.metrics]

    def evaluate(self, state: dict[str, torch.Tensor]) -> Evaluation:
        """The model with weights `state`, evaluated by the operator's function or on the test split."""
        assert self.model is not None, "only a coordinator that evaluates has a model"
        self.model.load_state_dict(state)
        if self.server_evaluation is not None:
            self.model.to(self.device).eval()
            with torch.no_grad():
                returned = self.server_evaluation(self.model, self.device)
            try:
                metrics = checked_metrics(returned)
            except ValueError as e:
                raise ValueError(f"server_evaluation's result is unusable: {e}") from None
            return Evaluation(metrics.get("accuracy"), metrics.get("loss"), metrics)
        assert self.test_loader is not None
        result = evaluate(self.model, self.test_loader, self.device)
        return Evaluation(_accuracy(result), result.loss)

    def _record_of(self, outcome: RoundOutcome) -> RoundRecord:
        """The round's record; without the clients' metrics if they cannot be recorded (they were checked
        when received, so that is a bug): one client's metrics never stop the server."""
        try:
            return RoundRecord.of(outcome)
        except Exception:
            log.exception("round %d: the clients' metrics could not be recorded; recording the round without "
                          "them", outcome.round)
            return RoundRecord.of(dataclasses.replace(outcome, client_metrics={}))

    def _after_round(self, record: RoundRecord, checkpoint: Checkpoint, model_checksum: int,
                     outcome: RoundOutcome) -> None:
        """An aggregated round's evaluation, then its line in metrics.jsonl, then its checkpoint, then its
        line on stdout: beside the next round, on the evaluation thread."""
        if self.evaluates:
            try:
                result = self.evaluate(checkpoint.model)
            except Exception as e:
                # The round's model is published already: it stays without a test result.
                self._evaluation_failed(outcome.round, e)
            else:
                with self._metrics_lock:
                    result.fill(record)
        # The record goes to metrics.jsonl before the checkpoint that counts it is saved: a resumed server
        # reads the checkpoint's records from the log (fl_server/checkpoint.py).
        with self._metrics_lock:
            if self._write_metrics():
                checkpoint.metrics_count = len(self.metrics)
            else:  # the log is behind: this checkpoint carries the records itself
                checkpoint.metrics = [r.copy() for r in self.metrics]
        self.run_folder.save_checkpoint(checkpoint, model_checksum=model_checksum)
        self._report_round(record, outcome)

    def _evaluation_failed(self, round_: int, error: Exception) -> None:
        if self.server_evaluation is not None:  # the operator's code: one line, the traceback for DEBUG
            log.error("round %d: server_evaluation failed (%s: %s); the round stays without a test result",
                      round_, type(error).__name__, brief(error))
            log.debug("server_evaluation's failure", exc_info=error)
        else:
            log.exception("round %d: evaluating the model failed; carrying on without its accuracy", round_,
                          exc_info=error)

    def _report_round(self, record: RoundRecord, outcome: RoundOutcome) -> None:
        """The round's line on stdout and in the log, once its record is complete."""
        line = (f"round {outcome.round}/{self.rounds}: {record.quality()}, "
                f"clients {outcome.contributors}, {outcome.seconds:.2f} s")
        if record.epsilon is not None:
            line += f", privacy spent: epsilon {record.epsilon:.3g} at delta {record.delta:g}"
        log.info("round %d closed: %s, %d clients, %.2f s", outcome.round, record.quality(),
                 len(outcome.contributors), outcome.seconds)
        self.report(line)

    def _wait_for_evaluation(self) -> None:
        if self._last_evaluation is not None:
            self._last_evaluation.result()  # re-raises an evaluation's failure here

    def _finish_pending_evaluation(self) -> None:
        """After a restart: the checkpoint's newest round may not have been evaluated before the crash."""
        # Loss, not accuracy: an autoencoder's evaluated rounds have no accuracy either.
        pending = [r for r in self.metrics if r.aggregated and not r.evaluated]
        if pending and self.evaluates:
            try:
                result = self.evaluate(self.state.global_state)
            except Exception as e:
                self._evaluation_failed(pending[-1].round, e)
                return
            with self._metrics_lock:
                result.fill(pending[-1])
                self.run_folder.write_metrics(self.metrics)

    def _add_record(self, record: RoundRecord) -> None:
        with self._metrics_lock:
            self.metrics.append(record)
            self._write_metrics()

    def _write_metrics(self) -> bool:
        """The new records added to metrics.jsonl, under the metrics lock; whether that worked. A failure is
        logged and the run carries on: the records stay in memory, the round's checkpoint then carries them
        itself, and the next write has them all."""
        try:
            self.run_folder.append_metrics(self.metrics)
            return True
        except Exception:
            log.exception("writing %s failed; the round loop carries on", self.run_folder.path / METRICS)
            return False

    def _checkpoint(self) -> Checkpoint:
        """The server's state now, to save; its metrics are filled in when it is saved."""
        return Checkpoint(
            model=self.state.global_state, model_version=self.state.model_version,
            rng_state=self.state.selector.state_dict(), server_optimizer=self.state.aggregator.state_dict(),
            config_hash=self.config_hash, model_spec=self.model_spec)

    def _add_privacy_spent(self, record: RoundRecord) -> None:
        """Epsilon spent by every aggregated round so far, this one included (rounds re-run for lack of
        updates published nothing, so they cost nothing)."""
        assert self.privacy is not None, "only DP runs report privacy spent"
        noise_multiplier, delta = self.privacy
        rounds = [(r.population, len(r.selected)) for r in [*self.metrics, record] if r.aggregated]
        record.epsilon, record.delta = epsilon(noise_multiplier, rounds, delta), delta
