"""
The denoising network of a diffusion model: a U-Net that maps (x_t, t, condition) to a prediction.

    model = UNet(widths=(64, 128, 128), num_classes=30)        # class-conditional
    out = model(x_t, t, cond=labels)     # (B, 3, 32, 32): eps, x0 or v -- the network does not care
    out = model(x_t, t, cond=torch.full_like(labels, -1))      # the same net, no condition (CFG)

One set of weights serves every step t: t enters only through a sinusoidal embedding
(timestep_embedding), turned by an MLP into a vector `emb` that every residual block reads
through a FiLM scale and shift: h = GroupNorm(h) * (1 + scale(emb)) + shift(emb).

Conditioning is added to `emb`, so every kind of condition reaches every block the same way:

    num_classes=K   cond: LongTensor (B,) of class ids in [0, K); -1 = "no condition", a learned
                    null embedding (row K of the table). CFG training drops labels to -1.
    cond_dim=D      cond: float tensor (B, D), e.g. a CLIP image embedding (the unCLIP decoder);
                    a row of all NaN = "no condition", replaced by a learned null vector. A NaN row
                    plays the part of the -1 label, so `cond` is always one tensor and
                    diffusion.drop_condition() / null_condition() work the same for both kinds.
    image_cond_channels=C   image_cond: (B, C, R, R) concatenated to x_t before the first conv,
                    e.g. an upsampler's low-resolution image, resized to R by the caller.
    context_dim=C   context: (B, L, C) tokens that the attention layers also attend to (GLIDE's text,
                    unCLIP's CLIP-embedding tokens), with context_mask (B, L) (False = padding).
    resolution=None a fully convolutional net (no attention_levels): any square size that is a multiple
                    of patch_size * 2^(levels - 1), e.g. an upsampler trained on crops, run at full size.

Shape: `widths` has one entry per resolution level (32 -> 16 -> 8 for three widths). Each level
has `blocks_per_level` residual blocks on the way down and one more on the way up, each reading
the matching skip connection of the down path (the skips carry the fine detail that the
bottleneck loses). Self-attention follows the blocks of `attention_levels` (default: the lowest
level, whose middle block then gets attention too). `patch_size=2` starts with a stride-2
conv ("patchify") and ends with a pixel shuffle, so a 32x32 image is processed as 16x16 tokens:
about 4x less compute for the same widths (measured: 3.9x). The last conv is zero-initialised, so the untrained
network outputs exactly 0 -- for eps-prediction that is the best constant guess.

NoisyClassifier reuses the down path on noisy images x_t: the classifier of classifier guidance,
which must be trained on (x_t, t) pairs because it is asked for grad log p(y | x_t) at every step.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SpatialSelfAttention, expect_images, group_norm, timestep_embedding, zero_init


class FiLMResBlock(nn.Module):
    """x + conv(drop(silu(FiLM(norm(conv(silu(norm(x)))), emb)))), then self-attention if asked.
    The second conv starts at zero, so each block starts as the identity (a deep net that trains
    like a shallow one at first)."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout=0.0, attention=False, context_dim=None):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2, self.drop = group_norm(out_channels), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.attention = SpatialSelfAttention(out_channels, context_dim=context_dim) if attention else None

    def forward(self, x, emb, context=None, context_mask=None):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift                            # FiLM: t and cond enter here
        h = self.skip(x) + self.conv2(self.drop(F.silu(h)))
        return h if self.attention is None else self.attention(h, context, context_mask)


def _describe(cond):
    """'a torch.float32 tensor of shape (2,)': the dtype is what is wrong as often as the shape."""
    if isinstance(cond, torch.Tensor):
        return f"a {cond.dtype} tensor of shape {tuple(cond.shape)}"
    return type(cond).__name__


