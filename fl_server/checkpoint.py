"""Crash-safe files in the run's output folder: checkpoint, metrics log and final model.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target,
so a `kill -9` at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Callable

import torch

from common import logs, tensors
from fl_server.records import RoundRecord, to_jsonl

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL_MODEL = "final_model.pt"
MODEL_CHECKSUM = "model_checksum"  # XXH3-64 of the checkpoint's model, as common.tensors frames it

class CheckpointError(ValueError):
    pass


def write_atomically(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """`data`: the bytes, or a function that writes them to the open file (so that a model is written
    straight from its tensors instead of being assembled in memory first)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _torch_writer(obj: Any, crc32: bool = True) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        if crc32 or not hasattr(torch.serialization, "set_crc32_options"):  # torch < 2.6 always computes them
            torch.save(obj, f)
            return
        before = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(obj, f)
        finally:
            torch.serialization.set_crc32_options(before)

    return write


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], model_checksum: int | None = None) -> None:
        """`model_checksum`: the XXH3 of checkpoint["model"] as common.tensors frames it, when the caller
        has it already (RoundState.global_checksum); computed here otherwise.

        torch.load does not verify the CRC-32s that torch.save computes (a flipped byte in a tensor loads
        silently), and in a scratch timing they were 27 of the 51 ms of saving a 45 MB model. The model's
        XXH3 is checked on load instead."""
        if model_checksum is None:
            model_checksum = tensors.encode(checkpoint["model"]).checksum
        checkpoint = {**checkpoint, MODEL_CHECKSUM: model_checksum}
        write_atomically(self.path / CHECKPOINT, _torch_writer(checkpoint, crc32=False))

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            # weights_only: a checkpoint is data; never let a file in the output folder run code.
            checkpoint = torch.load(path, weights_only=True)
            model = checkpoint["model"]
        except Exception as e:  # torch raises many kinds for a damaged or foreign file; all mean the same here
            reason = logs.brief(e)
            raise CheckpointError(f"checkpoint {path} is unreadable ({reason}); move it away to start afresh, "
                                  "or point --out elsewhere") from None
        # Checkpoints written before the checksum was added have none; they load as they did.
        if MODEL_CHECKSUM in checkpoint and tensors.encode(model).checksum != checkpoint.pop(MODEL_CHECKSUM):
            raise CheckpointError(f"checkpoint {path} is damaged: its model does not match the checksum saved with "
                                  "it; move it away to start afresh, or point --out elsewhere")
        return checkpoint

    def write_metrics(self, records: list[RoundRecord]) -> None:
        """Rewrite the whole log from the checkpoint's records, so it always agrees with the checkpoint."""
        write_atomically(self.path / METRICS, to_jsonl(records).encode())

    def save_final_model(self, state: dict[str, torch.Tensor]) -> Path:
        path = self.path / FINAL_MODEL
        write_atomically(path, _torch_writer(state))
        return path
