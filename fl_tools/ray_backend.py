"""The simulation's Ray backend: each selected client's round as a Ray task, on a local Ray instance or
an existing cluster (docs/simulation.md).

What is shipped where:
- the global model: put into Ray's object store once per round (`ray.put`), its reference passed to every
  task of the round, so that each node fetches it once however many of its clients train;
- clients' data: not shipped. A task loads its client's share where it runs (fl_tools.clients.ClientData:
  a shard by path, or the data set cut there), cached per worker process. Only data the driver holds and
  cannot name (an `ArrayData` given to `simulation.run`) goes through the object store, once per run;
- the update: the task returns it encoded (fl_client.round.PreparedUpdate: payload bytes and the header's
  fields), and the driver submits it to the server's own `RoundState`, in the order the clients were
  selected, so that the aggregate is summed in the same order as in-process and the same seeds give the
  same models.

Top-k's error feedback stays on the driver: the driver keeps every client's `ClientRound`, ships its
residual with the task and commits the returned one only once the update is accepted, exactly as
in-process. Named actors holding the residuals would pin a process per client (a thousand clients, a
thousand processes) or tie each client to one worker, and a lost node would lose its clients' memory.

A client's task runs with `max_retries=0`: a worker or node lost mid-round drops that client from the
round, as a deployed federation drops a client whose machine dies, rather than silently training it again
(a retry would also run it after the others, with no deadline of its own). The round's rules decide the
rest: at least `min_fit` updates by the deadline, or the round is re-run with a fresh sample.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from common import messages as m
from common.datasets import ArrayData, BatchLoader
from common.training import EvalResult, evaluate
from fl_client.builtin import BuiltinTraining
from fl_client.round import ClientRound, PreparedUpdate, State
from fl_tools.clients import ClientData, ClientResult, shared_model, train_round

log = logging.getLogger("fl_tools.ray")


class SimulationError(RuntimeError):
    """The simulation cannot go on (no Ray, no cluster, rounds that keep failing); one sentence."""


@dataclass(frozen=True)
class RayOptions:
    """Where the clients run and what each asks for: fl-experiment's --ray-* flags."""

    address: str = ""  # "" starts a local Ray instance; "auto" or HOST:PORT joins a running cluster
    cpus_per_client: float = 1.0  # a client task's CPUs (also its torch threads, rounded down, at least 1)
    gpus_per_client: float = 0.0  # fractional: 0.25 puts four clients on one GPU at once
    num_cpus: int | None = None  # a local instance's CPUs (None: all of this machine's)


@dataclass
class ClientReport:
    """What a client's task sends back: the encoded update, and where and how long it ran."""

    update: PreparedUpdate
    where: ClientResult


def _import_ray() -> Any:
    try:
        import ray  # noqa: PLC0415 - an optional extra, needed only on this backend
    except ImportError:
        raise SimulationError("the Ray backend needs Ray: pip install 'fedgrpc[ray]' (or ray>=2.60)") from None
    return ray


