"""
The zoo: train-or-load for recipes, so later chapters can stand on earlier ones.

    model = zoo.load_or_train(recipe, "cpu")      # trains once (progress bar), then loads in ms

A Recipe (below) says everything that decides a named model, per preset: how to build it, the data,
the training budget, the recipes it builds on (`needs`), and how it samples. The recipes themselves
live in minidalle2/recipes/, which looks them up by name (`recipes.load("vae")`); the zoo only
takes Recipe objects, so infrastructure never depends on the chapters. Trained weights are cached in

    <cache>/<name>/<preset>/model.safetensors + model.json      (cache: $MINIDALLE2_CACHE)

next to a fingerprint of everything that decides the result (recipe name and version, preset, model
config, data, train config, and the fingerprints of its needs). Change any of them and the cached
model is stale, so it is retrained rather than silently reused; a corrupt cache file is reported and
retrained too.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import (CheckpointError, checkpoint_exists, load_checkpoint, load_state_dict_strict,
                         save_model)
from .presets import PRESETS, check_preset, default_preset
from .train import (TrainConfig, TrainResult, barrier, derive_seed, is_main_process, pick_device,
                    progress_bars, seed_everything, setup_distributed, train)

CACHE_ENV = "MINIDALLE2_CACHE"


class ZooError(RuntimeError):
    """An unknown recipe, or a cache directory that cannot be used."""


@dataclass(frozen=True, eq=False)
class Recipe:
    """One named model: per preset, its model config, data and TrainConfig; what it builds on; how it samples.

    build(**model[preset]) makes the fresh model. Training is fit(model, job) if given, else the one
    training loop on loss(model, batch) over dataset(**data[preset]). A generator's
    sample(model, prompts, n, seed[, needs=...]) returns n images in [-1, 1]; report(model[, needs=...])
    returns measured numbers. `needs` (other recipes) are loaded at the same preset when first used and
    handed over by name; their fingerprints are part of this one's."""
    name: str
    kind: str                                   # the checkpoint's kind, e.g. "vae"
    build: Callable[..., nn.Module]
    training: dict                              # preset -> TrainConfig fields
    model: dict = field(default_factory=dict)   # preset -> build() arguments
    data: dict = field(default_factory=dict)    # preset -> dataset() arguments
    dataset: Callable | None = None             # (**data[preset]) -> the training set
    loss: Callable | None = None                # loss_fn(model, batch) -> loss | (loss, logs)
    fit: Callable | None = None                 # (model, job) -> TrainResult, when training is more than train()
    settings: dict = field(default_factory=dict)  # preset -> other sizes (snapshots, sweeps, reports)
    needs: tuple = ()                           # Recipe objects this one builds on
    sample: Callable | None = None              # generators only
    conditional: bool = False                   # does `sample` read prompts?
    prompts: Callable | None = None             # (n, seed) -> the benchmark's prompts; default: the split's captions
    report: Callable | None = None              # measured quality, recorded when exported and benchmarked
    description: str = ""
    version: int = 1                            # bump when a code change (data, loss) should invalidate caches

    def __post_init__(self):
        missing = [p for p in PRESETS if p not in self.training]
        if missing:
            raise ValueError(f"recipe {self.name!r}: no training budget for preset(s) {missing}")
        if self.fit is None and (self.loss is None or self.dataset is None):
            raise ValueError(f"recipe {self.name!r}: give fit, or both loss and dataset")

    def train_config(self, preset=None, **overrides) -> TrainConfig:
        """The TrainConfig at `preset` (default: default_preset()), with overrides."""
        preset = _preset(preset)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid: {', '.join(sorted(fields))}")
        return TrainConfig(**{**self.training[preset], **overrides})

    def model_config(self, preset=None) -> dict:
        return dict(self.model.get(_preset(preset), {}))

    def setting(self, key, preset=None):
        """A size from `settings` at `preset`, e.g. recipe.setting("sweep_images", "cpu")."""
        values = self.settings.get(_preset(preset), {})
        if key not in values:
            raise KeyError(f"recipe {self.name!r} has no setting {key!r} (it has: {', '.join(sorted(values)) or 'none'})")
        return values[key]

    def build_model(self, preset=None) -> nn.Module:
        return self.build(**self.model_config(preset))

    def make_dataset(self, preset=None):
        return self.dataset(**self.data.get(_preset(preset), {}))

    def variant(self, name, model=None, data=None, training=None, **fields) -> "Recipe":
        """A copy called `name` with settings changed at every preset, or per preset ({"cpu": {...}, ...}), and
        any other field replaced, e.g. recipes.get("ddpm").variant("ddpm_eps", model=dict(prediction="eps"));
        zoo.load_or_train caches it apart."""
        def merge(table, extra):
            if extra and set(extra) <= set(PRESETS) and all(isinstance(v, dict) for v in extra.values()):
                return {p: {**table.get(p, {}), **extra.get(p, {})} for p in PRESETS}      # per preset
            return {p: {**table.get(p, {}), **extra} for p in PRESETS} if extra else table
        return dataclasses.replace(self, name=name, model=merge(self.model, model), data=merge(self.data, data),
                                   training=merge(self.training, training), **fields)

    def describe(self, preset=None) -> str:
        """What this recipe spends at `preset`: model, data, training budget, needs."""
        preset = _preset(preset)
        c = self.train_config(preset)
        lines = [f"{self.name} ({preset}): {self.description}",
                 f"  model: {_kwargs(self.model_config(preset)) or 'defaults'}",
                 f"  data: {_kwargs(self.data.get(preset, {})) or 'defaults'}",
                 f"  training: {c.steps} steps of {c.batch_size}, lr {c.lr:g} ({c.lr_schedule}), "
                 f"ema {c.ema_decay}, bf16 {c.bf16}"]
        if self.needs:
            lines.append(f"  needs: {', '.join(r.name for r in self.needs)}")
        if self.settings.get(preset):
            lines.append(f"  settings: {_kwargs(self.settings[preset])}")
        return "\n".join(lines)