class Embedding(nn.Module):
    """t (and the condition) -> one vector emb (B, emb_dim) that every ResBlock reads."""

    def __init__(self, base_dim, emb_dim, num_classes=None, cond_dim=None, num_timesteps=1000, who="UNet"):
        super().__init__()
        if num_classes is not None and cond_dim is not None:
            raise ValueError(f"{who}: give num_classes (class ids) or cond_dim (vectors), not both")
        self.base_dim, self.num_classes, self.cond_dim = base_dim, num_classes, cond_dim
        self.T, self.who = num_timesteps, who
        self.time = nn.Sequential(nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.classes = nn.Embedding(num_classes + 1, emb_dim)          # row K: the learned null class
        if cond_dim is not None:
            self.cond = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.null = nn.Parameter(torch.randn(emb_dim) * 0.02)          # the learned "no condition"

    def timesteps(self, t, batch, device):
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)                                            # one t for the whole batch
        if t.shape != (batch,):
            raise ValueError(f"{self.who} expects t of shape ({batch},) or a scalar, got {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool or not torch.isfinite(t.float()).all() \
                or (t < 0).any() or (t >= self.T).any():
            raise ValueError(f"{self.who}: timesteps t must lie in [0, num_timesteps={self.T}), got "
                             f"values in [{t.float().min().item():g}, {t.float().max().item():g}]")
        return t.to(device)

    def forward(self, t, cond, batch, device):
        emb = self.time(timestep_embedding(self.timesteps(t, batch, device), self.base_dim))
        if self.num_classes is None and self.cond_dim is None:
            if cond is not None:
                raise ValueError(f"{self.who} was built unconditional (num_classes=None, cond_dim=None) "
                                 "but got a cond")
            return emb
        if cond is None:
            what = "class ids (-1 = none)" if self.num_classes is not None else "vectors (NaN rows = none)"
            raise ValueError(f"{self.who} is conditional and needs cond: {what}; use "
                             "model.null_condition(B) for an unconditional prediction")
        if self.num_classes is not None:
            if not isinstance(cond, torch.Tensor) or cond.shape != (batch,) or cond.is_floating_point() \
                    or cond.is_complex() or cond.dtype == torch.bool:
                hint = " (use cond.long())" if isinstance(cond, torch.Tensor) and cond.shape == (batch,) else ""
                raise ValueError(f"{self.who} expects cond = class ids, a LongTensor of shape ({batch},), "
                                 f"got {_describe(cond)}{hint}")
            if (cond < -1).any() or (cond >= self.num_classes).any():
                raise ValueError(f"{self.who}: class id out of range [-1, {self.num_classes}) (-1 = no condition), "
                                 f"got values in [{cond.min().item()}, {cond.max().item()}]")
            return emb + self.classes(torch.where(cond < 0, self.num_classes, cond))
        if not isinstance(cond, torch.Tensor) or cond.shape != (batch, self.cond_dim) or not cond.is_floating_point():
            raise ValueError(f"{self.who} expects cond = float vectors of shape ({batch}, {self.cond_dim}), "
                             f"got {_describe(cond)}")
        nan = cond.isnan()
        dropped = nan.all(dim=1)
        if (nan.any(dim=1) & ~dropped).any():
            raise ValueError(f"{self.who}: cond rows must be all finite or all NaN (= no condition); "
                             "some rows are partly NaN")
        projected = self.cond(torch.where(dropped[:, None], 0.0, cond).to(emb.dtype))
        return emb + torch.where(dropped[:, None], self.null.to(projected.dtype), projected)

    def null_condition(self, batch, device=None):
        if self.num_classes is not None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        if self.cond_dim is not None:
            return torch.full((batch, self.cond_dim), float("nan"), device=device)
        return None


class DownPath(nn.Module):
    """Stem, then per level: blocks (+ attention), then a stride-2 conv (except at the last level).
    Returns the features and the skips: the output of the stem, of every block, of every downsample."""

    def __init__(self, in_channels, widths, blocks_per_level, attention_levels, emb_dim, patch_size, dropout,
                 context_dim=None):
        super().__init__()
        k = 3 if patch_size == 1 else patch_size                            # patchify: stride-p conv
        self.stem = nn.Conv2d(in_channels, widths[0], k, stride=patch_size, padding=1 if patch_size == 1 else 0)
        self.levels, width = nn.ModuleList(), widths[0]
        for i, w in enumerate(widths):
            level = nn.ModuleList()
            for _ in range(blocks_per_level):
                level.append(FiLMResBlock(width, w, emb_dim, dropout, i in attention_levels, context_dim))
                width = w
            if i < len(widths) - 1:
                level.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
            self.levels.append(level)

    def forward(self, h, emb, context=None, context_mask=None):
        h = self.stem(h)
        skips = [h]
        for level in self.levels:
            for layer in level:
                h = layer(h, emb, context, context_mask) if isinstance(layer, FiLMResBlock) else layer(h)
                skips.append(h)
        return h, skips


def _check_shape(resolution, widths, patch_size, attention_levels, who):
    """Check the shape settings; return the side of the lowest-resolution feature map."""
    if patch_size not in (1, 2, 4):
        raise ValueError(f"{who}: patch_size must be 1, 2 or 4, got {patch_size}")
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"{who}: widths must be a non-empty list of positive ints, got {widths}")
    factor = patch_size * 2 ** (len(widths) - 1)
    if resolution is None:                       # a fully convolutional net: any multiple of `factor`
        return None
    if resolution % factor:
        raise ValueError(f"{who}: resolution {resolution} cannot be divided by patch_size {patch_size} "
                         f"and halved {len(widths) - 1} times")
    bad = [i for i in attention_levels if not 0 <= i < len(widths)]
    if bad:
        raise ValueError(f"{who}: attention_levels {bad} out of range: levels are 0..{len(widths) - 1}")
    return resolution // factor


