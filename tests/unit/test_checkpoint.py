"""The checkpoint file: what it returns, that a damaged model is refused rather than resumed from, and
when a checkpoint may be resumed under the current settings."""
import dataclasses

import numpy as np
import pytest
import torch

from common import tensors
from common.messages import ModelSpec
from common.models import build_model
from fl_server.checkpoint import CHECKPOINT, Checkpoint, CheckpointError, RunFolder
from fl_server.config import config_hash, load
from fl_server.records import RoundRecord, read_jsonl

SPEC = ModelSpec("mlp", (1, 8, 8), 10)


def _checkpoint(**changes):
    checkpoint = Checkpoint(
        model=build_model(SPEC, seed=0).state_dict(), model_version=3,
        rng_state=np.random.default_rng(7).bit_generator.state, server_optimizer={"step": 2, "m": {"w": torch.ones(3)}},
        metrics=[RoundRecord(round=1, accuracy=0.5, loss=1.25, clients=["0", "1"], epsilon=2.0, delta=1e-5),
                 RoundRecord(round=2, aggregated=False, selected=["2"], dropped=["2"])],
        config_hash=config_hash(load(model_name="mlp")), model_spec=SPEC)
    return dataclasses.replace(checkpoint, **changes)


def _same(a: Checkpoint, b: Checkpoint) -> bool:
    return (a.model.keys() == b.model.keys() and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
            and torch.equal(a.server_optimizer["m"]["w"], b.server_optimizer["m"]["w"])
            and (a.model_version, a.rng_state, a.metrics, a.config_hash, a.model_spec)
            == (b.model_version, b.rng_state, b.metrics, b.config_hash, b.model_spec))


def _save(folder: RunFolder, checkpoint: Checkpoint) -> None:
    """As the coordinator saves a round: its records to metrics.jsonl first, then the checkpoint."""
    folder.append_metrics(checkpoint.metrics)
    folder.save_checkpoint(dataclasses.replace(checkpoint, metrics_count=len(checkpoint.metrics)))


def test_checkpoint_loads_back_as_saved(tmp_path):
    saved = _checkpoint()
    _save(RunFolder(tmp_path), saved)
    loaded = RunFolder(tmp_path).load_checkpoint()
    assert _same(loaded, saved)
    rng = np.random.default_rng()
    rng.bit_generator.state = loaded.rng_state
    assert rng.integers(1 << 30) == np.random.default_rng(7).integers(1 << 30)


def test_the_file_is_a_dict_of_plain_values_and_counts_the_records_in_the_log(tmp_path):
    """The file's keys: the records are not in it, only their number (metrics_count); a checkpoint written
    before that, with the records in it ("metrics"), still loads them from itself."""
    saved = _checkpoint()
    _save(RunFolder(tmp_path), saved)
    raw = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert list(raw) == ["model", "model_version", "rng_state", "server_optimizer", "metrics_count", "config_hash",
                        "model_spec", "model_checksum"]
    assert raw["model_spec"] == ["mlp", [1, 8, 8], 10] and raw["metrics_count"] == 2
    torch.save(raw, tmp_path / CHECKPOINT)
    assert _same(RunFolder(tmp_path).load_checkpoint(), saved)
    older = {k: v for k, v in raw.items() if k != "metrics_count"}
    older["metrics"] = [r.to_dict() for r in saved.metrics]
    (tmp_path / "metrics.jsonl").unlink()
    torch.save(older, tmp_path / CHECKPOINT)
    assert _same(RunFolder(tmp_path).load_checkpoint(), saved)


def test_a_resumed_checkpoint_takes_its_records_from_the_log_and_no_more(tmp_path, caplog):
    saved = _checkpoint()
    folder = RunFolder(tmp_path)
    _save(folder, saved)
    # A crash after the next round's line reached the log (cut short, too), before its checkpoint did.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"round": 3, "aggregated": true}\n{"round": 4, "aggre')
    assert RunFolder(tmp_path).load_checkpoint().metrics == saved.metrics
    # A log that lost lines: what is there is kept, and the loss said.
    first = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    (tmp_path / "metrics.jsonl").write_text(first + "\n{damaged\n")
    assert RunFolder(tmp_path).load_checkpoint().metrics == saved.metrics[:1]
    assert "holds 1 of the checkpoint's 2 round records" in caplog.text
    assert (tmp_path / "metrics.jsonl.damaged").read_text() == first + "\n{damaged\n"  # kept, not rewritten


