"""A client's side of a secure round (config secure_aggregation; the protocol is common/secagg.py, the
server's stages fl_server/secure.py): keys and shares before training, a masked update instead of the
plain one, and the shares that unmask the round after it.

The update's floating-point values (local - global) are clipped and encoded in fixed point, weighted
by the sample count, with the count as the last value; the masks make the vector look uniformly random
to the server, which only ever sees the sum of the round's vectors. The header says 1 sample: the real
count is inside the masked vector.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from common import codecs, secagg, secagg_sessions, tensors
from common import messages as m
from common.secure_rounds import flatten_floats, masked_length, round_params
from fl_client.round import PreparedUpdate
from fl_client.task import Result, State, Task, TaskError, check_metrics, state_of

log = logging.getLogger("fl_client")

Step = Callable[[m.SecAggRequest], m.SecAggReply]  # one stage over the wire (ServerConnection.secure_step)


class SecureRound:
    """One secure round of one client: `exchange_keys` before training, `prepare` the masked update,
    `reveal` once the server says who survived."""

    def __init__(self, client_id: str, cfg: m.TrainConfig, round_: int, global_state: State, step: Step):
        self.client_id, self.round, self.step = client_id, round_, step
        self.params = round_params(cfg, masked_length(tensors.specs_of(global_state)), round_)
        self.session = secagg_sessions.ClientSession(client_id, self.params)
        self.received: dict[str, bytes] = {}  # the shares this client's neighbours sent it
        self._advertisement: m.SecAggRequest | None = None
        self._shares: m.SecAggRequest | None = None

    def exchange_keys(self) -> None:
        """Stages 1 and 2: advertise this client's public keys, then send its secrets' shares."""
        roster = self.step(self.advertisement()).entries
        self.received = self.step(self.shares(roster)).entries
        log.info("round %d: secure aggregation: keys exchanged with %d neighbours", self.round, len(self.received))

    def advertisement(self) -> m.SecAggRequest:
        """Stage 1's request (the same one again until the server answers with the roster)."""
        if self._advertisement is None:
            self._advertisement = m.SecAggRequest(self.client_id, self.round, m.SecAggStage.ADVERTISE_KEYS,
                                                  {self.client_id: self.session.advertise()})
        return self._advertisement

    def shares(self, roster: dict[str, bytes]) -> m.SecAggRequest:
        """Stage 2's request, for the roster stage 1 answered with (made once: the shares are random)."""
        if self._shares is None:
            self._shares = m.SecAggRequest(self.client_id, self.round, m.SecAggStage.SHARE_KEYS,
                                           self.session.share_keys(roster))
        return self._shares

    def revelation(self, lists: m.SecAggReply) -> m.SecAggRequest:
        """Stage 4's request, for the survivors and dropped clients the UNMASK stage answered with."""
        return m.SecAggRequest(self.client_id, self.round, m.SecAggStage.REVEAL,
                               self.session.reveal(lists.survivors, lists.dropped))

    def unmask_request(self) -> m.SecAggRequest:
        return m.SecAggRequest(self.client_id, self.round, m.SecAggStage.UNMASK)

    def prepare(self, global_state: State, task: Task, result: Result) -> PreparedUpdate:
        """Stage 3: the masked update for `result`."""
        weights, num_samples, metrics = result
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise TaskError(f"round {task.round}: num_samples must be a whole number of at least 1, got "
                            f"{num_samples!r}")
        if num_samples > self.params.max_weight:
            raise TaskError(f"round {task.round}: num_samples {num_samples} is above the {self.params.max_weight} "
                            "a secure round can weigh one update by")
        local = state_of(weights, global_state)
        diff = flatten_floats(local) - flatten_floats(global_state)
        clipped = int(np.count_nonzero(np.abs(diff) > self.params.clip))
        if clipped:
            log.warning("round %d: %d values of the update are beyond secagg_clip %g and are clipped", task.round,
                        clipped, self.params.clip)
        masked = self.session.mask(secagg.encode(diff, num_samples, self.params), self.received)
        payload = tensors.encode({"masked": torch.from_numpy(masked.view(np.int64))})
        metrics = {**check_metrics(metrics, f"round {task.round}"), **task.evaluation}
        return PreparedUpdate(self.client_id, task.round, payload, codecs.parse("none"), 1, metrics, {})

    def reveal(self) -> None:
        """Stage 4: the shares that remove the masks which do not cancel."""
        lists = self.step(self.unmask_request())
        self.step(self.revelation(lists))
        log.info("round %d: secure aggregation: shares revealed (%d survivors, %d dropped)", self.round,
                 len(lists.survivors), len(lists.dropped))

