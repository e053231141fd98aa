"""
Auto-encoders (chapter 02) and denoising auto-encoders (chapter 03).

    model = Autoencoder(latent_dim=64)
    z = model.encode(x)            # (B, 3, 32, 32) -> (B, 64): the bottleneck
    x_hat = model.decode(z)        # (B, 64) -> (B, 3, 32, 32)
    loss = reconstruction_loss(model(x), x)

An auto-encoder squeezes an image x through a small feature z (the *bottleneck*) and is trained to
rebuild x from z alone:  z = E(x),  x_hat = D(z),  L = ||x_hat - x||^2.
A denoising auto-encoder corrupts the input first and still rebuilds the CLEAN image:
x_tilde = corrupt(x),  L = ||D(E(x_tilde)) - x||^2. With the noise level as an extra input this is the
denoiser at the heart of DDPM (chapter 09).

An auto-encoder is not a generator: nothing makes its latents follow a known distribution. The
"autoencoder" recipe still samples, as a fair baseline for the VAE: it decodes z drawn from a
Gaussian fitted to the training latents (per-dimension mean and std, stored in the model).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import check_seed
from .layers import ConvDecoder, ConvEncoder, expect_images, expect_latents, in_batches


class Autoencoder(nn.Module):
    """Encoder -> vector bottleneck z (latent_dim numbers) -> decoder. With noise_level_input=True the
    encoder also sees the noise level sigma as a 4th input plane (a noise-conditioned denoiser)."""

    def __init__(self, latent_dim=64, widths=(32, 64, 128), channels=3, resolution=32, noise_level_input=False):
        super().__init__()
        if not (isinstance(latent_dim, int) and latent_dim >= 1):
            raise ValueError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
        self.config = dict(latent_dim=latent_dim, widths=list(widths), channels=channels,
                           resolution=resolution, noise_level_input=noise_level_input)
        self.latent_dim, self.channels, self.resolution = latent_dim, channels, resolution
        self.noise_level_input = noise_level_input
        self.encoder = ConvEncoder(channels + noise_level_input, resolution, widths, out_features=latent_dim)
        self.decoder = ConvDecoder(latent_dim, channels, resolution, widths)
        # a Gaussian fitted to the training latents (fit_latent_gaussian); used only to sample
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))

    def encode(self, x, sigma=None):
        x = expect_images(x, self.channels, self.resolution, type(self).__name__)
        if self.noise_level_input:  # the denoiser is told how noisy its input is
            if sigma is None:
                raise ValueError("this model takes the noise level: call encode(x, sigma) / model(x, sigma)")
            plane = _per_image(sigma, x).expand(-1, 1, *x.shape[2:])
            x = torch.cat([x, plane.to(x.dtype)], 1)
        return self.encoder(x)                                  # z = E(x)

    def decode(self, z):
        expect_latents(z, self.latent_dim, type(self).__name__)
        return self.decoder(z)                                  # x_hat = D(z), unbounded

    def forward(self, x, sigma=None):
        return self.decode(self.encode(x, sigma))               # x_hat = D(E(x))


def reconstruction_loss(x_hat, x):
    """Mean squared error per pixel: L = mean (x_hat - x)^2 (the mean, so the LR does not depend on image size)."""
    return F.mse_loss(x_hat.float(), x.float())


# ----------------------------------------------------------------------------- corruptions

def _any_images(x, who):
    """A float batch (B, C, R, R) of any size; a clear error if not."""
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        return expect_images(x, x.shape[1], x.shape[2], who)
    return expect_images(x, 3, 32, who)  # raises with the shape it got


def _per_image(value, x):
    """A float or a (B,) tensor -> a tensor broadcastable to x: (B, 1, 1, 1) or a scalar."""
    value = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if value.ndim == 1 and len(value) == len(x):
        return value.view(-1, 1, 1, 1)
    if value.ndim != 0:
        raise ValueError(f"expected one number or one per image ({len(x)},), got shape {tuple(value.shape)}")
    return value.view(1, 1, 1, 1).expand(len(x), 1, 1, 1)


def add_gaussian_noise(x, sigma, generator=None):
    """x_tilde = x + sigma * eps, eps ~ N(0, I). sigma: a float or one per image (B,). Not clipped."""
    x = _any_images(x, "add_gaussian_noise")
    sigma = _per_image(sigma, x)
    if not (torch.isfinite(sigma).all() and (sigma >= 0).all()):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma.flatten().tolist()[:4]}")
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma.to(x.dtype) * eps


def mask_patches(x, ratio, patch_size=1, generator=None):
    """Hide each (patch_size x patch_size) patch, all channels at once, with probability `ratio`:
    masked pixels become 0 (mid-grey). Returns (x_masked, keep) with keep (B, 1, H, W) in {0, 1}."""
    x = _any_images(x, "mask_patches")
    ratio = _per_image(ratio, x)
    if not (torch.isfinite(ratio).all() and (ratio >= 0).all() and (ratio < 1).all()):
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio.flatten().tolist()[:4]}")
    if not (isinstance(patch_size, int) and patch_size >= 1 and x.shape[-1] % patch_size == 0):
        raise ValueError(f"patch_size must be an int dividing the image size {x.shape[-1]}, got {patch_size!r}")
    grid = x.shape[-1] // patch_size
    u = torch.rand((len(x), 1, grid, grid), generator=generator, device=x.device)
    keep = (u >= ratio).to(x.dtype)                              # P(masked) = ratio
    keep = keep.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return x * keep, keep


def corrupt(x, sigma_max=0.5, mask_prob=0.25, max_mask_ratio=0.5, generator=None):
    """The training corruption of the denoiser: per image, Gaussian noise with sigma ~ U(0, sigma_max),
    or (with probability mask_prob) random 4x4-patch masking with ratio ~ U(0, max_mask_ratio).
    Returns (x_tilde, sigma) where sigma is 0 for masked images."""
    b = len(x)
    rand = lambda: torch.rand(b, generator=generator, device=x.device)
    sigma, use_mask, ratio = sigma_max * rand(), rand() < mask_prob, max_mask_ratio * rand()
    sigma = torch.where(use_mask, torch.zeros_like(sigma), sigma)
    noisy = add_gaussian_noise(x, sigma, generator)
    masked, _ = mask_patches(x, ratio, patch_size=4, generator=generator)
    return torch.where(use_mask.view(-1, 1, 1, 1), masked, noisy), sigma


def denoising_loss(model, clean, corrupted, sigma=None):
    """L = mean (D(E(x_tilde)) - x)^2: rebuild the CLEAN image x from its corrupted copy x_tilde."""
    return reconstruction_loss(model(corrupted, sigma), clean)


# ----------------------------------------------------------------------------- training losses: loss_fn(model, batch)

def autoencoder_loss(model, batch):
    x = batch["image"]
    x_hat = model(x)
    loss = reconstruction_loss(x_hat, x)
    return loss, {"psnr": 10 * math.log10(4.0 / max(loss.item(), 1e-12))}   # PSNR = 10 log10(2^2 / MSE)


def denoising_autoencoder_loss(model, batch):
    x = batch["image"]
    x_tilde, sigma = corrupt(x)  # fresh corruption every step (train() seeds each step)
    return denoising_loss(model, x, x_tilde, sigma if model.noise_level_input else None)


# ----------------------------------------------------------------------------- evaluation helpers

@torch.no_grad()
def reconstruct(model, images, sigma=None, batch_size=500):
    """model(images) in batches without gradients, on the model's device; returns CPU float images."""
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(images), batch_size):
        s = sigma[i:i + batch_size] if isinstance(sigma, torch.Tensor) and sigma.ndim == 1 else sigma
        outs.append(model(images[i:i + batch_size].to(device), s).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def fit_latent_gaussian(model, images, batch_size=500):
    """Store the per-dimension mean and std of the latents of `images` in the model (for sampling)."""
    sigma = 0.0 if model.noise_level_input else None   # a denoiser's latents of clean images
    z = in_batches(lambda x: model.encode(x, sigma), images, next(model.parameters()).device, batch_size)
    model.latent_mean.copy_(z.mean(0))
    model.latent_std.copy_(z.std(0))
    return z


@torch.no_grad()
def sample_random_latents(model, n, seed=0):
    """Decode z ~ N(latent_mean, diag(latent_std^2)): the AE's best guess at 'a random image'."""
    g = torch.Generator().manual_seed(check_seed(seed))
    z = model.latent_mean.cpu() + model.latent_std.cpu() * torch.randn(n, model.latent_dim, generator=g)
    return in_batches(model.decode, z, next(model.parameters()).device).clamp(-1, 1)
