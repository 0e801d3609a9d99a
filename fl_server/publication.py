"""Model publication: each version of the global model, encoded once, and whoever must hear of it.

The servicer subscribes and keeps its own cache of each version's serialized stream; other
subscribers (a secure-aggregation stage, a model registry) can follow the same way.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from common import tensors


@dataclass(frozen=True)
class ModelSnapshot:
    """One version of the global model."""

    version: int
    payload: tensors.Payload

    @property
    def round(self) -> int:
        """The round it is the starting point of."""
        return self.version + 1

    @property
    def checksum(self) -> int:
        """XXH3-64 of the state's bytes, computed once when the version was published."""
        return self.payload.checksum


class ModelPublisher:
    """Not thread-safe on its own: the round state publishes under its lock, so a reader of `current`
    never sees a version its subscribers have not been told of."""

    def __init__(self, state: Mapping[str, torch.Tensor], version: int):
        self.current = ModelSnapshot(version, tensors.encode(state))
        self._subscribers: list[Callable[[ModelSnapshot], None]] = []

    def subscribe(self, on_publish: Callable[[ModelSnapshot], None]) -> None:
        """`on_publish(snapshot)` runs now for the current version, then once per new version, as soon as
        it exists."""
        on_publish(self.current)
        self._subscribers.append(on_publish)

    def publish(self, state: Mapping[str, torch.Tensor], version: int) -> ModelSnapshot:
        snapshot = ModelSnapshot(version, tensors.encode(state))
        for on_publish in self._subscribers:
            on_publish(snapshot)
        self.current = snapshot
        return snapshot
