"""
The zoo: train-or-load for named models, so later chapters can stand on earlier ones.

    oracle = zoo.load_or_train("oracle")          # trains once (progress bar), then loads in ms

A Recipe says how to build a model for a preset and how to fit it. Chapter modules register
their recipes at import time. Trained weights are cached in

    <cache>/<name>/<preset>/model.safetensors + model.json      (cache: $MINIDALLE2_CACHE)

next to a fingerprint of everything that decides the result (recipe name and version,
preset, model config, train config). Change any of them and the cached model is stale, so it
is retrained rather than silently reused; a corrupt cache file is reported and retrained too.
"""

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .checkpoint import (CheckpointError, checkpoint_exists, load_checkpoint, load_state_dict_strict,
                         save_model)
from .presets import TRAINING, check_preset, default_preset, train_config
from .train import (TrainResult, barrier, derive_seed, is_main_process, pick_device, progress_bars,
                    seed_everything, setup_distributed)

CACHE_ENV = "MINIDALLE2_CACHE"
# modules that register recipes, imported on the first lookup (not at import: they are heavy)
_RECIPE_MODULES = ["minidalle2.oracle", "minidalle2.gan", "minidalle2.autoencoder", "minidalle2.vae", "minidalle2.clip",
                   "minidalle2.ddpm", "minidalle2.guidance"]


class ZooError(RuntimeError):
    """An unknown recipe, or a cache directory that cannot be used."""


@dataclass
class Recipe:
    name: str
    kind: str                                            # checkpoint kind, e.g. "vae"
    build: Callable[[str], nn.Module]                    # preset -> fresh, untrained model
    fit: Callable[[nn.Module, str, Path], TrainResult]   # (model, preset, run_dir) -> result
    description: str = ""
    training: str | None = None   # row of presets.TRAINING; default: the recipe's name
    version: int = 1              # bump when a code change (data, loss) should invalidate caches
    report: Callable[[nn.Module], dict] | None = None   # measured quality, recorded when exported
    # generators: (model, prompts or None, n, seed) -> images (n, 3, R, R) in [-1, 1]
    sample: Callable | None = None
    conditional: bool = False     # does `sample` take prompts?
    # (n, seed) -> the n prompts the benchmark scores it on; default: captions of the split (any scene)
    prompts: Callable | None = None


_REGISTRY: dict[str, Recipe] = {}
_missing_modules: list[str] = []
_imported = False


def register(recipe: Recipe) -> Recipe:
    _REGISTRY[recipe.name] = recipe  # re-registering (a reloaded module) replaces the old one
    return recipe


def _import_recipe_modules():
    global _imported
    if _imported:
        return
    _imported = True
    for module in _RECIPE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise  # the module exists but is broken: say so loudly
            _missing_modules.append(module)


def recipes() -> list[Recipe]:
    _import_recipe_modules()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_recipe(name: str) -> Recipe:
    if name not in _REGISTRY:
        _import_recipe_modules()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        missing = f" (could not import {', '.join(_missing_modules)})" if _missing_modules else ""
        raise ZooError(f"unknown recipe {name!r}; known: {known}{missing}")
    return _REGISTRY[name]


