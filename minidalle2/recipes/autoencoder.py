"""Chapters 02-03's recipes: the auto-encoder, the denoising auto-encoder, the bottleneck sweep and the
noise-level-input comparison, with the held-out reports they are measured by."""


import torch

from .. import autoencoder as ae
from .. import data
from ..lab import metrics
from ..lab.scoreboard import score_reconstructions
from ..lab.train import train
from ..lab.zoo import Recipe
from .common import shapes_train, unconditional

LATENT_DIM = 64
WIDTHS = (16, 32, 64)            # per CPU-second, (16, 32, 64) reaches a given PSNR faster than (32, 64, 128)
SWEEP_LATENT_DIMS = (4, 16, 64)  # chapter 02's bottleneck sweep: recipes "autoencoder_z4", ...
# a fixed training set of at most 50k images (the test split is held out for the reports)
DATA = {"smoke": dict(size=2_000), "cpu": dict(size=50_000), "full": dict(size=50_000)}
SWEEP_DATA = {"smoke": dict(size=2_000), "cpu": dict(size=38_400), "full": dict(size=50_000)}

# 6,000 steps of 64 (~10 min on 2 idle cores) reach the chapters' bars where 3,000 did not: notebooks 02 and 03
TRAINING = {
    "smoke": dict(steps=20, batch_size=32, lr=3e-3, log_every=5),
    "cpu": dict(steps=6000, batch_size=64, lr=3e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0,
                bf16=True, log_every=100),
    "full": dict(steps=20000, batch_size=128, lr=2e-3, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
                 bf16=True, log_every=200),
}
# the sweeps are short, so notebooks 02 and 03 stay within ~15 minutes at cpu
SWEEP_TRAINING = {
    "smoke": dict(steps=10, batch_size=32, lr=2e-3, log_every=5),
    "cpu": dict(steps=600, batch_size=64, lr=3e-3, warmup_steps=50, lr_schedule="cosine", grad_clip=1.0, bf16=True,
                log_every=50),
    "full": dict(steps=3000, batch_size=128, lr=2e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0,
                 bf16=True, log_every=100),
}


def fit(model, job):
    """The training loop, then a Gaussian fitted to the latents of (up to) 5,000 training images, to sample from."""
    dataset = job.dataset()
    result = train(model, job.recipe.loss, dataset, job.train_config(), run_dir=job.run_dir, kind=job.recipe.kind)
    ae.fit_latent_gaussian(result.ema_model, dataset.get_batch(torch.arange(min(len(dataset), 5000)))["image"])
    return result


def held_out(n=1000, seed=7):
    """n test-split images and their captions: what the reports measure on."""
    batch = data.ShapesDataset(n, "test", seed=seed).get_batch(torch.arange(n))
    return batch["image"], batch["caption"]


def reconstruction_report(model, n=1000, seed=7):
    """Held-out reconstruction numbers: PSNR, oracle caption accuracy and validity of the reconstructions."""
    images, captions = held_out(n, seed)
    return score_reconstructions(ae.reconstruct(model, images), images, captions)


def denoising_report(model, sigma=0.3, n=1000, seed=7):
    """At one noise level on held-out images: PSNR of the noisy input and of the denoised output, the gain,
    and the oracle's caption accuracy / validity on the denoised images."""
    images, captions = held_out(n, seed)
    noisy = ae.add_gaussian_noise(images, sigma, torch.Generator().manual_seed(seed))
    sigmas = torch.full((n,), float(sigma)) if model.noise_level_input else None
    report = score_reconstructions(ae.reconstruct(model, noisy, sigmas), images, captions)
    psnr_noisy = metrics.psnr(noisy, images).mean().item()
    return {"sigma": sigma, "psnr_noisy": psnr_noisy, **report, "psnr_gain": report["psnr"] - psnr_noisy}


def _autoencoder(name, description, loss, report, latent_dim=LATENT_DIM, noise_level_input=False, sweep=False,
                 sample=None):
    model = dict(latent_dim=latent_dim, widths=WIDTHS, noise_level_input=noise_level_input)
    return Recipe(name, "autoencoder", ae.Autoencoder, description=description, model={p: model for p in TRAINING},
                  loss=loss, dataset=shapes_train, data=SWEEP_DATA if sweep else DATA, fit=fit,
                  training=SWEEP_TRAINING if sweep else TRAINING, report=report, sample=sample)


RECIPES = [
    _autoencoder("autoencoder", f"conv auto-encoder, {LATENT_DIM}-number bottleneck; samples decode z from a "
                 "Gaussian fitted to the training latents", ae.autoencoder_loss, reconstruction_report,
                 sample=unconditional(ae.sample_random_latents)),
    _autoencoder("denoising_autoencoder", "the same auto-encoder trained to rebuild clean images from noisy "
                 "(sigma ~ U(0, 0.5)) or patch-masked ones", ae.denoising_autoencoder_loss, denoising_report),
    *[_autoencoder(f"autoencoder_z{d}", f"bottleneck sweep: a {d}-number latent, shorter budget", ae.autoencoder_loss,
                   reconstruction_report, latent_dim=d, sweep=True) for d in SWEEP_LATENT_DIMS],
    # the noise level as an input: the step towards DDPM's denoiser, and its baseline at the same budget
    _autoencoder("denoising_autoencoder_sigma_in", "denoiser told the noise level sigma (a 4th input plane); "
                 "shorter budget", ae.denoising_autoencoder_loss, denoising_report, noise_level_input=True, sweep=True),
    _autoencoder("denoising_autoencoder_short", "the denoiser without the noise level, at the same shorter budget",
                 ae.denoising_autoencoder_loss, denoising_report, sweep=True),
]
