"""
unCLIP's first upsampler (Ramesh et al., 2022, section 2.1; the cascade of Ho et al. 2021): a diffusion model of
the 64-px image given the 32-px one. No caption, no embedding, no guidance: the low-resolution image says
almost everything, the upsampler only adds the detail a 32-px grid cannot hold.

    up = Upsampler()                                   # a fully convolutional U-Net: train on crops, run at 64 px
    loss, logs = upsampler_loss(up, {"image": images_64})         # the 32-px input is made (and corrupted) here
    images_64 = up.upsample(images_32)                 # DDIM, few steps (SAMPLE_STEPS)

The network reads the low-resolution image upsampled (bilinear) to the output size and concatenated to x_t as
3 more channels; it has no attention, so it runs at any size, and a net trained on 32x32 crops of 64-px images (a
quarter of the compute per step) runs on whole 64-px images.

Conditioning augmentation. In training the low-resolution input is a downsampled real image; at sampling it is
the decoder's output, which is never quite like one (soft edges, off colours). So in training the input is
corrupted first -- blurred (with probability P_BLUR, a random width) and noised, x_low + s * eps with a random
level s ~ U[0, MAX_NOISE] that the network is told (its embedding is added to the timestep embedding, like a
class). The network learns to treat its input as evidence of a given reliability, not as truth. At sampling the
level is explicit: upsample(x, noise_level=SAMPLE_NOISE) adds that much noise and says so. augment=False trains
on clean inputs only (the comparison of notebook 13).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion_model import DiffusionModel
from .layers import expect_images, timestep_embedding
from .unet import UNet

P_BLUR = 0.5                  # share of training inputs blurred ...
BLUR_SIGMA = (0.4, 1.0)       # ... with a Gaussian of this width (32-px pixels)
MAX_NOISE = 0.3               # training noise levels s ~ U[0, MAX_NOISE] (pixel values span [-1, 1])
SAMPLE_NOISE = 0.1            # the level added, and announced, at sampling time
SAMPLE_STEPS = 16             # DDIM steps: the input fixes most of the image
LEVEL_DIM = 32                # width of the noise level's sinusoidal embedding


def gaussian_blur(images, sigma):
    """Blur each image (B, C, H, W) by a Gaussian of its own width sigma (B,) (0: unchanged), reflect-padded."""
    B, C, H, W = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max()))) if len(sigma) else 1
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    s = sigma.float().to(images.device).clamp(min=1e-3)[:, None]
    kernel = torch.exp(-x[None] ** 2 / (2 * s ** 2))
    kernel = torch.where(sigma.to(images.device)[:, None] > 0, kernel, (x == 0).float()[None])
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)        # (B*C, K), one per channel
    h = F.pad(images.reshape(1, B * C, H, W).float(), (radius, radius, radius, radius), mode="reflect")
    h = F.conv2d(h, kernel[:, None, None, :], groups=B * C)                          # along x
    h = F.conv2d(h, kernel[:, None, :, None], groups=B * C)                          # along y
    return h.reshape(B, C, H, W).to(images.dtype)


class UpsamplerNet(nn.Module):
    """net(x_t, t, low_res, noise_level) -> prediction: a U-Net without attention over [x_t, low_res] (6
    channels, low_res already at x_t's size), the noise level (B,) embedded and added to the timestep embedding."""

    def __init__(self, widths=(32, 64, 128), patch_size=2, blocks_per_level=1, dropout=0.0, num_timesteps=1000):
        super().__init__()
        widths = [int(w) for w in widths]
        self.config = dict(widths=widths, patch_size=patch_size, blocks_per_level=blocks_per_level, dropout=dropout,
                           num_timesteps=num_timesteps)
        self.unet = UNet(3, None, widths, blocks_per_level, attention_levels=[], cond_dim=LEVEL_DIM,
                         image_cond_channels=3, patch_size=patch_size, dropout=dropout, num_timesteps=num_timesteps)

    def forward(self, x, t, low_res, noise_level):
        if not isinstance(noise_level, torch.Tensor) or noise_level.shape != (len(x),):
            got = tuple(noise_level.shape) if isinstance(noise_level, torch.Tensor) else type(noise_level).__name__
            raise ValueError(f"UpsamplerNet expects noise_level of shape ({len(x)},), got {got}")
        level = timestep_embedding(noise_level.float() * 1000, LEVEL_DIM)     # levels in [0, 1) like t / T
        return self.unet(x, t, cond=level, image_cond=low_res)


class Upsampler(nn.Module):
    """low (B, 3, R, R) -> (B, 3, 2R, 2R): DiffusionModel(UpsamplerNet) conditioned on the upsampled low-res image and
    its noise level, never dropped (no guidance). See the module docstring for the conditioning augmentation."""

    def __init__(self, low=32, widths=(32, 64, 128), patch_size=2, blocks_per_level=1, dropout=0.0, augment=True,
                 max_noise=MAX_NOISE, p_blur=P_BLUR, crop=32, schedule="cosine", T=1000, prediction="v",
                 weighting="min_snr"):
        super().__init__()
        net = UpsamplerNet(widths, patch_size, blocks_per_level, dropout, T)
        self.config = dict(low=low, widths=net.config["widths"], patch_size=patch_size,
                           blocks_per_level=blocks_per_level, dropout=dropout, augment=augment, max_noise=max_noise,
                           p_blur=p_blur, crop=crop, schedule=schedule, T=T, prediction=prediction,
                           weighting=weighting)
        factor = net.unet.factor
        if crop is not None and (crop % factor or crop > 2 * low):
            raise ValueError(f"Upsampler: crop {crop} must be a multiple of {factor} and at most {2 * low}")
        if (2 * low) % factor:
            raise ValueError(f"Upsampler: the output size {2 * low} must be a multiple of {factor}")
        self.low, self.high, self.crop, self.augment = low, 2 * low, crop, augment
        self.max_noise, self.p_blur = max_noise, p_blur
        self.diffusion = DiffusionModel(net, (3, 2 * low, 2 * low), schedule, T, prediction, weighting,
                                        conditions={"low_res": 0.0, "noise_level": 0.0})

    def forward(self, x_t, t, **conditions):
        return self.diffusion(x_t, t, **conditions)

    def corrupt(self, low, generator=None):
        """Training's conditioning augmentation: (corrupted low-res images, noise levels (B,)). augment=False: as is."""
        B = len(low)
        if not self.augment:
            return low, torch.zeros(B)
        blurred = torch.rand(B, generator=generator) < self.p_blur
        sigma = torch.empty(B).uniform_(*BLUR_SIGMA, generator=generator) * blurred
        level = torch.rand(B, generator=generator) * self.max_noise
        noise = torch.randn(low.shape, generator=generator)
        return gaussian_blur(low, sigma) + level.view(-1, 1, 1, 1).to(low.device) * noise.to(low.device), level

    def enlarge(self, low, size=None):
        """The network's view of the low-res image: bilinear to `size` (default: the output size)."""
        size = size or self.high
        return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False, antialias=False)

    def check_low(self, low, who="Upsampler.upsample"):
        if isinstance(low, torch.Tensor) and low.ndim == 4 and low.shape[1] == 3 and low.shape[-1] == self.high \
                and low.shape[-2] == self.high:
            raise ValueError(f"{who} expects the {self.low}-px images to enlarge, got {self.high}-px ones: "
                             "they are already at the output size")
        return expect_images(low, 3, self.low, who)

    @torch.no_grad()
    def upsample(self, low, noise_level=None, steps=SAMPLE_STEPS, eta=0.0, seed=0, batch_size=250, progress=False):
        """(B, 3, 2R, 2R) images in [-1, 1] from low (B, 3, R, R): the input is noised at `noise_level` (default
        SAMPLE_NOISE if trained with augmentation, else 0), which the network is told; DDIM with `steps`, `eta`."""
        low = self.check_low(low)
        if noise_level is None:
            noise_level = SAMPLE_NOISE if self.augment else 0.0
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not 0 <= noise_level < 1:
            raise ValueError(f"noise_level must be a number in [0, 1) (the std of the noise added to the input), "
                             f"got {noise_level!r}")
        g = torch.Generator().manual_seed(seed + 1)                    # the input's noise: apart from the sampler's
        low = low.float().cpu() + noise_level * torch.randn(low.shape, generator=g)
        level = torch.full((len(low),), float(noise_level))
        device = next(self.parameters()).device
        return self.diffusion.generate(len(low), cond={"low_res": self.enlarge(low).to(device),
                                                       "noise_level": level.to(device)},
                                       steps=steps, eta=eta, seed=seed, batch_size=batch_size, progress=progress)


def random_crops(images, size, generator=None):
    """Crops (B, C, size, size) at one random place per image, the same place in every tensor of `images` (a list)."""
    B, _, H, W = images[0].shape
    ys = torch.randint(0, H - size + 1, (B,), generator=generator).tolist()
    xs = torch.randint(0, W - size + 1, (B,), generator=generator).tolist()
    return [torch.stack([x[b, :, y0:y0 + size, x0:x0 + size] for b, (y0, x0) in enumerate(zip(ys, xs))])
            for x in images]


def upsampler_loss(model, batch):
    """The upsampler's loss on batch["image"] (B, 3, 2R, 2R): the R-px input is the image area-downsampled,
    corrupted (model.corrupt), enlarged; image and input are cropped alike (model.crop) and the diffusion loss
    learns the image given the input and its noise level."""
    high = expect_images(batch["image"], 3, model.high, "upsampler_loss (batch['image'])")
    low, level = model.corrupt(F.interpolate(high, size=(model.low, model.low), mode="area"))
    enlarged = model.enlarge(low)
    if model.crop is not None and model.crop < model.high:
        high, enlarged = random_crops([high, enlarged], model.crop)
    return model.diffusion.loss({"image": high, "low_res": enlarged, "noise_level": level.to(high.device)})
