"""The checkpoint file: what it returns, and that a damaged model is refused rather than resumed from."""
import pytest
import torch

from common import tensors
from common.messages import ModelSpec
from common.models import build_model
from fl_server.checkpoint import CHECKPOINT, CheckpointError, RunFolder


def _checkpoint():
    return {"model": build_model(ModelSpec("mlp", (1, 8, 8), 10), seed=0).state_dict(), "model_version": 3,
            "metrics": [{"round": 1}]}


def test_checkpoint_loads_back_as_saved(tmp_path):
    saved = _checkpoint()
    RunFolder(tmp_path).save_checkpoint(saved)
    loaded = RunFolder(tmp_path).load_checkpoint()
    assert loaded.keys() == saved.keys()  # the checksum stays inside the file
    assert all(torch.equal(loaded["model"][k], v) for k, v in saved["model"].items())
    assert loaded["model_version"] == 3 and loaded["metrics"] == [{"round": 1}]


def test_a_flipped_byte_in_the_model_is_refused(tmp_path):
    saved = _checkpoint()
    RunFolder(tmp_path).save_checkpoint(saved)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    weights = next(t for t in saved["model"].values() if t.numel() > 100).numpy().tobytes()
    at = data.find(weights[:256])
    assert at > 0, "the tensor's bytes are stored as they are"
    data[at + 100] ^= 0x01
    path.write_bytes(bytes(data))
    # torch.load alone would return the wrong weights without a word.
    with pytest.raises(CheckpointError, match="is damaged.*move it away"):
        RunFolder(tmp_path).load_checkpoint()


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path):
    saved = _checkpoint()
    torch.save(saved, tmp_path / CHECKPOINT)  # as written before the checksum existed
    assert RunFolder(tmp_path).load_checkpoint()["model_version"] == 3


def test_a_checksum_the_caller_already_has_is_the_one_saved(tmp_path):
    saved = _checkpoint()
    RunFolder(tmp_path).save_checkpoint(saved, model_checksum=tensors.encode(saved["model"]).checksum)
    assert RunFolder(tmp_path).load_checkpoint()["model_version"] == 3
    RunFolder(tmp_path).save_checkpoint(saved, model_checksum=12345)  # not this model's
    with pytest.raises(CheckpointError, match="is damaged"):
        RunFolder(tmp_path).load_checkpoint()
