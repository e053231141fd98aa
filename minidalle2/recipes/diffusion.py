"""Chapters 09-11's recipes: the unconditional DDPM, the noisy classifier that guides it, and the class-conditional
model sampled with classifier-free guidance; with the measurements those chapters make on them (time-to-quality
curves, guidance-scale sweeps), scored by the oracle."""

import json
import time

from .. import data
from ..diffusion import Schedule
from ..diffusion_model import SAMPLE_ETA, SAMPLE_STEPS, DiffusionModel, class_conditional_loss, ddpm_loss
from ..guidance import (accuracy_by_timestep, classes_from_prompts, classifier_guided_generate,
                        noisy_classifier_loss)
from ..lab import zoo
from ..lab.checkpoint import atomic_write_json
from ..lab.oracle import load_oracle
from ..lab.scoreboard import score
from ..lab.train import seed_everything, train
from ..lab.zoo import Recipe
from ..unet import NoisyClassifier, UNet
from .common import shapes_train

# The network: patchified at cpu (2x2 pixels per token: 3.9x less compute than full resolution),
# widths 32/64/128, attention at 8x8: 2.9M parameters.
NET = {"smoke": dict(widths=[16, 32], patch_size=2, attention_levels=[1]),
       "cpu": dict(widths=[32, 64, 128], patch_size=2, attention_levels=[2]),
       "full": dict(widths=[64, 128, 256], patch_size=1, attention_levels=[2], blocks_per_level=2)}
# The cosine schedule keeps far more of a 32x32 object deep into the process than the linear one, so more of the
# training and sampling steps fall where the picture is decided (measured: notebook 09 section 3).
PROCESS = dict(schedule="cosine", T=1000, prediction="v", weighting="min_snr")
P_UNCOND = 0.15                 # CFG: the class is dropped for 15% of the training rows
DATA = {"smoke": dict(size=2_000, num_objects=1), "cpu": dict(size=50_000, num_objects=1),
        "full": dict(size=100_000, num_objects=1)}

# Budgets (measured rows: results/scoreboard.jsonl; time-to-quality: results/time_to_quality_*.json).
# cpu: a constant lr after warm-up (a cosine decay to zero cost accuracy at equal steps); bf16 autocast.
TRAINING = {
    "smoke": dict(steps=20, batch_size=32, lr=1e-3, warmup_steps=5, log_every=5),
    "cpu": dict(steps=2800, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="constant", grad_clip=1.0,
                ema_decay=0.998, ema_warmup=True, bf16=True, log_every=50),
    "full": dict(steps=30000, batch_size=128, lr=2e-4, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
                 ema_decay=0.9995, ema_warmup=True, bf16=True, log_every=200),
}
# the unconditional model learns more per minute from more, smaller steps; 4,500 steps of 32 fit in 10 minutes
DDPM_TRAINING = {**TRAINING, "cpu": {**TRAINING["cpu"], "steps": 4500, "batch_size": 32}}

# time-to-quality: every `every` steps, score `images` samples of the EMA model with the oracle;
# sweep_images: samples per guidance scale in the sweeps of notebooks 10 and 11
SETTINGS = {"smoke": dict(every=10, images=16, sweep_images=60), "cpu": dict(every=400, images=200, sweep_images=300),
            "full": dict(every=2500, images=500, sweep_images=1000)}

# The noisy classifier: the U-Net's down path + a linear head that reads the whole lowest-resolution map.
CLASSIFIER_NET = {"smoke": dict(widths=[16, 32], patch_size=2),
                  "cpu": dict(widths=[32, 64, 64], patch_size=2),
                  "full": dict(widths=[64, 128, 128], patch_size=1)}