def test_a_checkpoint_without_the_later_keys_still_loads(tmp_path):
    # As written before the checksum, the server optimizer, the config hash and the model spec existed.
    saved = _checkpoint()
    raw = {"model": saved.model, "model_version": 3, "rng_state": saved.rng_state, "metrics": [{"round": 1}]}
    torch.save(raw, tmp_path / CHECKPOINT)
    loaded = RunFolder(tmp_path).load_checkpoint()
    assert loaded.model_version == 3 and loaded.server_optimizer == {}
    assert loaded.config_hash is None and loaded.model_spec is None and loaded.metrics == [RoundRecord(round=1)]


def test_a_flipped_byte_in_the_model_is_refused(tmp_path):
    saved = _checkpoint()
    RunFolder(tmp_path).save_checkpoint(saved)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    weights = next(t for t in saved.model.values() if t.numel() > 100).numpy().tobytes()
    at = data.find(weights[:256])
    assert at > 0, "the tensor's bytes are stored as they are"
    data[at + 100] ^= 0x01
    path.write_bytes(bytes(data))
    # torch.load alone would return the wrong weights without a word.
    with pytest.raises(CheckpointError, match="is damaged.*move it away"):
        RunFolder(tmp_path).load_checkpoint()


def test_a_checksum_the_caller_already_has_is_the_one_saved(tmp_path):
    saved = _checkpoint()
    RunFolder(tmp_path).save_checkpoint(saved, model_checksum=tensors.encode(saved.model).checksum)
    assert RunFolder(tmp_path).load_checkpoint().model_version == 3
    RunFolder(tmp_path).save_checkpoint(saved, model_checksum=12345)  # not this model's
    with pytest.raises(CheckpointError, match="is damaged"):
        RunFolder(tmp_path).load_checkpoint()


def test_a_file_that_is_not_a_checkpoint_is_unreadable(tmp_path):
    torch.save({"model": {}, "model_version": 1}, tmp_path / CHECKPOINT)  # no rng_state, no metrics
    with pytest.raises(CheckpointError, match="unreadable.*move it away"):
        RunFolder(tmp_path).load_checkpoint()


def test_resume_errors_say_what_differs(tmp_path):
    checkpoint = _checkpoint()
    cfg = load(model_name="mlp", out=str(tmp_path))
    assert checkpoint.resume_error(cfg, SPEC) is None
    assert checkpoint.resume_error(load(model_name="mlp", rounds=50, port=1234, out=str(tmp_path)), SPEC) is None
    other = load(model_name="mlp", lr=0.5, out=str(tmp_path))
    assert checkpoint.resume_error(other, SPEC) == (
        f"the checkpoint in {tmp_path} was made with other training settings; use another --out, the original "
        "settings, or --allow-config-change")
    assert checkpoint.resume_error(other, SPEC, allow_config_change=True) is None
    assert checkpoint.resume_error(cfg, ModelSpec("cnn", (1, 8, 8), 10), allow_config_change=True) == (
        f"the checkpoint in {tmp_path} holds a ['mlp', [1, 8, 8], 10] model, not ['cnn', [1, 8, 8], 10]; use "
        "another --out or the original settings")


def test_the_metrics_log_is_rewritten_once_a_run_then_appended_to(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 9}\n')  # a log past the checkpoint (a crash after it)
    folder = RunFolder(tmp_path)
    records = [RoundRecord(round=1)]
    folder.append_metrics(records)  # a run's first write replaces the log with the checkpoint's records
    assert [r.round for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    records.append(RoundRecord(round=2))
    size = (tmp_path / "metrics.jsonl").stat().st_size
    folder.append_metrics(records)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert [r.round for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert len(text) > size and text.count("\n") == 2
    # Fewer records than written (never in a run, but safe): the log is rewritten from them.
    folder.append_metrics(records[:1])
    assert [r.round for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
