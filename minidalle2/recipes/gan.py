"""Chapter 01's recipes: the GAN, and the "bad setting" of its instability demo."""

from functools import partial

import torch

from .. import gan
from ..lab.train import train
from ..lab.zoo import Recipe
from .common import shapes_train, unconditional

DATA = {"smoke": dict(size=2_000), "cpu": dict(size=50_000), "full": dict(size=100_000)}

GAN = Recipe(
    "gan", "gan", gan.GAN, description="unconditional GAN: non-saturating loss, spectral-norm D, EMA of G",
    loss=partial(gan.gan_loss, kind="nonsaturating"), dataset=shapes_train, data=DATA,
    # cpu: 2,500 steps, about 3 of its 10 minutes on 2 idle cores; it does not reach the bar (results: notebook 01)
    training={
        "smoke": dict(steps=20, batch_size=32, lr=2e-4, betas=(0.0, 0.99), ema_decay=0.9, log_every=5),
        "cpu": dict(steps=2500, batch_size=64, lr=2e-4, betas=(0.0, 0.99), ema_decay=0.995, bf16=True, log_every=50),
        "full": dict(steps=10000, batch_size=128, lr=2e-4, betas=(0.0, 0.99), ema_decay=0.999, bf16=True,
                     log_every=100),
    },
    sample=unconditional(lambda model, n, seed: model.sample(n, seed)))

# no spectral norm, the saturating G loss and a ten times higher lr; it only has to show the failure, so fewer steps
GAN_UNSTABLE = GAN.variant(
    "gan_unstable", model=dict(spectral=False), loss=partial(gan.gan_loss, kind="saturating"),
    description="chapter 01's bad setting: no spectral norm, saturating loss, high lr",
    training={p: {**GAN.training[p], "lr": 2e-3, "steps": steps, "log_every": log_every}
              for p, (steps, log_every) in {"smoke": (10, 5), "cpu": (400, 25), "full": (3000, 100)}.items()})

RECIPES = [GAN, GAN_UNSTABLE]


def fit_with_snapshots(recipe, model, preset, fixed_z=None, every=None):
    """Train `model` with `recipe` at `preset` (no cache), keeping G's images for the same fixed z every
    `every` steps (the sample grid over training). Returns (TrainResult, [(step, images)])."""
    config = recipe.train_config(preset)
    every = every or max(1, config.log_every)
    fixed_z = fixed_z if fixed_z is not None else model.latents(8, seed=0)
    snapshots = []

    def on_log(entry):
        if entry["step"] % every == 0:
            model.generator.eval()
            with torch.no_grad():
                snapshots.append((entry["step"], model.generator(fixed_z).float().cpu()))
            model.generator.train()
    result = train(model, recipe.loss, recipe.make_dataset(preset), config, kind=recipe.kind, on_log=on_log)
    return result, snapshots
