"""Chapter 04's recipes: the VAE, and the posterior-collapse demo (the mean-vs-sum reduction bug)."""

import torch

from .. import data
from .. import vae
from ..layers import in_batches
from ..lab.oracle import load_oracle, read
from ..lab.scoreboard import score_reconstructions
from ..lab.zoo import Recipe
from .common import shapes_train, unconditional

REPORT_IMAGES = 1000                            # held-out test images behind every reported number
# the learned MixturePrior: 1,024 Gaussians fitted by EM to the codes of 20k training images (smoke: a small one)
PRIOR = {"smoke": dict(prior_images=2_000, prior_components=64),
         "cpu": dict(prior_images=20_000, prior_components=1024), "full": dict(prior_images=20_000, prior_components=1024)}


def fit_recipe_prior(model, preset="cpu"):
    """The recipe's MixturePrior at `preset`: prior_components Gaussians fitted to the codes of prior_images
    training images."""
    n, k = VAE.setting("prior_images", preset), VAE.setting("prior_components", preset)
    images = data.ShapesDataset(n, "train", seed=0).get_batch(torch.arange(n))["image"]
    return vae.fit_mixture_prior(model, images, k=k)


def report(model, n=REPORT_IMAGES, seed=1000, preset="cpu"):
    """Measured on n held-out test images: reconstruction PSNR and oracle caption accuracy (from the
    posterior mean), ELBO in bits/dim (discretized likelihood: real bits/dim of 8-bit pixels), active units;
    and the oracle validity of n samples drawn with the learned MixturePrior instead of N(0, I)."""
    test = data.ShapesDataset(n, "test", seed=seed)
    images = test.get_batch(torch.arange(n))["image"]
    recon = in_batches(model.reconstruct, images, next(model.parameters()).device, batch_size=250)
    numbers = score_reconstructions(recon, images, test.scenes.captions)
    held_out = vae.evaluate(model, images, seed=seed)
    learned = vae.sample_with_prior(model, fit_recipe_prior(model, preset), n, seed=seed)
    return {**numbers, **{k: held_out[k] for k in ("elbo_bits_per_dim", "nll_bits_per_dim",
                                                    "kl_bits_per_dim", "kl_nats", "active_units")},
            "mixture_prior_validity": read(load_oracle(), learned).valid.float().mean().item()}


VAE = Recipe(
    "vae", "vae", vae.VAE, description="VAE: Gaussian q(z|x), N(0, I) prior, discretized-logistic decoder",
    # the small cpu widths buy ~3x more steps than (32, 64, 128) in the same time, which mattered more here
    model={"smoke": dict(latent_dim=16, widths=(16, 32, 64), kl_warmup_steps=10, log_scale_init=-4.0),
           "cpu": dict(latent_dim=32, widths=(16, 32, 64), kl_warmup_steps=800, log_scale_init=-4.0),
           "full": dict(latent_dim=32, widths=(32, 64, 128), kl_warmup_steps=3000, log_scale_init=-4.0)},
    loss=vae.vae_loss, dataset=shapes_train,
    data={"smoke": dict(size=640), "cpu": dict(size=50_000), "full": dict(size=50_000)},
    # cpu: 5,000 steps of 64 (~9 min on 2 idle cores); what 2,500 and 5,000 steps measure: notebook 04
    training={
        "smoke": dict(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, grad_clip=1.0, log_every=5),
        "cpu": dict(steps=5000, batch_size=64, lr=3e-3, warmup_steps=50, lr_schedule="cosine", grad_clip=1.0,
                    ema_decay=0.995, bf16=True, log_every=50),
        "full": dict(steps=10000, batch_size=128, lr=2e-3, warmup_steps=200, lr_schedule="cosine", grad_clip=1.0,
                     ema_decay=0.999, bf16=True, log_every=100),
    },
    settings=PRIOR, sample=unconditional(lambda model, n, seed: model.sample(n, seed)), report=report)

# the collapse shows within 150 steps
COLLAPSE_DEMO_TRAINING = {  # TrainConfig fields per preset (notebook 04 trains it by hand)
    "smoke": dict(steps=10, batch_size=16, lr=2e-3, grad_clip=1.0, log_every=5),
    "cpu": dict(steps=150, batch_size=64, lr=2e-3, warmup_steps=20, grad_clip=1.0, bf16=True, log_every=25),
    "full": dict(steps=300, batch_size=64, lr=2e-3, warmup_steps=20, grad_clip=1.0, bf16=True, log_every=25),
}

RECIPES = [VAE]
