"""
Chapter 09's model: a denoising network together with the diffusion process it was trained for.

    model = DiffusionModel(unet=dict(widths=[32, 64, 128], patch_size=2), prediction="v")
    loss, logs = model.loss({"image": x0})                     # train.train(model, ddpm_loss, ...)
    images = model.generate(16)                               # DDIM-50 with eta = 1 (SAMPLE_STEPS, SAMPLE_ETA)

The network (unet.UNet) and the sampler (diffusion.py) stay separate, as in diffusers; this class
only keeps what a checkpoint must remember to sample correctly -- the schedule, the prediction type
(eps, x0 or v), the loss weighting and the condition-dropout rate -- in `config`, which is saved
beside the weights. A model trained to predict v and sampled as if it predicted eps gives noise, so
these are never left for the caller to remember.

The recipes "ddpm" (unconditional, chapter 09) and, in guidance.py, "cfg" (class-conditional with
condition dropout, chapter 11) are instances of this class trained on one-object Shapes scenes.
"""

import json
import time

import torch
from torch import nn

from . import data
from .diffusion import PREDICTIONS, Schedule, diffusion_loss, sample
from .unet import UNet

WEIGHTINGS = (None, "min_snr")

# The sampler every chapter uses unless told otherwise: DDIM-50 with eta = 1 (fresh noise at each step, as in
# DDPM). Measured on the batch-64 linear-schedule cpu models (400 held-out-seed samples): eta = 0 -> 1 raised the
# unconditional model's valid share from 35% to 47% and CFG's caption accuracy (w = 2) from 82.5% to 92.7%.
# On the cosine-schedule cpu ddpm (notebook 09, 300 samples): 57.3% valid at eta = 0, 62.0% at 0.5, 70.0% at 1.
# The noise lets later steps correct an imperfect model's earlier mistakes; the cost per step is the same.
SAMPLE_STEPS = 50
SAMPLE_ETA = 1.0


class DiffusionModel(nn.Module):
    """model(x_t, t, cond=None) -> prediction; .loss(batch); .generate(n, cond, guidance, ...)."""

    def __init__(self, unet: dict, schedule="linear", T=1000, prediction="eps", weighting=None, p_uncond=0.0):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not 0 <= p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond!r}")
        self.net = UNet(**{**unet, "num_timesteps": T})
        if p_uncond > 0 and self.net.config["num_classes"] is None and self.net.config["cond_dim"] is None:
            raise ValueError("p_uncond > 0 drops a condition, but the network has none (give num_classes or cond_dim)")
        self.schedule = Schedule(schedule, T)
        self.prediction, self.weighting, self.p_uncond = prediction, weighting, p_uncond
        self.config = dict(unet=self.net.config, schedule=schedule, T=T, prediction=prediction,
                           weighting=weighting, p_uncond=p_uncond)

    @property
    def conditional(self):
        return self.net.config["num_classes"] is not None or self.net.config["cond_dim"] is not None

    def forward(self, x_t, t, cond=None, image_cond=None):
        return self.net(x_t, t, cond=cond, image_cond=image_cond)

    def loss(self, batch, generator=None):
        """diffusion.diffusion_loss with this model's prediction, weighting and dropout (cond in batch["cond"])."""
        return diffusion_loss(self, batch, self.schedule, self.prediction, self.weighting,
                              cond_key="cond" if self.conditional else None, p_uncond=self.p_uncond,
                              generator=generator)

    @torch.no_grad()
    def generate(self, n, cond=None, guidance=None, steps=SAMPLE_STEPS, method="ddim", eta=None, seed=0,
                 bf16=True, progress=False, batch_size=500):
        """n images in [-1, 1]: diffusion.sample with this model's schedule and prediction type, in
        batches of `batch_size`, under bfloat16 autocast (the sampler's arithmetic stays float32).
        eta=None is SAMPLE_ETA for DDIM; ancestral DDPM has no eta."""
        if eta is None:
            eta = SAMPLE_ETA if method == "ddim" else 0.0
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of images, got {n!r}")
        if cond is not None and not self.conditional:
            raise ValueError("this model is unconditional: leave cond=None")
        if self.conditional and cond is None:
            cond = self.net.null_condition(n)      # no condition given: sample the unconditional model
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        c, r = self.net.channels, self.net.resolution
        out = []
        for start in range(0, n, batch_size):
            part = None if cond is None else cond[start:start + batch_size]
            size = min(batch_size, n - start)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type in ("cpu", "cuda")):
                out.append(sample(self, self.schedule, (size, c, r, r), steps, method, eta, part, guidance,
                                  seed + start, prediction=self.prediction, progress=progress).float())
        self.train(was_training)
        return torch.cat(out).clamp(-1, 1)


def ddpm_loss(model, batch):
    """The loss for train.train: the model's own (prediction, weighting, dropout)."""
    return model.loss(batch)


# ----------------------------------------------------------------------------- Shapes classes

def class_batch(batch):
    """Add batch["cond"] = the class (shape x colour, 0..29) of each one-object scene."""
    first = batch["objects"][:, 0]
    return {**batch, "cond": data.pair_id(first[:, 0], first[:, 1])}


def class_loss(model, batch):
    return model.loss(class_batch(batch))


# ----------------------------------------------------------------------------- the zoo recipe "ddpm"