def cache_dir(path=None) -> Path:
    """The cache root: `path`, else $MINIDALLE2_CACHE, else ~/.cache/minidalle2; made, checked writable."""
    path = Path(path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minidalle2").expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # os.access lies for root and on some mounts: try it
            pass
    except OSError as e:
        raise ZooError(f"cannot use {path} as the model cache ({e.strerror or e}); "
                       f"set {CACHE_ENV} to a writable directory") from None
    return path


def fingerprint(recipe: Recipe, preset: str, model: nn.Module) -> str:
    row = recipe.training or recipe.name
    what = {"name": recipe.name, "kind": recipe.kind, "version": recipe.version, "preset": preset,
            "model_config": getattr(model, "config", None),
            "train_config": train_config(row, preset).to_dict() if row in TRAINING else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _frozen(model: nn.Module, preset: str) -> nn.Module:
    model.zoo_preset = preset  # a recipe that builds on another zoo model takes the same preset's (see guidance.py)
    return model.eval().requires_grad_(False)


def load_or_train(name: str, preset=None, *, cache=None, retrain=False, progress=True) -> nn.Module:
    """The model of recipe `name` at `preset`, in eval mode with gradients off; model.zoo_preset = preset."""
    recipe = get_recipe(name)
    preset = check_preset(preset) if preset is not None else default_preset()
    where = cache_dir(cache) / name / preset
    path, run_dir = where / "model", where / "run"
    seed_everything(derive_seed(name, preset, "init"))  # the same recipe always starts from the same weights
    model = recipe.build(preset)
    fp = fingerprint(recipe, preset, model)

    if checkpoint_exists(path) and not retrain:
        try:
            tensors, meta = load_checkpoint(path, expected_kind=recipe.kind)
            if meta.get("fingerprint") == fp:
                load_state_dict_strict(model, tensors, path)
                print(f"zoo: loaded {name!r} ({preset}) from {path}.safetensors")
                return _frozen(model, preset)
            print(f"zoo: cached {name!r} ({preset}) is stale (the recipe changed); retraining")
        except CheckpointError as e:
            print(f"zoo: cached {name!r} ({preset}) is unusable: {e}; retraining")

    # under torchrun every process trains (DDP), but only the first one touches the cache
    setup_distributed(pick_device())
    main = is_main_process()
    # an interrupted training of this very recipe resumes; anything else starts afresh
    fp_file = run_dir / "fingerprint.txt"
    if main:
        if run_dir.exists() and (retrain or not fp_file.exists() or fp_file.read_text() != fp):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        fp_file.write_text(fp)
        print(f"zoo: training {name!r} ({preset}); it will be cached in {where}")
    barrier()
    with progress_bars(progress):
        result = recipe.fit(model, preset, run_dir)
    trained = result.ema_model
    if main:
        save_model(trained, path, recipe.kind, {"fingerprint": fp, "recipe": name, "preset": preset,
                                                "step": result.step, "seconds": result.seconds,
                                                "history": _thin(result.history)})
        shutil.rmtree(run_dir)  # optimizer state is 2x the model: not worth keeping once done
    barrier()
    return _frozen(trained, preset)


def _thin(history, points=500):
    """At most ~`points` entries of a training history (every k-th step, the last, and every entry with
    eval_ numbers from a snapshot): enough for curves."""
    k = max(1, -(-len(history) // points))  # ceil
    return [h for i, h in enumerate(history)
            if i % k == 0 or i == len(history) - 1 or any(key.startswith("eval_") for key in h)]


def training_history(name: str, preset=None, *, cache=None) -> list[dict]:
    """The training curves (one dict per logged step: step, loss, lr, ... and what the loss logged)
    of the cached model of recipe `name`; train it first with load_or_train."""
    preset = check_preset(preset) if preset is not None else default_preset()
    path = cache_dir(cache) / name / preset / "model"
    if not checkpoint_exists(path):
        raise ZooError(f"no cached {name!r} ({preset}) in {path.parent}; run zoo.load_or_train({name!r}, {preset!r})")
    return load_checkpoint(path, expected_kind=get_recipe(name).kind)[1].get("history", [])


def export(name: str, preset=None, path=None, *, cache=None, retrain=False, progress=True) -> dict:
    """Train-or-load a recipe, then write a standalone copy (e.g. the shipped oracle) with its recipe,
    training time and measured quality (`recipe.report`) in the JSON beside the weights."""
    recipe = get_recipe(name)
    preset = check_preset(preset) if preset is not None else default_preset()
    model = load_or_train(name, preset, cache=cache, retrain=retrain, progress=progress)
    _, trained_meta = load_checkpoint(cache_dir(cache) / name / preset / "model", expected_kind=recipe.kind)
    row = recipe.training or recipe.name
    command = f"python -m minidalle2 train {name} --preset {preset}" + (f" --export {path}" if path else "")
    meta = {"recipe": name, "preset": preset, "command": command,
            "train_config": train_config(row, preset).to_dict() if row in TRAINING else None,
            "train_seconds": trained_meta.get("seconds"), "fingerprint": trained_meta.get("fingerprint"),
            "report": recipe.report(model) if recipe.report else None}
    if path is not None and is_main_process():
        save_model(model, path, recipe.kind, meta)
    return meta