def _kwargs(d):
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _preset(preset):
    return check_preset(preset) if preset is not None else default_preset()


class Needs(Mapping):
    """The recipes a recipe builds on, by name, each trained-or-loaded at the same preset on first use."""

    def __init__(self, recipe: Recipe, preset: str, cache=None):
        self._recipes = {r.name: r for r in recipe.needs}
        self._preset, self._cache, self._loaded = preset, cache, {}

    @property
    def preset(self):
        """The preset the needs are loaded at (the dependent's own): reports size themselves by it."""
        return self._preset

    def __getitem__(self, name):
        if name not in self._recipes:
            raise KeyError(f"{name!r} is not among the declared needs ({', '.join(self._recipes) or 'none'})")
        if name not in self._loaded:
            self._loaded[name] = load_or_train(self._recipes[name], self._preset, cache=self._cache)
        return self._loaded[name]

    def __iter__(self):
        return iter(self._recipes)

    def __len__(self):
        return len(self._recipes)


@dataclass
class Job:
    """What a recipe's fit receives beside the model: where and at which preset it trains, and its needs."""
    recipe: Recipe
    preset: str
    run_dir: Path | None
    needs: Needs

    def train_config(self, **overrides) -> TrainConfig:
        return self.recipe.train_config(self.preset, **overrides)

    def dataset(self):
        return self.recipe.make_dataset(self.preset)

    def setting(self, key):
        return self.recipe.setting(key, self.preset)


def default_fit(model, job: Job) -> TrainResult:
    """The one training loop on the recipe's loss and data at the job's preset."""
    return train(model, job.recipe.loss, job.dataset(), job.train_config(), run_dir=job.run_dir, kind=job.recipe.kind)


def with_needs(recipe, preset, cache=None) -> dict:
    """Keyword arguments that hand a recipe's needs to its sample / report (none if it declares none)."""
    return {"needs": Needs(recipe, preset, cache)} if recipe.needs else {}


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


def model_path(recipe: Recipe, preset, cache=None) -> Path:
    """Where the trained model of `recipe` at `preset` is cached (without the .safetensors / .json suffix)."""
    return cache_dir(cache) / recipe.name / check_preset(preset) / "model"


