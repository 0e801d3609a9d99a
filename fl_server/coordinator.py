"""The round loop: sample, send and wait, aggregate, evaluate, save."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from common.datasets import ArrayData, BatchLoader
from common.messages import ModelSpec
from common.models import build_model
from common.training import EvalResult, evaluate
from fl_server.checkpoint import RunFolder
from fl_server.rounds import RoundOutcome, RoundState

log = logging.getLogger("fl_server.coordinator")


class Coordinator:
    def __init__(self, state: RoundState, *, rounds: int, model_spec: ModelSpec, test_data: ArrayData,
                 run: RunFolder, checkpoint_extra: dict[str, Any], metrics: list[dict[str, Any]] | None = None,
                 device: torch.device | str = "cpu", report: Callable[[str], None] = print):
        self.state = state
        self.rounds = rounds
        self.model = build_model(model_spec)
        self.test_loader = BatchLoader(test_data, batch_size=512, device=device)
        self.device = torch.device(device)
        self.run_folder = run
        self.checkpoint_extra = checkpoint_extra  # config hash and model spec, to check on resume
        self.metrics = list(metrics or [])
        self.report = report  # one human-readable line per round, on stdout

    def run(self) -> bool:
        """Run rounds until `rounds` models have been aggregated; False if stopped before that."""
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
                log.warning("round %d: only %d of %d updates (min_fit %d); re-running it with a fresh sample; "
                            "dropped: %s", outcome.round, len(outcome.contributors), len(outcome.selected),
                            self.state.min_fit, outcome.drop_reasons)
                self.metrics.append(self._record(outcome, None))
                self.run_folder.write_metrics(self.metrics)
                continue
            result = self.evaluate()
            self.metrics.append(self._record(outcome, result))
            self.save()
            self.report(f"round {outcome.round}/{self.rounds}: accuracy {result.accuracy:.4f}, loss "
                        f"{result.loss:.4f}, clients {outcome.contributors}, {outcome.seconds:.2f} s")
        path = self.run_folder.save_final_model(self.state.global_state)
        self.state.finish()
        final = self.evaluate()
        self.report(f"finished {self.rounds} rounds: final accuracy {final.accuracy:.4f}; model saved to {path}")
        return True

    def evaluate(self) -> EvalResult:
        self.model.load_state_dict(self.state.global_state)
        return evaluate(self.model, self.test_loader, self.device)

    def save(self) -> None:
        self.run_folder.save_checkpoint({
            "model": self.state.global_state,
            "model_version": self.state.model_version,
            "rng_state": self.state.rng.bit_generator.state,
            "metrics": self.metrics,
            **self.checkpoint_extra,
        })
        self.run_folder.write_metrics(self.metrics)

    def _record(self, outcome: RoundOutcome, result: EvalResult | None) -> dict[str, Any]:
        """One line of metrics.jsonl; a round re-run for lack of updates has `aggregated: false` and no
        accuracy, and is followed by another line for the same round."""
        return {
            "round": outcome.round,
            "aggregated": outcome.aggregated,
            "accuracy": result.accuracy if result else None,
            "loss": result.loss if result else None,
            "clients": outcome.contributors,
            "num_samples": outcome.num_samples,
            "seconds": round(outcome.seconds, 4),
            "selected": outcome.selected,
            "dropped": outcome.dropped,
            "drop_reasons": outcome.drop_reasons,
            "client_metrics": outcome.client_metrics,
            "time": time.time(),
        }
