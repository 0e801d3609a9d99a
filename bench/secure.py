"""Secure aggregation against plain FedAvg, over the wire: a real fl-server, and clients that are
fl_client's own Federation (the code fl-client runs), each on a thread of this process, whose training
is a tiny fixed change so that the figure is the protocol's cost, not training's.

    python -m bench.secure [--clients 10 50]     # round time and bytes, over the wire
    python -m bench.secure --parity               # accuracy against FedAvg, 10 clients, 10 rounds, digits

For each client count and mode: the round's period (median, from one aggregation to the next, after the
first round) and the bytes each client sends per round (its update, or its masked vector, plus every
secure-aggregation stage message). Used by bench/run.py.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
from pathlib import Path

import torch

from common import convert, tensors
from common import messages as m
from fl_client.api import connect
from fl_client.task import Result, Task
from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess


def _count_bytes(federation, sent: list[int]) -> None:  # noqa: ANN001 - a Federation
    """Wrap the federation's connection so that `sent[0]` counts the bytes of every update and stage message."""
    connection = federation.connection
    submit, step = connection.submit, connection.secure_step

    def counted_submit(header: m.UpdateHeader, payload, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        sent[0] += sum(len(message) for message in convert.update_stream(header, payload, tensors.CHUNK_SIZE))
        return submit(header, payload, *args, **kwargs)

    def counted_step(req: m.SecAggRequest) -> m.SecAggReply:
        sent[0] += convert.secagg_request_to_proto(req).ByteSize()
        return step(req)

    connection.submit, connection.secure_step = counted_submit, counted_step


def measure(clients: int, secure: bool, workdir: Path, model: str = "mlp", rounds: int = 4) -> tuple[float, float]:
    """(seconds per round, bytes each client sends per round)."""
    out = workdir / f"{'secure' if secure else 'plain'}{clients}"
    server = ServerProcess(["--port", "0", "--out", str(out), "--model-name", model, "--rounds", str(rounds),
                            "--clients-per-round", str(clients), "--num-clients", str(clients), "--local-epochs", "1",
                            "--round-timeout", "600", "--secagg-stage-timeout", "120",
                            "--secure-aggregation", "true" if secure else "false"])
    sent = [[0] for _ in range(clients)]
    errors: list[BaseException] = []

    def train(task: Task) -> Result:
        return Result({k: v + 1e-3 if v.is_floating_point() else v for k, v in task.global_state.items()}, 100)

    def client(i: int) -> None:
        try:
            with connect(server.address, f"c{i}", insecure=True, device="cpu") as federation:
                _count_bytes(federation, sent[i])
                federation.run(train)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
    finally:
        server.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]!r}")
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r.aggregated]
    periods = [b.closed_at - a.closed_at for a, b in itertools.pairwise(records)]
    return statistics.median(periods), sum(s[0] for s in sent) / clients / rounds


def parity(clients: int = 10, rounds: int = 10) -> None:
    """Secure and plain FedAvg with the same seeds, in one process (fl_tools.simulation): the test accuracy
    after every round, and the largest difference between the final models' weights."""
    from common.datasets import load_digits
    from common.training import EvalResult
    from fl_tools import simulation

    train, test = load_digits()
    runs = {}
    for secure in (False, True):
        accuracy: list[float] = []
        finals: list[dict[str, torch.Tensor]] = []

        def record(_version: int, result: EvalResult, accuracy: list[float] = accuracy) -> None:
            accuracy.append(result.accuracy)

        simulation.run(train, test, clients=clients, rounds=rounds, model="mlp", secure_aggregation=secure,
                       on_round=record, on_final=finals.append)
        runs[secure] = accuracy, finals[0]
    for secure, (accuracy, _) in runs.items():
        print(f"{'secure' if secure else 'plain '}: " + " ".join(f"{a:.4f}" for a in accuracy))
    gap = max(abs(a - b) for a, b in zip(runs[False][0], runs[True][0]))
    difference = max(float((runs[False][1][k] - runs[True][1][k]).abs().max()) for k in runs[False][1])
    print(f"largest accuracy gap {gap:.4f}; final models differ by at most {difference:.2g} in a weight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--parity", action="store_true", help="the accuracy comparison instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.parity:
        parity()
        return
    with tempfile.TemporaryDirectory(prefix="fl-secure-") as tmp:
        for clients in args.clients:
            plain = measure(clients, False, Path(tmp))
            secure = measure(clients, True, Path(tmp))
            print(f"{clients} clients: round {plain[0]:.2f} s plain, {secure[0]:.2f} s secure "
                  f"({secure[0] / plain[0]:.2f}x); bytes per client per round {plain[1] / 1e3:.0f} kB plain, "
                  f"{secure[1] / 1e3:.0f} kB secure ({secure[1] / plain[1]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
