"""
Shared network blocks. Chapters build their models from these so that a change of idea
(AE -> VAE -> GAN discriminator) is a change of a few lines, not a new network.

    encoder = ConvEncoder(out_features=128)      # (B, 3, 32, 32) -> (B, 128)
    decoder = ConvDecoder(in_features=128)       # (B, 128) -> (B, 3, 32, 32), unbounded
    x = expect_images(x, channels=3, resolution=32, who="VAE")   # clear error on a bad input
    emb = timestep_embedding(t, 128)             # diffusion's sinusoidal time embedding
    block = TransformerBlock(dim=128, heads=4)   # (B, L, 128) -> (B, L, 128), causal: DALL-E, the prior

The encoder and decoder are stacks of stride-2 stages (32 -> 16 -> 8 -> 4 with three widths) of
pre-activation residual blocks. `spectral=True` wraps every conv and linear layer in spectral
normalisation (the GAN discriminator's Lipschitz control); `norm=None` drops GroupNorm (a
discriminator with spectral norm does not want batch statistics or group statistics).
"""

import math

import torch
import torch.nn.functional as F
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


def expect_latents(z, dim, who="model", what="latents z"):
    """Check that z is a batch of vectors (B, dim) (latents, embeddings); a clear error if not."""
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != dim:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{who} expects {what} of shape (B, {dim}), got {shape}")
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
        return group_norm(channels)
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


# ----------------------------------------------------------------------------- time, attention

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim): [sin(t w_0..w_{h-1}), cos(t w_0..w_{h-1})],
    w_i = max_period^(-i/h), h = dim // 2 (Transformer positions, as in DDPM); odd dim pads a 0."""
    if not isinstance(t, torch.Tensor) or t.ndim != 1:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"timestep_embedding expects t of shape (B,), got {shape}")
    if dim < 2:
        raise ValueError(f"timestep_embedding needs dim >= 2, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                              # (B, half): t * w_i
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels, groups=8):
    """GroupNorm with gcd(groups, channels) groups, so any width works."""
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def zero_init(module):
    """Zero every parameter: a residual branch that starts as the identity, a head that starts at 0."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; the output projection starts at zero.

    context_dim=C: the positions also attend to context tokens (B, L, C) -- GLIDE's way of reading text, and
    unCLIP's decoder's CLIP-embedding tokens: each token's key and value are projected from it and put beside the
    image's, so one softmax weighs image positions and tokens together. context_mask (B, L): False = ignore."""

    def __init__(self, channels, head_dim=32, context_dim=None):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x, context=None, context_mask=None):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        mask = None
        if self.context_kv is not None:
            L = context.shape[1]
            ck, cv = self.context_kv(context).view(B, L, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ck.to(k.dtype), k], 2), torch.cat([cv.to(v.dtype), v], 2)      # keys: [tokens, pixels]
            mask = torch.cat([context_mask, context_mask.new_ones(B, H * W)], 1)[:, None, None]
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)        # softmax(q k^T / sqrt(d)) v
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


# ----------------------------------------------------------------------------- the transformer block

class TransformerBlock(nn.Module):
    """Pre-norm transformer block (GPT-2): x + attn(LN(x)), then x + MLP(LN(x)), over (B, L, D) tokens.

    causal=True lets token i attend to tokens <= i only (DALL-E's decoder, the diffusion prior); `mask`
    (broadcastable to (B, heads, L, P + L), True = may attend) adds to it, e.g. padding.
    past=(k, v) from an earlier call (return_kv=True) holds the keys and values of P tokens that come before x:
    x's tokens then sit at positions P.. and attend to those too. A causal prefix never sees what follows it,
    so its keys and values can be computed once and reused (autoregressive decoding, the prior's text)."""

    def __init__(self, dim, heads=4, mlp_ratio=4, dropout=0.0, causal=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"TransformerBlock: dim {dim} must be divisible by heads {heads}")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.ln1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim),
                                 nn.Dropout(dropout))

    def attention(self, x, mask=None, past=None):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)   # (B, h, L, d)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(v.dtype), v], 2)
        P = k.shape[2] - L
        if self.causal:   # query i (position P + i) sees keys j <= P + i
            causal = torch.ones(L, P + L, dtype=torch.bool, device=x.device).tril(P)
            mask = causal if mask is None else mask & causal
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,                # softmax(q k^T / sqrt(d)) v
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(h.transpose(1, 2).reshape(B, L, D)), (k, v)

    def forward(self, x, mask=None, past=None, return_kv=False):
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.ln1.normalized_shape[0]:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"TransformerBlock expects tokens (B, L, {self.ln1.normalized_shape[0]}), got {got}")
        h, kv = self.attention(self.ln1(x), mask, past)
        x = x + h
        x = x + self.mlp(self.ln2(x))
        return (x, kv) if return_kv else x
