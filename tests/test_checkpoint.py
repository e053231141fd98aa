import json
import os

import pytest
import torch
from torch import nn

from minidalle2.lab import checkpoint
from minidalle2.lab.checkpoint import (CheckpointError, atomic_write_bytes, atomic_write_json, load_checkpoint, load_model,
                                   load_state_into, save_checkpoint, save_model)


class TinyNet(nn.Module):
    def __init__(self, width=4, tied=False):
        super().__init__()
        self.config = dict(width=width, tied=tied)
        self.emb = nn.Embedding(5, width)
        self.head = nn.Linear(width, 5, bias=False)
        if tied:
            self.head.weight = self.emb.weight  # shared storage: safetensors would refuse it
        self.norm = nn.LayerNorm(width)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.arange(5), "scalar": torch.tensor(2.5),
            "half": torch.randn(2, generator=g).bfloat16()}


def test_round_trip(tmp_path):
    tensors, meta = sample_tensors(), {"kind": "thing", "config": {"x": [1, 2]}, "step": 7}
    save_checkpoint(tmp_path / "ck", tensors, meta)
    assert (tmp_path / "ck.safetensors").exists() and (tmp_path / "ck.json").exists()
    loaded, loaded_meta = load_checkpoint(tmp_path / "ck.safetensors", expected_kind="thing")
    assert loaded.keys() == tensors.keys()
    for k in tensors:
        assert loaded[k].dtype == tensors[k].dtype and torch.equal(loaded[k], tensors[k])
    assert {k: loaded_meta[k] for k in meta} == meta
    assert loaded_meta["format"] == checkpoint.FORMAT and len(loaded_meta["sha256"]) == 64


def test_model_round_trip_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(width=6, tied=True)
    save_model(model, tmp_path / "net", kind="tiny", extra_meta={"step": 3})
    again = load_model(tmp_path / "net", TinyNet, expected_kind="tiny")
    assert again.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert again.head.weight is again.emb.weight  # still tied after loading


def save_version1(path, tensors, meta):
    """A checkpoint in the version-1 layout (tensors in X.safetensors; metadata and their sha256 only in X.json)."""
    import hashlib
    import safetensors.torch
    data = safetensors.torch.save(tensors)
    (path.parent / f"{path.name}.safetensors").write_bytes(data)
    (path.parent / f"{path.name}.json").write_text(json.dumps(
        {"format": checkpoint.FORMAT, "version": 1, "sha256": hashlib.sha256(data).hexdigest(), **meta}))


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "ck", sample_tensors(), {"kind": "x"})
    os.remove(tmp_path / "ck.json")       # only a copy for people: the metadata is inside the file
    assert load_checkpoint(tmp_path / "ck")[1]["kind"] == "x"
    save_version1(tmp_path / "v1", sample_tensors(), {"kind": "x"})
    assert load_checkpoint(tmp_path / "v1")[1]["kind"] == "x"        # version-1 checkpoints still load
    os.remove(tmp_path / "v1.json")
    with pytest.raises(CheckpointError, match=r"v1\.json"):
        load_checkpoint(tmp_path / "v1")


def test_unparsable_json(tmp_path):
    save_checkpoint(tmp_path / "ck", sample_tensors(), {"kind": "x"})
    (tmp_path / "ck.json").write_text("{ not json")
    assert load_checkpoint(tmp_path / "ck")[1]["kind"] == "x"        # loading never trusts the copy
    save_version1(tmp_path / "v1", sample_tensors(), {"kind": "x"})
    (tmp_path / "v1.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "v1")


def test_truncated_file(tmp_path):
    save_checkpoint(tmp_path / "ck", sample_tensors(), {"kind": "x"})
    data = (tmp_path / "ck.safetensors").read_bytes()
    (tmp_path / "ck.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ck\.safetensors.*corrupt or truncated"):
        load_checkpoint(tmp_path / "ck")


def test_flipped_byte(tmp_path):
    save_checkpoint(tmp_path / "ck", sample_tensors(), {"kind": "x"})
    data = bytearray((tmp_path / "ck.safetensors").read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: safetensors alone would load it happily
    (tmp_path / "ck.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_unreadable_safetensors_with_matching_hash(tmp_path):
    save_version1(tmp_path / "ck", sample_tensors(), {"kind": "x"})
    junk = b"this is not a safetensors file"
    (tmp_path / "ck.safetensors").write_bytes(junk)
    meta = json.loads((tmp_path / "ck.json").read_text())
    meta["sha256"] = __import__("hashlib").sha256(junk).hexdigest()
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_wrong_kind(tmp_path):
    save_model(TinyNet(), tmp_path / "net", kind="vae")
    with pytest.raises(CheckpointError, match=r"holds a 'vae', expected 'oracle'"):
        load_model(tmp_path / "net", TinyNet, expected_kind="oracle")


def test_mismatched_shapes_name_the_key(tmp_path):
    save_model(TinyNet(width=4), tmp_path / "net", kind="tiny")
    with pytest.raises(CheckpointError, match=r"emb\.weight: checkpoint \(5, 4\) vs model \(5, 8\)"):
        load_state_into(TinyNet(width=8), tmp_path / "net", expected_kind="tiny")


def test_missing_and_unexpected_keys(tmp_path):
    save_checkpoint(tmp_path / "ck", {"emb.weight": torch.zeros(5, 4), "extra": torch.zeros(1)},
                    {"kind": "tiny", "config": {"width": 4}})
    with pytest.raises(CheckpointError) as info:
        load_state_into(TinyNet(width=4), tmp_path / "ck")
    assert "missing head.weight" in str(info.value) and "unexpected extra" in str(info.value)


def test_config_must_be_json(tmp_path):
    model = TinyNet()
    model.config = {"act": nn.ReLU}
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_model(model, tmp_path / "net", kind="tiny")
    assert not list(tmp_path.iterdir())  # nothing half-written


def _files(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("fail_at", ["serialise", "replace"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    old = {"w": torch.ones(3)}
    save_checkpoint(tmp_path / "ck", old, {"kind": "x", "step": 1})
    assert _files(tmp_path) == ["ck.json", "ck.safetensors"]

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")
    if fail_at == "serialise":
        monkeypatch.setattr(checkpoint.safetensors.torch, "save", boom)
    else:
        monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ck", {"w": torch.zeros(3)}, {"kind": "x", "step": 2})
    monkeypatch.undo()

    assert _files(tmp_path) == ["ck.json", "ck.safetensors"]  # no stray temp file
    tensors, meta = load_checkpoint(tmp_path / "ck")
    assert meta["step"] == 1 and torch.equal(tensors["w"], old["w"])


def test_atomic_write_json(tmp_path):
    atomic_write_json(tmp_path / "sub" / "a.json", {"b": [1, 2.5, None]})
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"b": [1, 2.5, None]}


def test_written_files_get_the_usual_permissions(tmp_path):
    # mkstemp creates 0600 files; shipped weights must stay readable by other users
    atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o666 & ~checkpoint._UMASK
