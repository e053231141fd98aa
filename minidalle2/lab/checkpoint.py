"""
Checkpoints: tensors in a safetensors file, everything else in a JSON file beside it.

    X.safetensors   the tensors (no pickle: loading a checkpoint can never run code)
    X.json          format, version, sha256 of X.safetensors, and the caller's metadata
                    (kind, config, step, ...)

Both files are written atomically (temp file in the same directory, fsync, os.replace), the
JSON last. Since the JSON holds the sha256 of the tensors, a crash between the two writes, a
truncated download or a flipped bit is detected on load instead of producing garbage weights.

A model is an nn.Module with a JSON-serialisable `config` dict of constructor kwargs, so
`type(model)(**model.config)` rebuilds it; save_model/load_model rely on that.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors.torch

FORMAT = "minidalle2-checkpoint"
VERSION = 1
_RESERVED = ("format", "version", "sha256", "tensors_file")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit what was asked of it."""


# -----------------------------------------------------------------------------
# atomic writes

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def checkpoint_paths(path) -> tuple[Path, Path]:
    """'runs/x', 'runs/x.safetensors' or 'runs/x.json' -> (runs/x.safetensors, runs/x.json)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def checkpoint_exists(path) -> bool:
    return any(p.exists() for p in checkpoint_paths(path))


# -----------------------------------------------------------------------------
# raw tensors + metadata

def save_checkpoint(path, tensors: dict, meta: dict) -> None:
    st_path, json_path = checkpoint_paths(path)
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise CheckpointError(f"cannot save {json_path}: metadata keys {clash} are reserved")
    try:
        meta_text = json.dumps(meta)  # fail before touching the disk
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save {json_path}: metadata is not JSON-serialisable ({e})") from None
    # clone: safetensors refuses tensors that share memory (tied weights, views of one buffer)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    data = safetensors.torch.save(tensors)
    full_meta = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(data).hexdigest(),
                 "tensors_file": st_path.name, **json.loads(meta_text)}
    atomic_write_bytes(st_path, data)
    atomic_write_json(json_path, full_meta)  # last: it vouches for the tensors via the sha256


def load_checkpoint(path, expected_kind=None) -> tuple[dict, dict]:
    """Return (tensors, meta), or raise CheckpointError saying which file is wrong and how."""
    st_path, json_path = checkpoint_paths(path)
    if not st_path.exists():
        raise CheckpointError(f"checkpoint {st_path} not found")
    if not json_path.exists():
        raise CheckpointError(f"checkpoint {st_path} has no metadata file {json_path} (interrupted save?)")
    try:
        meta = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {json_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a {FORMAT} metadata file")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{json_path} has format version {meta['version']}; this code reads "
                              f"up to {VERSION}, upgrade minidalle2")
    if expected_kind is not None and meta.get("kind") != expected_kind:
        raise CheckpointError(f"checkpoint {st_path} holds a {meta.get('kind')!r}, "
                              f"expected {expected_kind!r}")
    data = st_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {st_path} is corrupt or truncated: its sha256 does not "
                              f"match the one recorded in {json_path}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointError(f"checkpoint {st_path} is not a readable safetensors file ({e})") from None
    return tensors, meta


# -----------------------------------------------------------------------------
# models

def model_config(model) -> dict:
    """The model's constructor kwargs, checked to survive a JSON round trip."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise CheckpointError(f"{type(model).__name__} has no `config` dict of constructor kwargs, "
                              "so it cannot be rebuilt from a checkpoint")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{type(model).__name__}.config is not JSON-serialisable ({e}): "
                              "keep it to numbers, strings, bools, None, lists and dicts") from None
    return config


def save_model(model, path, kind: str, extra_meta=None) -> None:
    meta = {"kind": kind, "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": model_config(model), **(extra_meta or {})}
    save_checkpoint(path, model.state_dict(), meta)


def load_state_dict_strict(model, state: dict, source) -> None:
    """load_state_dict(strict=True), but mismatches become a short CheckpointError naming keys."""
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: "
                              + "; ".join(problems[:5]) + more)
    model.load_state_dict(state, strict=True)


def load_state_into(model, path, expected_kind=None) -> dict:
    """Load a checkpoint's weights into an existing model; return the metadata."""
    tensors, meta = load_checkpoint(path, expected_kind)
    load_state_dict_strict(model, tensors, checkpoint_paths(path)[0])
    return meta


def load_model(path, cls_or_factory, expected_kind=None):
    """Rebuild a model from meta['config'] with `cls_or_factory(**config)` and load its weights."""
    tensors, meta = load_checkpoint(path, expected_kind)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"checkpoint {checkpoint_paths(path)[1]} has no model config")
    model = cls_or_factory(**meta["config"])
    load_state_dict_strict(model, tensors, checkpoint_paths(path)[0])
    return model