# The cpu network: patchified (2x2 pixels per token: 3.9x less compute than full resolution, measured),
# widths 32/64/128, attention at 8x8: 2.9M parameters.
NET = {"smoke": dict(widths=[16, 32], patch_size=2, attention_levels=[1]),
       "cpu": dict(widths=[32, 64, 128], patch_size=2, attention_levels=[2]),
       "full": dict(widths=[64, 128, 256], patch_size=1, attention_levels=[2], blocks_per_level=2)}
# The cosine schedule keeps far more of a 32x32 object deep into the process (at t = 500 ~11x the linear schedule's
# SNR, at t = 750 ~50x), so more of the training steps and of the 50 sampling steps fall where the picture is
# decided. Measured on the cpu recipe, same seed (valid share, 200 samples, at 2,800 / 4,800 steps): linear
# 0.395 / 0.635, cosine 0.58 / 0.70; the noisy classifier's accuracy by t quartile: linear 0.92 / 0.40 / 0.06 / 0.04,
# cosine 0.99 / 0.87 / 0.48 / 0.11.
PROCESS = dict(schedule="cosine", T=1000, prediction="v", weighting="min_snr")
DATASET_SIZE = {"smoke": 2_000, "cpu": 50_000, "full": 100_000}


def build(preset="cpu", num_classes=None, p_uncond=0.0):
    return DiffusionModel({**NET[preset], "num_classes": num_classes}, p_uncond=p_uncond, **PROCESS)


def shapes_dataset(preset):
    """One-object scenes of the train split: the data of chapters 09-11."""
    return data.ShapesDataset(DATASET_SIZE[preset], "train", seed=0, num_objects=1)


# time-to-quality: every `every` steps, score `images` DDIM-50 samples of the EMA model with the oracle
SNAPSHOTS = {"smoke": dict(every=10, images=16), "cpu": dict(every=400, images=200),
             "full": dict(every=2500, images=500)}


def quality_snapshot(images, guidance=None, seed=12345, classifier=None):
    """A snapshot fn for train.train: sample `images` images (DDIM-50) and return the oracle's numbers,
    so the training history holds a quality-vs-time curve. A conditional model draws balanced class
    prompts and is scored on them (caption accuracy), at CFG scale `guidance`; so does an unconditional
    one given a noisy `classifier`, which guides it at scale `guidance` with the recipe's smoothing (chapter 10)."""
    from .guidance import CLASSIFIER_SMOOTHING, SMOOTHING_SAMPLES, classifier_guided_generate
    from .oracle import load_oracle
    from .scoreboard import score
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


def fit(model, preset, run_dir=None, recipe="ddpm", loss=ddpm_loss, guidance=None):
    from .presets import train_config
    from .train import train
    every, images = SNAPSHOTS[preset]["every"], SNAPSHOTS[preset]["images"]
    return train(model, loss, shapes_dataset(preset), train_config(recipe, preset), run_dir=run_dir,
                 kind="diffusion", snapshot=(every, quality_snapshot(images, guidance)))


CURVES = ("ddpm", "cfg", "classifier_guidance")


def time_to_quality(recipe="ddpm", preset="cpu", steps=None, every=None, images=None, guidance=None):
    """Train a fresh model of `recipe` for `steps` (default: the preset's budget; a cosine learning-rate
    decay, where the recipe has one, stretches to fit) and score `images` samples every `every` steps.
    Returns rows of {step, minutes, validity, fid, coverage[, caption_accuracy]}: quality against training
    time, same seed every time.
    "classifier_guidance" trains a fresh "ddpm" and scores it guided by the zoo's noisy classifier of the
    same preset (trained or loaded first; its own training time is not in `minutes`).
    Nothing is cached: this measures, it does not make a model to keep."""
    from . import guidance as guidance_module
    from . import zoo
    from .presets import train_config
    from .train import seed_everything, train
    if recipe not in CURVES:
        raise ValueError(f"time_to_quality: recipe must be one of {CURVES}, got {recipe!r}")
    training = "ddpm" if recipe == "classifier_guidance" else recipe
    config = train_config(training, preset, **({"steps": steps} if steps else {}))
    every = every or SNAPSHOTS[preset]["every"]
    images = images or SNAPSHOTS[preset]["images"]
    default_scale = {"cfg": guidance_module.CFG_SCALE, "classifier_guidance": guidance_module.CLASSIFIER_SCALE}
    guidance = guidance if guidance is not None else default_scale.get(recipe)
    classifier = zoo.load_or_train("classifier_guidance", preset) if recipe == "classifier_guidance" else None
    seed_everything(0)
    model = guidance_module.build_cfg(preset) if recipe == "cfg" else build(preset)
    measure, rows = quality_snapshot(images, guidance, classifier=classifier), []

    def snapshot(step, seconds, sample_model):
        rows.append({"step": step, "minutes": seconds / 60, **measure(step, seconds, sample_model)})
        print(json.dumps(rows[-1]), flush=True)

    train(model, class_loss if recipe == "cfg" else ddpm_loss, shapes_dataset(preset), config,
          kind="diffusion", snapshot=(every, snapshot))
    return rows


def sample_unconditional(model, prompts, n, seed):
    return model.generate(n, seed=seed)


def timed_generate(model, n=64, **kwargs):
    """(images, seconds): the sampling time the chapter bars are about (DDIM-50 of 64 images by default)."""
    start = time.perf_counter()
    images = model.generate(n, **kwargs)
    return images, time.perf_counter() - start


def _register():
    from . import zoo
    zoo.register(zoo.Recipe("ddpm", "diffusion", build, fit, sample=sample_unconditional,
                            description="unconditional DDPM (v-prediction, min-SNR) on one-object Shapes scenes"))


_register()
