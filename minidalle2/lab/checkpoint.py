"""
Checkpoints: one safetensors file that holds the tensors and the metadata, and a JSON copy beside it.

    X.safetensors   the tensors, and in its header the metadata (format, version, sha256, kind, config,
                    step, ...): no pickle, so loading a checkpoint can never run code
    X.json          the same metadata, for people and tools to read; loading never trusts it

The file is written to a temporary name in the same directory, fsynced and renamed over X.safetensors
in one step, so a kill at any moment leaves the previous checkpoint or the new one, never a mix of
the two. The sha256 covers the tensors and the metadata, so a truncated copy or a flipped bit is
detected on load instead of producing garbage weights. Temporary files of a writer that was killed
are removed by the next save or load of the same checkpoint. (Checkpoints of version 1 -- tensors in
X.safetensors, metadata and the tensors' sha256 only in X.json -- still load.)

A model is an nn.Module with a JSON-serialisable `config` dict of constructor kwargs, so
`type(model)(**model.config)` rebuilds it; save_model/load_model rely on that.
"""

import hashlib
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import safetensors.torch

FORMAT = "minidalle2-checkpoint"
VERSION = 2
_RESERVED = ("format", "version", "sha256", "tensors_file")
_HEADER_KEY = "minidalle2"          # the safetensors header's __metadata__ entry that holds ours


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit what was asked of it."""


# -----------------------------------------------------------------------------
# atomic writes

def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Delete the temporary files that writers of `path` left when they were killed (their process is gone)."""
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path)) + r"(\d+)\.[^.]+\.tmp$")
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.iterdir():
            m = pattern.match(tmp.name)
            if m and not _alive(int(m.group(1))):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp")
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

def _digest(tensor_bytes: bytes, meta_text: str) -> str:
    """sha256 over the tensors (safetensors bytes without metadata) and the metadata (canonical JSON)."""
    return hashlib.sha256(tensor_bytes + b"\0" + meta_text.encode()).hexdigest()


def _canonical(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"))


def save_checkpoint(path, tensors: dict, meta: dict) -> None:
    st_path, json_path = checkpoint_paths(path)
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise CheckpointError(f"cannot save {st_path}: metadata keys {clash} are reserved")
    try:
        meta = json.loads(json.dumps(meta))  # fail before touching the disk; what a load will give back
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save {st_path}: metadata is not JSON-serialisable ({e})") from None
    # clone: safetensors refuses tensors that share memory (tied weights, views of one buffer)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    full_meta = {"format": FORMAT, "version": VERSION, "tensors_file": st_path.name, **meta}
    full_meta["sha256"] = _digest(safetensors.torch.save(tensors), _canonical(full_meta))
    atomic_write_bytes(st_path, safetensors.torch.save(tensors, metadata={_HEADER_KEY: _canonical(full_meta)}))
    atomic_write_json(json_path, full_meta)  # a copy for people; a kill before this line loses nothing


def _header_metadata(data: bytes, st_path) -> dict | None:
    """Our metadata from a safetensors header, or None if the file has none (a version-1 checkpoint)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {st_path} is corrupt or truncated: not a readable safetensors file "
                              "(its header cannot be read)") from None
    text = (header.get("__metadata__") or {}).get(_HEADER_KEY) if isinstance(header, dict) else None
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise CheckpointError(f"checkpoint {st_path} is corrupt: its metadata is not valid JSON") from None


def load_checkpoint(path, expected_kind=None) -> tuple[dict, dict]:
    """Return (tensors, meta), or raise CheckpointError saying which file is wrong and how."""
    st_path, json_path = checkpoint_paths(path)
    remove_stale_temps(st_path)
    remove_stale_temps(json_path)
    if not st_path.exists():
        raise CheckpointError(f"checkpoint {st_path} not found")
    data = st_path.read_bytes()
    meta = _header_metadata(data, st_path)
    if meta is None:                                    # version 1: the metadata lives in the JSON file
        meta = _version1_metadata(json_path, st_path, data)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{st_path} is not a {FORMAT} checkpoint")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{st_path} has format version {meta['version']}; this code reads "
                              f"up to {VERSION}, upgrade minidalle2")
    if expected_kind is not None and meta.get("kind") != expected_kind:
        raise CheckpointError(f"checkpoint {st_path} holds a {meta.get('kind')!r}, "
                              f"expected {expected_kind!r}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointError(f"checkpoint {st_path} is corrupt or truncated: not a readable safetensors file "
                              f"({e})") from None
    if meta.get("version") == VERSION:
        claimed = meta.get("sha256")
        unsigned = {k: v for k, v in meta.items() if k != "sha256"}
        if _digest(safetensors.torch.save(tensors), _canonical(unsigned)) != claimed:
            raise CheckpointError(f"checkpoint {st_path} is corrupt or truncated: its sha256 does not match "
                                  "its tensors and metadata")
    return tensors, meta


def _version1_metadata(json_path, st_path, data):
    if not json_path.exists():
        raise CheckpointError(f"checkpoint {st_path} has no metadata file {json_path} (interrupted save?)")
    try:
        meta = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint metadata {json_path} is not valid JSON ({e})") from None
    if isinstance(meta, dict) and meta.get("version") == 1 and hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {st_path} is corrupt or truncated: its sha256 does not "
                              f"match the one recorded in {json_path}")
    return meta


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
    try:
        model = cls_or_factory(**meta["config"])
    except TypeError as e:     # the saved config is another model's (or another version's) constructor kwargs
        name = getattr(cls_or_factory, "__name__", "the factory")
        raise CheckpointError(f"checkpoint {checkpoint_paths(path)[0]} holds a {meta.get('kind')!r} "
                              f"({meta.get('class', 'unknown class')}) whose config does not fit {name}: {e}") from None
    load_state_dict_strict(model, tensors, checkpoint_paths(path)[0])
    return model
