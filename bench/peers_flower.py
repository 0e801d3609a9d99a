"""The Flower side of `make bench-peers` (bench/peers.py), run by the Python of the Flower virtualenv
(bench/.peers-venv): Flower's legacy gRPC runtime, `flwr.server.start_server` and
`flwr.client.start_client`.

    python -m bench.peers_flower server --port P --clients N --rounds R --weights W.pt [--test T.npz] --out O.json
    python -m bench.peers_flower client --server HOST:PORT --shard shardI.npz --index I [--seed S] [...]
    python -m bench.peers_flower client --server HOST:PORT --noop --nudge K

It imports only flwr, torch, numpy and bench.small_mlp (plain PyTorch), never fedgrpc's packages: the
data shards, the test split and the initial weights come as files written by bench/peers.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

# torch is imported where it is used: the no-op clients never load it, which keeps 20 of them light.


def rss_kib() -> tuple[int, int]:
    """(current, peak) resident set size of this process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def serve(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415
    from flwr.common import ndarrays_to_parameters  # noqa: PLC0415 - flwr only in the Flower venv
    from flwr.server import ServerConfig, start_server  # noqa: PLC0415
    from flwr.server.strategy import FedAvg  # noqa: PLC0415
    from torch.nn import functional as F  # noqa: PLC0415

    from bench.small_mlp import SmallMLP  # noqa: PLC0415

    torch.set_num_threads(1)
    initial = torch.load(args.weights, weights_only=True)
    names = list(initial)
    closed_at: dict[int, float] = {}
    evaluations: dict[int, tuple[float, float]] = {}
    evaluate_fn = None
    if args.test:
        # The server's evaluation on the held-out test split after every round, as fl-server does.
        test = np.load(args.test)
        x, y = torch.from_numpy(test["x"]), torch.from_numpy(test["y"])
        model = SmallMLP(tuple(x.shape[1:]), 10)

        def evaluate_fn(server_round, arrays, config):
            model.load_state_dict(OrderedDict((n, torch.from_numpy(a)) for n, a in zip(names, arrays)))
            model.eval()
            with torch.no_grad():
                out = model(x)
                loss = float(F.cross_entropy(out, y))
                accuracy = float((out.argmax(1) == y).float().mean())
            evaluations[server_round] = (loss, accuracy)
            return loss, {"accuracy": accuracy}

    class TimedFedAvg(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} clients failed: {failures[:3]}")
            aggregated = super().aggregate_fit(server_round, results, failures)
            closed_at[server_round] = time.time()  # the new global model is ready, as fl-server's closed_at
            return aggregated

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.clients,
                           min_evaluate_clients=0, min_available_clients=args.clients, evaluate_fn=evaluate_fn,
                           on_fit_config_fn=lambda server_round: {"round": server_round}, accept_failures=False,
                           initial_parameters=ndarrays_to_parameters([t.numpy() for t in initial.values()]))
    del initial
    start_rss, _ = rss_kib()
    started = time.time()
    start_server(server_address=f"127.0.0.1:{args.port}", config=ServerConfig(num_rounds=args.rounds),
                 strategy=strategy)
    _, peak = rss_kib()
    Path(args.out).write_text(json.dumps({
        "started": started, "closed_at": {str(k): v for k, v in sorted(closed_at.items())},
        "evaluations": {str(k): v for k, v in sorted(evaluations.items())},
        "start_rss_kib": start_rss, "peak_rss_kib": peak}) + "\n")


class TrainingClient:
    """Trains SmallMLP on one shard exactly as fedgrpc's built-in client does (common.training.train with a
    BatchLoader): a fresh SGD each round, shuffled batches from a generator seeded by (client, round),
    cross-entropy, the sample count as the FedAvg weight."""

    def __init__(self, args: argparse.Namespace):
        import torch  # noqa: PLC0415

        from bench.small_mlp import SmallMLP  # noqa: PLC0415

        torch.set_num_threads(1)
        shard = np.load(args.shard)
        self.x, self.y = torch.from_numpy(shard["x"]), torch.from_numpy(shard["y"])
        self.model = SmallMLP(tuple(self.x.shape[1:]), 10)
        self.names = list(self.model.state_dict())
        self.args = args

    def fit(self, parameters, config):
        import torch  # noqa: PLC0415
        from torch.nn import functional as F  # noqa: PLC0415

        args = self.args
        self.model.load_state_dict(OrderedDict((n, torch.from_numpy(a)) for n, a in zip(self.names, parameters)))
        self.model.train()
        optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum)
        # fedgrpc's seed of a client's round (fl_client/round.py seed_for): seed + index + 100003 * round.
        generator = torch.Generator().manual_seed(args.seed + args.index + 100_003 * int(config["round"]))
        n = len(self.y)
        total = 0.0
        for _ in range(args.epochs):
            order, total = torch.randperm(n, generator=generator), 0.0
            for start in range(0, n, args.batch_size):
                rows = order[start:start + args.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self.x[rows]), self.y[rows])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
        return [t.detach().numpy() for t in self.model.state_dict().values()], n, {"train_loss": total / n}


class NoopClient:
    """Trains nothing: sends the received model back with one small tensor nudged (fedgrpc's no-op client,
    bench/peers_noop.py, nudges the same one)."""

    def __init__(self, args: argparse.Namespace):
        self.nudge = args.nudge

    def fit(self, parameters, config):
        parameters[self.nudge] = parameters[self.nudge] + np.float32(1e-3)
        return parameters, 100, {}


def client(args: argparse.Namespace) -> None:
    from flwr.client import NumPyClient, start_client  # noqa: PLC0415

    work = NoopClient(args) if args.noop else TrainingClient(args)

    class Client(NumPyClient):
        def get_parameters(self, config):
            return []  # never asked: the server starts from initial_parameters

        def fit(self, parameters, config):
            return work.fit(parameters, config)

    start_client(server_address=args.server, client=Client().to_client(), insecure=True)


def main(argv: list[str] | None = None) -> int:
    warnings.simplefilter("ignore", DeprecationWarning)
    parser = argparse.ArgumentParser(prog="bench.peers_flower")
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--weights", required=True, help="the initial state_dict (.pt)")
    s.add_argument("--test", help="test split (.npz with x, y): evaluate after every round")
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--shard")
    c.add_argument("--index", type=int, default=0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=0.05)
    c.add_argument("--momentum", type=float, default=0.9)
    c.add_argument("--noop", action="store_true")
    c.add_argument("--nudge", type=int, default=-1, help="no-op: the index of the array to nudge")
    args = parser.parse_args(argv)
    serve(args) if args.role == "server" else client(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