class UNet(nn.Module):
    """model(x, t, cond=None, image_cond=None) -> same shape as x. See the module docstring."""

    def __init__(self, channels=3, resolution=32, widths=(64, 128, 128), blocks_per_level=1,
                 attention_levels=None, time_dim=None, num_classes=None, cond_dim=None,
                 image_cond_channels=0, patch_size=1, dropout=0.0, num_timesteps=1000, context_dim=None):
        super().__init__()
        widths = [int(w) for w in widths]
        attention_levels = [len(widths) - 1] if attention_levels is None else [int(i) for i in attention_levels]
        _check_shape(resolution, widths, patch_size, attention_levels, "UNet")
        time_dim = time_dim or 4 * widths[0]
        self.config = dict(channels=channels, resolution=resolution, widths=widths, blocks_per_level=blocks_per_level,
                           attention_levels=attention_levels, time_dim=time_dim, num_classes=num_classes,
                           cond_dim=cond_dim, image_cond_channels=image_cond_channels, patch_size=patch_size,
                           dropout=dropout, num_timesteps=num_timesteps, context_dim=context_dim)
        self.channels, self.resolution, self.image_cond_channels = channels, resolution, image_cond_channels
        self.context_dim, self.factor = context_dim, patch_size * 2 ** (len(widths) - 1)
        self.embed = Embedding(widths[0], time_dim, num_classes, cond_dim, num_timesteps, "UNet")
        self.down = DownPath(channels + image_cond_channels, widths, blocks_per_level, attention_levels,
                             time_dim, patch_size, dropout, context_dim)
        self.mid = nn.ModuleList([FiLMResBlock(widths[-1], widths[-1], time_dim, dropout,
                                               len(widths) - 1 in attention_levels, context_dim),
                                  FiLMResBlock(widths[-1], widths[-1], time_dim, dropout)])
        # the widths of the down path's skips, in order: the stem, each block, each downsample
        skip_widths = [widths[0]] + [w for i, w in enumerate(widths)
                                     for _ in range(blocks_per_level + (i < len(widths) - 1))]
        self.up, width = nn.ModuleList(), widths[-1]
        for i, w in reversed(list(enumerate(widths))):
            level = nn.ModuleList()
            for _ in range(blocks_per_level + 1):          # one more block than down: it reads the downsample's skip
                level.append(FiLMResBlock(width + skip_widths.pop(), w, time_dim, dropout, i in attention_levels,
                                          context_dim))
                width = w
            if i > 0:
                level.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1)))
            self.up.append(level)
        self.head = nn.Sequential(group_norm(widths[0]), nn.SiLU(),
                                  nn.Conv2d(widths[0], channels * patch_size ** 2, 3, padding=1),
                                  nn.PixelShuffle(patch_size))                    # pixel shuffle: un-patchify
        zero_init(self.head[2])                                                 # the untrained net predicts 0

    def null_condition(self, batch, device=None):
        """The "no condition" cond for a batch: class ids -1, or NaN rows; None if unconditional."""
        return self.embed.null_condition(batch, device)

    def _check_images(self, x, who):
        if self.resolution is not None:
            return expect_images(x, self.channels if who == "UNet" else self.image_cond_channels, self.resolution, who)
        side = x.shape[-1] if isinstance(x, torch.Tensor) and x.ndim == 4 else 0
        if side and x.shape[-2] == side and side % self.factor == 0:
            return expect_images(x, self.channels if who == "UNet" else self.image_cond_channels, side, who)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} is fully convolutional and takes square images whose side is a multiple of "
                         f"{self.factor}, got {shape}")

    def _check_context(self, context, context_mask, batch):
        if self.context_dim is None:
            if context is not None:
                raise ValueError("UNet was built without context_dim but got context tokens")
            return
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[0] != batch \
                or context.shape[2] != self.context_dim:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"UNet was built with context_dim={self.context_dim} and needs context tokens "
                             f"({batch}, L, {self.context_dim}), got {got}")
        if not isinstance(context_mask, torch.Tensor) or context_mask.dtype != torch.bool \
                or context_mask.shape != context.shape[:2]:
            raise ValueError(f"UNet: context_mask must be a bool tensor {tuple(context.shape[:2])} (False = ignore)")

    def forward(self, x, t, cond=None, image_cond=None, context=None, context_mask=None):
        self._check_images(x, "UNet")
        if self.resolution is None and image_cond is not None:
            self._check_images(image_cond, "UNet (image_cond)")
            if image_cond.shape[-1] != x.shape[-1]:
                raise ValueError(f"UNet: image_cond must have the size of x ({x.shape[-1]}), got {image_cond.shape[-1]}")
        self._check_context(context, context_mask, len(x))
        emb = self.embed(t, cond, len(x), x.device)
        if self.image_cond_channels:
            if image_cond is None:
                raise ValueError(f"UNet was built with image_cond_channels={self.image_cond_channels} "
                                 "and needs image_cond")
            if self.resolution is not None:
                expect_images(image_cond, self.image_cond_channels, self.resolution, "UNet (image_cond)")
            x = torch.cat([x, image_cond.to(x.dtype)], dim=1)
        elif image_cond is not None:
            raise ValueError("UNet was built with image_cond_channels=0 but got an image_cond")
        h, skips = self.down(x, emb, context, context_mask)
        for layer in self.mid:
            h = layer(h, emb, context, context_mask)
        for level in self.up:
            for layer in level:
                if isinstance(layer, FiLMResBlock):
                    h = layer(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)   # the skip connection
                else:
                    h = layer(h)                                           # upsample
        return self.head(h)