def fingerprint(recipe: Recipe, preset: str, model: nn.Module | None = None) -> str:
    """A hash of everything that decides the trained weights (`model`: a fresh build, made if not given)."""
    if model is None:
        with torch.random.fork_rng(devices=[]):  # building only to read the config: leave the caller's RNG alone
            seed_everything(derive_seed(recipe.name, preset, "init"))
            model = recipe.build_model(preset)
    what = {"name": recipe.name, "kind": recipe.kind, "version": recipe.version, "preset": preset,
            "model_config": getattr(model, "config", None), "data": recipe.data.get(preset),
            "train_config": recipe.train_config(preset).to_dict(),
            "needs": {r.name: fingerprint(r, preset) for r in recipe.needs}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def load_or_train(recipe: Recipe, preset=None, *, cache=None, retrain=False, progress=True) -> nn.Module:
    """The model of `recipe` at `preset`, in eval mode with gradients off: loaded if cached and fresh, else trained;
    either way on the device its training uses (a GPU if there is one)."""
    preset = _preset(preset)
    name = recipe.name
    path = model_path(recipe, preset, cache)
    where, run_dir = path.parent, path.parent / "run"
    seed_everything(derive_seed(name, preset, "init"))  # the same recipe always starts from the same weights
    model = recipe.build_model(preset)
    fp = fingerprint(recipe, preset, model)

    if checkpoint_exists(path) and not retrain:
        try:
            tensors, meta = load_checkpoint(path, expected_kind=recipe.kind)
            if meta.get("fingerprint") == fp:
                load_state_dict_strict(model, tensors, path)
                print(f"zoo: loaded {name!r} ({preset}) from {path}.safetensors")
                # where a fresh training would leave it, so loaded and trained models meet on one device
                return _frozen(model.to(pick_device(recipe.train_config(preset).device)))
            print(f"zoo: cached {name!r} ({preset}) is stale (the recipe changed); retraining")
        except CheckpointError as e:
            print(f"zoo: cached {name!r} ({preset}) is unusable: {e}; retraining")

    # under torchrun every process trains (DDP), but only the first one touches the cache
    setup_distributed(pick_device(recipe.train_config(preset).device))
    main = is_main_process()
    # an interrupted training of this very recipe resumes; anything else starts afresh
    fp_file = run_dir / "fingerprint.txt"
    if main:
        if run_dir.exists() and (retrain or not fp_file.exists() or fp_file.read_text() != fp):
            shutil.rmtree(run_dir)
        step = _resume_point(run_dir, name, preset)
        run_dir.mkdir(parents=True, exist_ok=True)
        fp_file.write_text(fp)
        if step:
            print(f"zoo: resuming the interrupted training of {name!r} ({preset}) from step {step} of "
                  f"{recipe.train_config(preset).steps}; it will be cached in {where}")
        else:
            print(f"zoo: training {name!r} ({preset}); it will be cached in {where}")
    barrier()
    job = Job(recipe, preset, run_dir, Needs(recipe, preset, cache))
    with progress_bars(progress):
        result = (recipe.fit or default_fit)(model, job)
    trained = result.ema_model
    if main:
        save_model(trained, path, recipe.kind, {"fingerprint": fp, "recipe": name, "preset": preset,
                                                "step": result.step, "seconds": result.seconds,
                                                "history": _thin(result.history)})
        shutil.rmtree(run_dir)  # optimizer state is 2x the model: not worth keeping once done
    barrier()
    return _frozen(trained)


def _resume_point(run_dir: Path, name, preset):
    """The step an interrupted training in run_dir stopped at (None: nothing to resume). A state that
    cannot be read is moved aside, so the next training starts afresh instead of failing on every call."""
    state = run_dir / "state"
    if not checkpoint_exists(state):
        return None
    try:
        return load_checkpoint(state, expected_kind="train_state")[1].get("step")
    except CheckpointError as e:
        aside = run_dir.with_name(f"run.unusable-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"zoo: the interrupted training of {name!r} ({preset}) cannot be resumed ({e}); it was moved to "
              f"{aside} and the training starts afresh (`--retrain` would too)")
        return None


def _thin(history, points=500):
    """At most ~`points` entries of a training history (every k-th step, the last, and every entry with
    eval_ numbers from a snapshot): enough for curves."""
    k = max(1, -(-len(history) // points))  # ceil
    return [h for i, h in enumerate(history)
            if i % k == 0 or i == len(history) - 1 or any(key.startswith("eval_") for key in h)]


def cached_meta(recipe: Recipe, preset=None, *, cache=None) -> dict:
    """The JSON saved beside the cached model of `recipe` (fingerprint, seconds, step, history, ...)."""
    preset = _preset(preset)
    path = model_path(recipe, preset, cache)
    if not checkpoint_exists(path):
        raise ZooError(f"no cached {recipe.name!r} ({preset}) in {path.parent}; train it first "
                       f"(python -m minidalle2 train {recipe.name} --preset {preset})")
    return load_checkpoint(path, expected_kind=recipe.kind)[1]


def training_history(recipe: Recipe, preset=None, *, cache=None) -> list[dict]:
    """The training curves (one dict per logged step: step, loss, lr, ... and what the loss logged)
    of the cached model of `recipe`; train it first with load_or_train."""
    return cached_meta(recipe, preset, cache=cache).get("history", [])


def export(recipe: Recipe, preset=None, path=None, *, cache=None, retrain=False, progress=True) -> dict:
    """Train-or-load a recipe, then write a standalone copy (e.g. the shipped oracle) with its recipe,
    training time and measured quality (`recipe.report`) in the JSON beside the weights."""
    preset = _preset(preset)
    model = load_or_train(recipe, preset, cache=cache, retrain=retrain, progress=progress)
    trained_meta = cached_meta(recipe, preset, cache=cache)
    command = f"python -m minidalle2 train {recipe.name} --preset {preset}" + (f" --export {path}" if path else "")
    meta = {"recipe": recipe.name, "preset": preset, "command": command,
            "train_config": recipe.train_config(preset).to_dict(),
            "train_seconds": trained_meta.get("seconds"), "fingerprint": trained_meta.get("fingerprint"),
            "report": recipe.report(model, **with_needs(recipe, preset, cache)) if recipe.report else None}
    if path is not None and is_main_process():
        save_model(model, path, recipe.kind, meta)
    return meta
