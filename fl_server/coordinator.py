"""The round loop: sample, send and wait, aggregate, save, evaluate.

Evaluation runs beside the next round rather than before it: the next round opens the moment the
aggregate is checkpointed, and each round's accuracy is filled into `metrics.jsonl` when ready.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from common.datasets import ArrayData, BatchLoader
from common.messages import ModelSpec
from common.models import build_model
from common.training import EvalResult, evaluate
from fl_server.aggregation import epsilon
from fl_server.checkpoint import METRICS, Checkpoint, RunFolder
from fl_server.records import RoundRecord
from fl_server.rounds import RoundOutcome, RoundState

log = logging.getLogger("fl_server.coordinator")


def _accuracy(result: EvalResult) -> float | None:
    """None for models without one (an autoencoder), which JSON and the report tools understand."""
    return None if math.isnan(result.accuracy) else result.accuracy


class Coordinator:
    def __init__(self, state: RoundState, *, rounds: int, model_spec: ModelSpec, test_data: ArrayData,
                 run: RunFolder, config_hash: str, metrics: list[RoundRecord] | None = None,
                 device: torch.device | str = "cpu", report: Callable[[str], None] = print,
                 write_report: bool = False, privacy: tuple[float, float] | None = None):
        """`privacy`: (noise multiplier, delta) of a DP-FedAvg run, whose epsilon each record reports."""
        self.state = state
        self.rounds = rounds
        self.model = build_model(model_spec)
        self.test_loader = BatchLoader(test_data, batch_size=128, device=device)
        self.device = torch.device(device)
        self.run_folder = run
        self.model_spec = model_spec
        self.config_hash = config_hash  # saved with each checkpoint, to check on resume (Checkpoint.resume_error)
        self.metrics = list(metrics or [])
        self.report = report  # one human-readable line per round, on stdout
        self.write_report = write_report  # PNG plots and report.md at the end (fl_server.report)
        self.privacy = privacy
        self._metrics_lock = threading.Lock()
        # One worker: evaluations happen in round order, each on the model version it was given.
        self._evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self._last_evaluation: Future | None = None

    def run(self) -> bool:
        """Run rounds until `rounds` models have been aggregated; False if stopped before that."""
        try:
            self._finish_pending_evaluation()
            while self.state.model_version < self.rounds:
                self.state.wait_for_clients()
                if self.state.stopping:
                    return False
                self.state.open_round()
                self.state.wait_until_complete()
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
                # The previous round's evaluation has had a whole round to finish; waiting for it here
                # keeps at most the newest record without accuracy in any checkpoint.
                self._wait_for_evaluation()
                self._add_record(record)
                self.save()
                self._last_evaluation = self._evaluator.submit(self._evaluate_round, record,
                                                               self.state.global_state, outcome)
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

    def evaluate(self, state: dict[str, torch.Tensor]) -> EvalResult:
        self.model.load_state_dict(state)
        return evaluate(self.model, self.test_loader, self.device)

    def _record_of(self, outcome: RoundOutcome) -> RoundRecord:
        """The round's record; without the clients' metrics if they cannot be recorded (they were checked
        when received, so that is a bug): one client's metrics never stop the server."""
        try:
            return RoundRecord.of(outcome)
        except Exception:
            log.exception("round %d: the clients' metrics could not be recorded; recording the round without "
                          "them", outcome.round)
            return RoundRecord.of(dataclasses.replace(outcome, client_metrics={}))

    def _evaluate_round(self, record: RoundRecord, state: dict[str, torch.Tensor], outcome: RoundOutcome) -> None:
        try:
            result = self.evaluate(state)
        except Exception:
            # The round's model is published and checkpointed already: it stays without a test result.
            log.exception("round %d: evaluating the model failed; carrying on without its accuracy", outcome.round)
            return
        with self._metrics_lock:
            record.accuracy, record.loss = _accuracy(result), result.loss
            self._write_metrics()
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
        if pending:
            result = self.evaluate(self.state.global_state)
            with self._metrics_lock:
                pending[-1].accuracy, pending[-1].loss = _accuracy(result), result.loss
                self.run_folder.write_metrics(self.metrics)

    def _add_record(self, record: RoundRecord) -> None:
        with self._metrics_lock:
            self.metrics.append(record)
            self._write_metrics()

    def _write_metrics(self) -> None:
        """metrics.jsonl rewritten, under the metrics lock. A failure is logged and the run carries on: the
        records stay in memory and in the checkpoints, and the next write has them all."""
        try:
            self.run_folder.write_metrics(self.metrics)
        except Exception:
            log.exception("writing %s failed; the round loop carries on", self.run_folder.path / METRICS)

    def save(self) -> None:
        with self._metrics_lock:
            metrics = [r.copy() for r in self.metrics]
        self.run_folder.save_checkpoint(Checkpoint(
            model=self.state.global_state, model_version=self.state.model_version,
            rng_state=self.state.selector.state_dict(), server_optimizer=self.state.aggregator.state_dict(),
            metrics=metrics, config_hash=self.config_hash, model_spec=self.model_spec,
        ), model_checksum=self.state.global_checksum)

    def _add_privacy_spent(self, record: RoundRecord) -> None:
        """Epsilon spent by every aggregated round so far, this one included (rounds re-run for lack of
        updates published nothing, so they cost nothing)."""
        assert self.privacy is not None, "only DP runs report privacy spent"
        noise_multiplier, delta = self.privacy
        rounds = [(r.population, len(r.selected)) for r in [*self.metrics, record] if r.aggregated]
        record.epsilon, record.delta = epsilon(noise_multiplier, rounds, delta), delta