# cpu: a step costs ~1/6 of a diffusion step; 15,000 steps take ~9 minutes (accuracy by t: notebook 10 section 3)
CLASSIFIER_TRAINING = {
    "smoke": dict(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, log_every=5),
    "cpu": dict(steps=15000, batch_size=64, lr=2e-3, weight_decay=0.01, warmup_steps=100, lr_schedule="cosine",
                grad_clip=1.0, bf16=True, log_every=50),
    "full": dict(steps=10000, batch_size=128, lr=1e-3, weight_decay=0.01, warmup_steps=200, lr_schedule="cosine",
                 grad_clip=1.0, bf16=True, log_every=100),
}

# the scales the benchmark rows use: the best of the cpu sweeps in notebooks 10 (section 6) and 11
CLASSIFIER_SCALE = 8.0
CLASSIFIER_SMOOTHING = 2.0      # rho: perturb x_t by twice the noise it already holds
SMOOTHING_SAMPLES = 4           # gradients averaged per step
CFG_SCALE = 2.0
SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)
CLASSIFIER_SCALES = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)   # smoothed gradients bear larger scales


def unet_diffusion(net, conditions=None, **process):
    """A DiffusionModel around a U-Net for 32x32 RGB Shapes images."""
    unet = UNet(**net, num_timesteps=process.get("T", 1000))
    return DiffusionModel(unet, (unet.channels, unet.resolution, unet.resolution), conditions=conditions, **process)


def classifier_schedule():
    """The diffusion process of the "ddpm" recipe: the classifier must see the noise that model samples through."""
    return Schedule(PROCESS["schedule"], PROCESS["T"])


# ----------------------------------------------------------------------------- measurements during training

def quality_snapshot(images, guidance=None, seed=12345, classifier=None):
    """A snapshot fn for train.train: sample `images` images (DDIM-50) and return the oracle's numbers,
    so the training history holds a quality-vs-time curve. A conditional model draws balanced class
    prompts and is scored on them (caption accuracy), at CFG scale `guidance`; so does an unconditional
    one given a noisy `classifier`, which guides it at scale `guidance` with the recipe's smoothing (chapter 10)."""
    oracle = load_oracle()

    def measure(step, seconds, model):
        on_classes = model.conditional or classifier is not None
        classes, prompts = data.pair_prompts(images, seed) if on_classes else (None, None)
        if classifier is not None:
            classifier.to(next(model.parameters()).device)  # train() moved the model to its device
            out = classifier_guided_generate(model, classifier, classes, guidance, smoothing=CLASSIFIER_SMOOTHING,
                                             smoothing_samples=SMOOTHING_SAMPLES, seed=seed)
        else:
            out = model.generate(images, cond=classes, guidance=guidance, seed=seed)
        out = score(out, prompts, oracle=oracle)
        keys = ("validity", "fid", "coverage") + (("caption_accuracy",) if prompts else ())
        return {k: out[k] for k in keys} | ({"guidance": guidance} if prompts and guidance is not None else {})
    return measure


def fit_diffusion(model, job, guidance=None):
    """The training loop with oracle snapshots every `every` steps (the training history's quality curve)."""
    snapshot = (job.setting("every"), quality_snapshot(job.setting("images"), guidance))
    return train(model, job.recipe.loss, job.dataset(), job.train_config(), run_dir=job.run_dir,
                 kind=job.recipe.kind, snapshot=snapshot)


# ----------------------------------------------------------------------------- sampling

def sample_unconditional(model, prompts, n, seed):
    return model.generate(n, seed=seed)


def sample_cfg(model, prompts, n, seed):
    return model.generate(n, cond=classes_from_prompts(prompts), guidance=CFG_SCALE, seed=seed)


def sample_classifier_guided(classifier, prompts, n, seed, needs):
    """The classifier guides the "ddpm" model of its own preset (a declared need), on the classifier's device."""
    ddpm = needs["ddpm"].to(next(classifier.parameters()).device)
    return classifier_guided_generate(ddpm, classifier, classes_from_prompts(prompts), CLASSIFIER_SCALE,
                                      CLASSIFIER_SMOOTHING, SMOOTHING_SAMPLES, seed=seed)