def connect(options: RayOptions) -> Any:
    """Ray, initialized: a local instance, the cluster at `options.address`, or whatever this process
    initialized already (a test's, or an earlier run's: a study's runs share one instance rather than
    paying its start-up for each)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    if options.address:
        _check_reachable(options.address)
    try:
        if options.address:
            ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING)
        else:
            # This process's own instance: on the loopback address, since no other machine joins it.
            # address="local": a new instance, even where a cluster's address file lies about.
            ray.init(address="local", num_cpus=options.num_cpus, include_dashboard=False,
                     logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {options.address}" if options.address else "a local Ray instance"
        hint = ("; start one with `ray start --head`, or leave out --ray-address to start a local instance"
                if options.address else "")
        why = _first_line(e).split(". ")[0] or type(e).__name__  # Ray's first sentence
        raise SimulationError(f"cannot connect to {where} ({why}){hint}") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that does not answer is said at once: Ray itself would retry for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a ray:// address: Ray's own message is quick
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout).close()
    except OSError as e:
        raise SimulationError(f"nothing answers at the Ray address {address} ({e.strerror or e}); start the "
                              "cluster's head there with `ray start --head --port PORT`, or leave out "
                              "--ray-address to start a local instance") from None


def _threads(cpus: float) -> int:
    return max(1, int(cpus))


def _cached(ref_holder: list[Any]) -> Any:
    """The object behind a reference passed inside a list (so that Ray does not resolve, and copy, it
    for every task), fetched once per worker process."""
    ref = ref_holder[0]
    key = ref.hex()
    if key not in _OBJECTS:
        import ray  # noqa: PLC0415

        _OBJECTS.clear()  # one run's data at a time
        _OBJECTS[key] = ray.get(ref)
    return _OBJECTS[key]


_OBJECTS: dict[str, Any] = {}


def _device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 else torch.device("cpu")


def client_task(source: ClientData | list[Any], index: int, cfg: m.TrainConfig, client_id: str, round_: int,
                global_state: State, residual: State, tamper: Any, cpus: float, gpus: float) -> ClientReport:
    """One client's round on a Ray worker: its data loaded here, then the same round as in-process
    (fl_tools.clients.train_round and ClientRound.prepare with the driver's residual)."""
    import ray  # noqa: PLC0415

    started = time.perf_counter()
    torch.set_num_threads(_threads(cpus))
    if isinstance(source, ClientData):
        data = source.share(index, cfg.num_clients, cfg.seed, cfg.partition)
    else:  # the driver's own ArrayData, through the object store
        from common.partition import client_share  # noqa: PLC0415

        data = client_share(_cached(source), index, cfg.num_clients, cfg.seed, cfg.partition)
    device = _device(gpus)
    training = BuiltinTraining(data, model=shared_model(cfg.model))
    training.configure(client_id, cfg, device)
    task, trained = train_round(training, cfg, client_id, round_, global_state, device)
    client = ClientRound(client_id, tamper=None if tamper is None else lambda diff: tamper(index, diff))
    client.residual = residual
    update = client.prepare(global_state, task, trained)
    return ClientReport(update, ClientResult(round_, client_id, ray.get_runtime_context().get_node_id(), os.getpid(),
                                             time.perf_counter() - started))


def evaluate_task(test: list[Any], spec: m.ModelSpec, global_state: State, cpus: float, gpus: float) -> EvalResult:
    """The global model on the test set, on a worker with a client's resources (a GPU's, on a GPU cluster)."""
    torch.set_num_threads(_threads(cpus))
    device = _device(gpus)
    net = shared_model(spec)
    net.load_state_dict(global_state)
    return evaluate(net, BatchLoader(_cached(test), 1000, device=device), device)


class RayBackend:
    """Runs a round's clients as Ray tasks and hands their reports back to the driver in selection order."""

    def __init__(self, options: RayOptions, train: ArrayData | ClientData, test: ArrayData, spec: m.ModelSpec,
                 tamper: Callable[[int, State], State] | None = None):
        """`tamper(index, diff)` is pickled with every task: state it keeps (a generator) is the task's own
        copy, not shared between clients as in-process."""
        self.ray = connect(options)
        self.options = options
        resources = {"num_cpus": options.cpus_per_client, "num_gpus": options.gpus_per_client}
        self._client = self.ray.remote(max_retries=0)(client_task).options(**resources)
        # Evaluating the global model changes nothing and gives the same result twice: a lost worker's
        # evaluation is simply run again.
        self._evaluate = self.ray.remote(max_retries=2)(evaluate_task).options(**resources)
        self.tamper = tamper
        self.source = train if isinstance(train, ClientData) else [self.ray.put(train)]
        self.test = [self.ray.put(test)]
        self.spec = spec
        self.lost = self.ray.exceptions.RayError

    def run_round(self, cfg: m.TrainConfig, selected: list[str], members: dict[str, ClientRound],
                  start: State, round_: int,
                  deadline: float) -> Iterator[tuple[str, PreparedUpdate | str, ClientResult | None]]:
        """Yield (client, update, where it ran) for each selected client in selection order, or (client,
        why, None) for one whose worker or node was lost; stop at `deadline` (time.monotonic()),
        cancelling the rest (close_round then records them as the deadline's)."""
        ray = self.ray
        model = ray.put(start)  # once per round, whatever the number of clients
        pending = {c: self._client.remote(
            self.source, int(c), cfg, c, round_, model, members[c].residual, self.tamper,
            self.options.cpus_per_client, self.options.gpus_per_client) for c in selected}
        try:
            for client in selected:
                ref = pending.pop(client)
                try:
                    # One call per client, in selection order: the others train meanwhile, and their
                    # results wait in the object store, not in the driver's memory.
                    report = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except ray.exceptions.GetTimeoutError:
                    pending[client] = ref
                    log.warning("round %d: the deadline passed with %d client(s) still training", round_,
                                len(pending))
                    return
                except ray.exceptions.RayTaskError as e:
                    # The client's own code raised (a data error, a bug): what the in-process backend
                    # raises, not a lost machine.
                    raise e.as_instanceof_cause() from None
                except self.lost as e:
                    yield client, f"its Ray worker was lost ({type(e).__name__}: {_first_line(e)})", None
                    continue
                yield client, report.update, report.where
        finally:
            for ref in pending.values():
                ray.cancel(ref)
            del model

    def evaluate(self, state: State) -> EvalResult:
        ref = self._evaluate.remote(self.test, self.spec, state, self.options.cpus_per_client,
                                    self.options.gpus_per_client)
        try:
            result: EvalResult = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None
        except self.lost as e:
            raise SimulationError(f"the workers evaluating the global model were lost three times "
                                  f"({type(e).__name__}); check the cluster and run the study again") from None
        return result


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]
