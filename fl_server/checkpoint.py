"""Crash-safe files in the run's output folder: checkpoint, metrics log and final model.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target,
so a `kill -9` at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from common import logs, tensors
from common.messages import ModelSpec
from fl_server.config import Config, config_hash
from fl_server.records import RoundRecord, to_jsonl

log = logging.getLogger("fl_server.checkpoint")

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
FINAL_MODEL = "final_model.pt"
MODEL_CHECKSUM = "model_checksum"  # XXH3-64 of the checkpoint's model, as common.tensors frames it


class CheckpointError(ValueError):
    pass


@dataclass
class Checkpoint:
    """Everything a restarted server resumes from. In the file it is a dict of plain values and tensors
    (`to_dict`), which torch.load reads with weights_only; keys added since the first version are
    optional, so that older checkpoints still load."""

    model: dict[str, torch.Tensor]
    model_version: int
    rng_state: Mapping[str, Any]  # the round sampler's (numpy bit generator state)
    server_optimizer: dict[str, Any] = field(default_factory=dict)
    # The round records: in the file, only how many there are (metrics_count); the records themselves are
    # metrics.jsonl's first lines, written before the checkpoint. A checkpoint holding every record cost
    # 14 us a record to save, each round: 15 ms a round after 1,000 rounds, 150 ms after 10,000.
    metrics: list[RoundRecord] = field(default_factory=list)
    config_hash: str | None = None
    model_spec: ModelSpec | None = None
    # How many records metrics.jsonl holds for this checkpoint; None: the file carries `metrics` itself (the
    # coordinator's fallback when the log could not be written, and checkpoints older than the count).
    metrics_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        records: dict[str, Any] = ({"metrics": [r.to_dict() for r in self.metrics]} if self.metrics_count is None
                                   else {"metrics_count": self.metrics_count})
        return {"model": self.model, "model_version": self.model_version, "rng_state": self.rng_state,
                "server_optimizer": self.server_optimizer, **records,
                "config_hash": self.config_hash, "model_spec": _spec_list(self.model_spec)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Checkpoint:
        spec = data.get("model_spec")
        # Checkpoints written before metrics_count hold the records themselves.
        old = "metrics" in data
        return cls(model=data["model"], model_version=data["model_version"], rng_state=data["rng_state"],
                   server_optimizer=data.get("server_optimizer", {}),
                   metrics=[RoundRecord.from_dict(r) for r in data["metrics"]] if old else [],
                   metrics_count=None if old else int(data["metrics_count"]), config_hash=data.get("config_hash"),
                   model_spec=None if spec is None else ModelSpec(spec[0], tuple(spec[1]), spec[2]))

    def resume_error(self, cfg: Config, spec: ModelSpec, allow_config_change: bool = False) -> str | None:
        """Why a server with `cfg` and model `spec` must not resume from this checkpoint, in one sentence."""
        if self.model_spec != spec:
            return (f"the checkpoint in {cfg.out} holds a {_spec_list(self.model_spec)} model, not "
                    f"{_spec_list(spec)}; use another --out or the original settings")
        if self.config_hash != config_hash(cfg) and not allow_config_change:
            return (f"the checkpoint in {cfg.out} was made with other training settings; use another --out, "
                    "the original settings, or --allow-config-change")
        return None


def _spec_list(spec: ModelSpec | None) -> list[Any] | None:
    return None if spec is None else [spec.name, list(spec.input_shape), spec.num_classes]


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
        self._metrics_written: int | None = None  # records this folder's metrics.jsonl holds, as written here

    def save_checkpoint(self, checkpoint: Checkpoint, model_checksum: int | None = None) -> None:
        """`model_checksum`: the XXH3 of checkpoint.model as common.tensors frames it, when the caller has it
        already (RoundState.global_checksum); computed here otherwise.

        torch.load does not verify the CRC-32s that torch.save computes (a flipped byte in a tensor loads
        silently), and in a scratch timing they were 27 of the 51 ms of saving a 45 MB model. The model's
        XXH3 is checked on load instead."""
        if model_checksum is None:
            model_checksum = tensors.encode(checkpoint.model).checksum
        data = {**checkpoint.to_dict(), MODEL_CHECKSUM: model_checksum}
        write_atomically(self.path / CHECKPOINT, _torch_writer(data, crc32=False))

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            # weights_only: a checkpoint is data; never let a file in the output folder run code.
            data = torch.load(path, weights_only=True)
            checksum = data.pop(MODEL_CHECKSUM, None)
            checkpoint = Checkpoint.from_dict(data)
        except Exception as e:  # torch raises many kinds for a damaged or foreign file; all mean the same here
            reason = logs.brief(e)
            raise CheckpointError(f"checkpoint {path} is unreadable ({reason}); move it away to start afresh, "
                                  "or point --out elsewhere") from None
        # Checkpoints written before the checksum was added have none; they load as they did.
        if checksum is not None and tensors.encode(checkpoint.model).checksum != checksum:
            raise CheckpointError(f"checkpoint {path} is damaged: its model does not match the checksum saved with "
                                  "it; move it away to start afresh, or point --out elsewhere")
        if checkpoint.metrics_count is not None:
            checkpoint.metrics = self._logged_records(checkpoint.metrics_count)
            checkpoint.metrics_count = None
        return checkpoint

    def _logged_records(self, count: int) -> list[RoundRecord]:
        """The first `count` records of metrics.jsonl: the checkpoint's. Lines after them (rounds after the
        checkpoint, or one cut short by a crash) are left out; the resumed run rewrites the log from these."""
        path = self.path / METRICS
        lines = path.read_text().splitlines()[:count] if path.exists() else []
        records = []
        for line in lines:
            try:
                records.append(RoundRecord.from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError):
                break  # the good lines before a damaged one are kept
        if len(records) < count:
            kept = ""
            if path.exists():  # the resumed run rewrites the log: what was there is kept aside, not lost
                kept = f"; the file as it was is kept as {path.name}.damaged"
                os.replace(path, path.with_name(path.name + ".damaged"))
            log.warning("%s holds %d of the checkpoint's %d round records (moved, cut short or damaged); the "
                        "history before this resume is incomplete%s", path, len(records), count, kept)
        return records

    def write_metrics(self, records: list[RoundRecord]) -> None:
        """Rewrite the whole log from the checkpoint's records, so it always agrees with the checkpoint."""
        self._metrics_written = None  # until the new file is in place
        write_atomically(self.path / METRICS, to_jsonl(records).encode())
        self._metrics_written = len(records)

    def append_metrics(self, records: list[RoundRecord]) -> None:
        """Add to the log the records after those this folder wrote last, which must not have changed since
        (the coordinator changes a record only before its first write, or after a restart, when it
        rewrites the log). The first write of a run rewrites the log whole, so that a resumed run's log
        agrees with its checkpoint. Appending keeps a round's write the size of its line: rewriting the
        whole log every round made a long run's rounds slower and slower (a 1,000-round run rewrote 300
        kB and its fsync each round)."""
        written = self._metrics_written
        if written is None or written > len(records):
            self.write_metrics(records)
            return
        self._metrics_written = None  # a failure part-way leaves the file unknown: the next write rewrites it
        with open(self.path / METRICS, "ab") as f:
            f.write(to_jsonl(records[written:]).encode())
            f.flush()
            os.fsync(f.fileno())
        self._metrics_written = len(records)

    def save_final_model(self, state: dict[str, torch.Tensor]) -> Path:
        path = self.path / FINAL_MODEL
        write_atomically(path, _torch_writer(state))
        return path
