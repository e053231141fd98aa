"""
Shared network blocks. Chapters build their models from these so that a change of idea
(AE -> VAE -> GAN discriminator) is a change of a few lines, not a new network.

    encoder = ConvEncoder(out_features=128)      # (B, 3, 32, 32) -> (B, 128)
    decoder = ConvDecoder(in_features=128)       # (B, 128) -> (B, 3, 32, 32), unbounded
    x = expect_images(x, channels=3, resolution=32, who="VAE")   # clear error on a bad input

Both are stacks of stride-2 stages (32 -> 16 -> 8 -> 4 with three widths) of pre-activation
residual blocks. `spectral=True` wraps every conv and linear layer in spectral normalisation
(the GAN discriminator's Lipschitz control); `norm=None` drops GroupNorm (a discriminator
with spectral norm does not want batch statistics or group statistics).
"""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def expect_images(x, channels=3, resolution=32, who="model"):
    """Check that x is a float batch (B, channels, resolution, resolution); a clear error if not."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor of images, got {type(x).__name__}")
    expected = f"(B, {channels}, {resolution}, {resolution})"
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != resolution or x.shape[3] != resolution:
        hint = " (a single image? use x[None])" if x.ndim == 3 else ""
        raise ValueError(f"{who} expects images of shape {expected}, got {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects float images in [-1, 1], got dtype {x.dtype} "
                        "(for uint8 images use x.float() / 127.5 - 1)")
    return x


def expect_latents(z, dim, who="model"):
    """Check that z is a float batch of latent vectors (B, dim); a clear error if not."""
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != dim:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{who} expects latents z of shape (B, {dim}), got {shape}")
    return z


@torch.no_grad()
def in_batches(fn, x, device, batch_size=500):
    """fn over x in chunks moved to `device`, without gradients; the outputs concatenated as CPU floats
    (evaluating thousands of images at once would need gigabytes of activations)."""
    return torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def _maybe_spectral(layer, spectral):
    return spectral_norm(layer) if spectral else layer


def _norm(channels, norm):
    if norm is None:
        return nn.Identity()
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"norm must be 'group' or None, got {norm!r}")


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(act(norm(conv(act(norm(x)))))), 1x1 skip if widths differ."""

    def __init__(self, in_channels, out_channels, norm="group", spectral=False, activation=nn.SiLU):
        super().__init__()
        conv = lambda i, o, k: _maybe_spectral(nn.Conv2d(i, o, k, padding=k // 2), spectral)
        self.body = nn.Sequential(_norm(in_channels, norm), activation(), conv(in_channels, out_channels, 3),
                                  _norm(out_channels, norm), activation(), conv(out_channels, out_channels, 3))
        self.skip = nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1)

    def forward(self, x):
        return self.skip(x) + self.body(x)


class ConvEncoder(nn.Module):
    """Images (B, C, R, R) -> features (B, out_features). Each width is one ResBlock then a stride-2 conv."""

    def __init__(self, channels=3, resolution=32, widths=(32, 64, 128), out_features=128,
                 norm="group", spectral=False, activation=nn.SiLU):
        super().__init__()
        final = resolution // 2 ** len(widths)
        if final < 1 or resolution % 2 ** len(widths):
            raise ValueError(f"resolution {resolution} cannot be halved {len(widths)} times")
        self.channels, self.resolution = channels, resolution
        sn = lambda layer: _maybe_spectral(layer, spectral)
        layers, width = [sn(nn.Conv2d(channels, widths[0], 3, padding=1))], widths[0]
        for w in widths:
            layers += [ResBlock(width, w, norm, spectral, activation), sn(nn.Conv2d(w, w, 4, stride=2, padding=1))]
            width = w
        layers += [_norm(width, norm), activation(), nn.Flatten(), sn(nn.Linear(width * final * final, out_features))]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(expect_images(x, self.channels, self.resolution, type(self).__name__))


class ConvDecoder(nn.Module):
    """Features (B, in_features) -> images (B, C, R, R), unbounded (add tanh or clamp outside).
    The mirror of ConvEncoder: a linear map to a (widths[-1], R/2^k, R/2^k) grid, then per width
    a nearest-neighbour 2x upsample, a conv and a ResBlock."""

    def __init__(self, in_features=128, channels=3, resolution=32, widths=(32, 64, 128),
                 norm="group", activation=nn.SiLU):
        super().__init__()
        self.start = resolution // 2 ** len(widths)
        if self.start < 1 or resolution % 2 ** len(widths):
            raise ValueError(f"resolution {resolution} cannot be halved {len(widths)} times")
        self.in_features, self.width = in_features, widths[-1]
        self.project = nn.Linear(in_features, widths[-1] * self.start * self.start)
        layers, width = [], widths[-1]
        for w in reversed(widths):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, w, 3, padding=1),
                       ResBlock(w, w, norm, False, activation)]
            width = w
        layers += [_norm(width, norm), activation(), nn.Conv2d(width, channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        expect_latents(z, self.in_features, type(self).__name__)
        return self.net(self.project(z).view(len(z), self.width, self.start, self.start))
