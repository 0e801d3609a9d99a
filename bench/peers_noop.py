"""The large workload's no-op client for fedgrpc in `make bench-peers`: `fl-client --app
bench.peers_noop:train`. It trains nothing and sends back the global model with its last floating-point
tensor nudged (ResNet-18's final bias, 10 values), as the Flower no-op client in bench/peers_flower.py does."""
from __future__ import annotations

import fl_client


def train(task: fl_client.Task) -> fl_client.Result:
    state = dict(task.global_state)
    name = [n for n, t in state.items() if t.is_floating_point()][-1]
    state[name] = state[name] + 1e-3
    return fl_client.Result(state, num_samples=100)