def class_prompts(n, seed):
    """Balanced one-object class captions ("a red circle"): what class-conditional recipes are benchmarked on."""
    return data.pair_prompts(n, seed)[1]


# ----------------------------------------------------------------------------- the recipes

DDPM = Recipe(
    "ddpm", "diffusion", unet_diffusion,
    description="unconditional DDPM (v-prediction, min-SNR) on one-object Shapes scenes",
    model={p: dict(net=NET[p], **PROCESS) for p in NET}, loss=ddpm_loss, dataset=shapes_train, data=DATA,
    training=DDPM_TRAINING, settings=SETTINGS, fit=fit_diffusion, sample=sample_unconditional)

CFG = Recipe(
    "cfg", "diffusion", unet_diffusion,
    description=f"class-conditional DDPM with condition dropout {P_UNCOND}, sampled with CFG w = {CFG_SCALE}",
    model={p: dict(net={**NET[p], "num_classes": data.NUM_PAIRS}, conditions={"cond": P_UNCOND}, **PROCESS)
           for p in NET},
    loss=class_conditional_loss, dataset=shapes_train, data=DATA, training=TRAINING, settings=SETTINGS,
    fit=lambda model, job: fit_diffusion(model, job, guidance=CFG_SCALE),
    sample=sample_cfg, conditional=True, prompts=class_prompts)

CLASSIFIER_GUIDANCE = Recipe(
    "classifier_guidance", "noisy_classifier", NoisyClassifier,
    description=f"noisy classifier p(y | x_t, t) guiding the 'ddpm' model at scale {CLASSIFIER_SCALE}, "
                f"its gradient smoothed over {SMOOTHING_SAMPLES} perturbations of rho = {CLASSIFIER_SMOOTHING}",
    model={p: dict(num_classes=data.NUM_PAIRS, num_timesteps=PROCESS["T"], schedule=PROCESS["schedule"],
                   **CLASSIFIER_NET[p]) for p in CLASSIFIER_NET},
    loss=lambda model, batch: noisy_classifier_loss(model, batch, classifier_schedule()),
    dataset=shapes_train, data=DATA, training=CLASSIFIER_TRAINING, settings=SETTINGS, needs=(DDPM,),
    sample=sample_classifier_guided, conditional=True, prompts=class_prompts,
    report=lambda model, needs: {f"classifier_accuracy {k}": v
                                 for k, v in accuracy_by_timestep(model, classifier_schedule()).items()})

RECIPES = [DDPM, CFG, CLASSIFIER_GUIDANCE]


# ----------------------------------------------------------------------------- time-to-quality

CURVES = ("ddpm", "cfg", "classifier_guidance")


def time_to_quality(recipe="ddpm", preset="cpu", steps=None, every=None, images=None, guidance=None):
    """Train a fresh model of `recipe` for `steps` (default: the preset's budget; a cosine learning-rate
    decay, where the recipe has one, stretches to fit) and score `images` samples every `every` steps.
    Returns rows of {step, minutes, validity, fid, coverage[, caption_accuracy]}: quality against training
    time, same seed every time.
    "classifier_guidance" trains a fresh "ddpm" and scores it guided by the zoo's noisy classifier of the
    same preset (trained or loaded first; its own training time is not in `minutes`).
    Nothing is cached: this measures, it does not make a model to keep."""
    if recipe not in CURVES:
        raise ValueError(f"time_to_quality: recipe must be one of {CURVES}, got {recipe!r}")
    for name, value, what in (("steps", steps, "training steps"), ("every", every, "training steps between scores"),
                              ("images", images, "samples per score")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"time_to_quality: {name} must be a positive int ({what}) or None for the "
                             f"preset's default, got {value!r}")
    trained = CFG if recipe == "cfg" else DDPM
    config = trained.train_config(preset, **({"steps": steps} if steps is not None else {}))
    every = every if every is not None else trained.setting("every", preset)
    images = images if images is not None else trained.setting("images", preset)
    default_scale = {"cfg": CFG_SCALE, "classifier_guidance": CLASSIFIER_SCALE}
    guidance = guidance if guidance is not None else default_scale.get(recipe)
    classifier = zoo.load_or_train(CLASSIFIER_GUIDANCE, preset) if recipe == "classifier_guidance" else None
    seed_everything(0)
    model = trained.build_model(preset)
    measure, rows = quality_snapshot(images, guidance, classifier=classifier), []

    def snapshot(step, seconds, sample_model):
        rows.append({"step": step, "minutes": seconds / 60, **measure(step, seconds, sample_model)})
        print(json.dumps(rows[-1]), flush=True)

    train(model, trained.loss, trained.make_dataset(preset), config, kind="diffusion", snapshot=(every, snapshot))
    return rows


