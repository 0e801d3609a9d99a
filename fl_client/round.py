"""What a client does with a round's result, whoever drives it: the Federation of fl_client.api over
the network (the fl-client daemon, a user's script), or a simulation in one process
(fl_tools.simulation).

    client = ClientRound("3")
    task = Task(...)                                   # the round, as the training code sees it
    result = train(task)                               # the user's code, or fl_client.builtin
    update = client.prepare(global_state, task, result)
    ... send update.header(model_version) and update.payload ...
    client.commit(update)                              # only once the server accepted it

`prepare` checks the trained tensors against the global model and encodes local - global (integer and
bool tensors: their local values, which cannot wrap) with the round's codec, keeping top-k's error
feedback until `commit`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common import codecs, tensors
from common import messages as m
from common.convert import payload_header_of
from common.partition import client_index
from fl_client.task import Result, State, Task, TaskError, check_metrics, state_of


def seed_for(cfg: m.TrainConfig, client_id: str, round_: int) -> int:
    """The seed of a client's round: by (client, round), not by how many rounds this process happens to
    have run, so that a round re-run after a server restart trains exactly as the first attempt did."""
    return cfg.seed + client_index(client_id) + 100_003 * round_


@dataclass
class PreparedUpdate:
    """A round's update, ready to send; `commit` it to the ClientRound that made it once accepted."""

    client_id: str
    round: int
    payload: tensors.Payload
    codec: codecs.Codec
    num_samples: int
    metrics: dict[str, float]
    residual: State  # the error-feedback memory as it is once this update has been taken

    def header(self, model_version: int, join_after: bool = False) -> m.UpdateHeader:
        """The header that announces this update, for the global model `model_version` it was trained from
        (`join_after`: the server answers with the client's next join too, SubmitResult.next)."""
        return m.UpdateHeader(
            client_id=self.client_id, round=self.round, model_version=model_version, num_samples=self.num_samples,
            payload=payload_header_of(self.payload, m.Encoding.DIFF, tensors.CHUNK_SIZE, str(self.codec)),
            metrics=dict(self.metrics), join_after=join_after)


class ClientRound:
    """One client's side of the rounds: what it sends for a result, and compression's memory."""

    def __init__(self, client_id: str, tamper: Callable[[State], State] | None = None):
        """`tamper` changes the diff before it is encoded: an attacker, in a study of model poisoning."""
        self.client_id = client_id
        self.tamper = tamper
        # Top-k compression's error feedback: what this client has not sent yet, added to its next diff.
        self.residual: State = {}

    def prepare(self, global_state: State, task: Task, result: Result) -> PreparedUpdate:
        """The update for `result`, trained from `global_state` (the driver's copy, which the user's code
        never saw); TaskError when the result cannot be sent."""
        weights, num_samples, metrics = result
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise TaskError(f"round {task.round}: num_samples must be a whole number of at least 1 (the update's "
                            f"weight in the average), got {num_samples!r}")
        local = state_of(weights, global_state)
        metrics = {**check_metrics(metrics, f"round {task.round}"), **task.evaluation}
        # Floating-point tensors travel as local - global; integer and bool ones (BatchNorm's counters, a
        # uint8 or bool buffer) as the local values themselves, which cannot wrap around (see
        # fl_server/aggregation/values.py; torch cannot even subtract bools).
        diff = {name: local[name] - g if g.is_floating_point() else local[name].to(g.dtype, copy=True)
                for name, g in global_state.items()}
        if self.tamper is not None:
            diff = self.tamper(diff)
        codec = codecs.parse(task.config.compression)
        # A copy: the memory moves on only in commit, so that a refused or discarded attempt does not
        # leave its residual behind for the retry.
        residual = dict(self.residual)
        payload = tensors.encode(codecs.encode(diff, codec, residual))
        return PreparedUpdate(self.client_id, task.round, payload, codec, num_samples, metrics, residual)

    def commit(self, update: PreparedUpdate) -> None:
        """The server took `update`: what it left unsent is what the next diff adds."""
        self.residual = update.residual