class NoisyClassifier(nn.Module):
    """Logits of p(y | x_t, t): the U-Net's down path + the middle block, then a linear readout.
    For Shapes, class = shape * len(COLORS) + color (5 x 6 = 30 classes).

    head="flatten" reads the whole lowest-resolution map (every position has its own weights); "mean"
    averages it over positions first. On Shapes (one small object on black), measured at 1,500 steps on
    noisy images: 38% accuracy for t < 250 with "flatten", 14% with "mean" (the object is 1 of 16 cells).

    `schedule` names the noise schedule of the x_t it is trained to read. The network does not use it; it is
    kept in the config (and so in the checkpoint) so that guidance can refuse a diffusion model whose t means
    a different amount of noise."""

    def __init__(self, num_classes=30, channels=3, resolution=32, widths=(32, 64, 64), blocks_per_level=1,
                 attention_levels=(), time_dim=None, patch_size=1, dropout=0.0, num_timesteps=1000, head="flatten",
                 schedule="linear"):
        super().__init__()
        widths, attention_levels = [int(w) for w in widths], [int(i) for i in attention_levels]
        if resolution is None:
            raise ValueError("NoisyClassifier: its linear head reads a fixed-size map; give a resolution")
        side = _check_shape(resolution, widths, patch_size, attention_levels, "NoisyClassifier")
        if head not in ("flatten", "mean"):
            raise ValueError(f"NoisyClassifier: head must be 'flatten' or 'mean', got {head!r}")
        time_dim = time_dim or 4 * widths[0]
        self.config = dict(num_classes=num_classes, channels=channels, resolution=resolution, widths=widths,
                           blocks_per_level=blocks_per_level, attention_levels=attention_levels, time_dim=time_dim,
                           patch_size=patch_size, dropout=dropout, num_timesteps=num_timesteps, head=head,
                           schedule=schedule)
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.embed = Embedding(widths[0], time_dim, num_timesteps=num_timesteps, who="NoisyClassifier")
        self.down = DownPath(channels, widths, blocks_per_level, attention_levels, time_dim, patch_size, dropout)
        self.mid = FiLMResBlock(widths[-1], widths[-1], time_dim, dropout)
        pool = nn.AdaptiveAvgPool2d(1) if head == "mean" else nn.Identity()
        self.out = nn.Sequential(group_norm(widths[-1]), nn.SiLU(), pool, nn.Flatten(),
                                 nn.Linear(widths[-1] * (1 if head == "mean" else side * side), num_classes))

    def forward(self, x, t):
        expect_images(x, self.channels, self.resolution, "NoisyClassifier")
        emb = self.embed(t, None, len(x), x.device)
        h, _ = self.down(x, emb)
        return self.out(self.mid(h, emb))