# ----------------------------------------------------------------------------- guidance-scale sweeps

def guidance_sweep(generate, scales, n=300, seed=0, oracle=None):
    """For each scale: images = generate(classes, scale) for n balanced classes, scored by the oracle
    against the class captions. Rows: scale, caption_accuracy, attr_shape, attr_color, diversity_per_prompt,
    coverage, validity, fid, sample_seconds."""
    classes, prompts = data.pair_prompts(n, seed)
    rows = []
    for scale in scales:
        start = time.perf_counter()
        images = generate(classes, scale)
        seconds = time.perf_counter() - start
        report = score(images, prompts, oracle=oracle, seed=seed)
        rows.append({"scale": scale, **report, "sample_seconds": seconds})
    return rows


def sweep(recipe, preset, scales=None, n=None, seed=0, smoothing=None):
    """guidance_sweep of the zoo model `recipe` ("classifier_guidance" or "cfg") at `preset`, cached in
    <cache>/sweeps/ beside the models it measures, so notebook 11 can plot chapter 10's sweep next to its own.
    Classifier guidance uses the recipe's CLASSIFIER_SMOOTHING unless `smoothing` is given (0: the plain rule)."""
    if recipe not in ("classifier_guidance", "cfg"):
        raise ValueError(f"sweep: recipe must be 'classifier_guidance' or 'cfg', got {recipe!r}")
    if smoothing is not None and recipe == "cfg":
        raise ValueError("sweep: smoothing is a classifier guidance setting; cfg has no classifier to smooth")
    smoothing = CLASSIFIER_SMOOTHING if smoothing is None else smoothing
    scales = scales or (CLASSIFIER_SCALES if recipe == "classifier_guidance" else SCALES)
    models = [CFG] if recipe == "cfg" else [CLASSIFIER_GUIDANCE, DDPM]
    n = n or models[0].setting("sweep_images", preset)
    loaded = [zoo.load_or_train(r, preset) for r in models]
    key = {"models": [zoo.cached_meta(r, preset).get("fingerprint") for r in models],
           "scales": [float(s) for s in scales], "n": n, "seed": seed,
           "sampler": {"steps": SAMPLE_STEPS, "eta": SAMPLE_ETA}}
    name = recipe
    if recipe == "classifier_guidance":
        key["smoothing"] = {"rho": float(smoothing), "samples": SMOOTHING_SAMPLES}
        name += f"_smoothing{float(smoothing):g}"
    path = zoo.cache_dir() / "sweeps" / f"{name}_{preset}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["rows"]
    if recipe == "cfg":
        generate = lambda classes, w: loaded[0].generate(len(classes), cond=classes, guidance=w, seed=seed)
    else:
        generate = lambda classes, s: classifier_guided_generate(loaded[1], loaded[0], classes, s, smoothing,
                                                                 SMOOTHING_SAMPLES, seed=seed)
    rows = guidance_sweep(generate, scales, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "rows": rows})
    return rows
