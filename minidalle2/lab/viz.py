"""
Small plotting helpers shared by all notebooks.

Images everywhere in minidalle2 are float tensors of shape (N, C, H, W) with C = 1 or 3
and values in [-1, 1] (what the models eat and produce). These helpers check that
contract loudly, so a wrong shape or a forgotten rescale fails with a clear message
instead of a silently washed-out picture.
"""

import math
import textwrap

import numpy as np
import torch

from .. import data

RANGE_SLACK = 1e-3  # model outputs may overshoot [-1, 1] by rounding; beyond this is an error


def _as_images(images, name="images"):
    """Validate an (N, C, H, W) batch in [-1, 1] (tensor or numpy) and return it as a float CPU tensor."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return data.check_images(images, slack=RANGE_SLACK, name=name)


def to_numpy_uint8(images):
    """(N, C, H, W) floats in [-1, 1] -> (N, H, W, C) uint8 numpy array in [0, 255]."""
    return data.to_uint8(_as_images(images).clamp(-1, 1)).permute(0, 2, 3, 1).numpy()


def image_grid(images, nrow=8, padding=2, pad_value=1.0):
    """Tile (N, C, H, W) images into one (C, H', W') image, nrow images per row, white padding."""
    x = _as_images(images)
    n, c, h, w = x.shape
    if n == 0:
        raise ValueError("images is an empty batch")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value))
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return grid


def show_grid(images, captions=None, nrow=8, figsize=None, ax=None, title=None, wrap=20, titles=None):
    """
    Show a batch of images as a grid with matplotlib; returns the matplotlib Axes.
    captions (or titles): one string per image, wrapped under each image.
    """
    import matplotlib.pyplot as plt

    captions = captions if captions is not None else titles
    x = _as_images(images)
    n = x.shape[0]
    if n == 0:
        raise ValueError("images is an empty batch")
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images")
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    cmap = "gray" if x.shape[1] == 1 else None

    if captions is None:
        if ax is None:
            _, ax = plt.subplots(figsize=figsize or (min(1.2 * ncol, 16), min(1.2 * nrows, 16)))
        img = to_numpy_uint8(image_grid(x, nrow=nrow)[None])[0]
        ax.imshow(img[..., 0] if cmap else img, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
        ax.set_axis_off()
    else:
        wrapped = [textwrap.fill(str(cap), wrap) for cap in captions]
        lines = max(s.count("\n") + 1 for s in wrapped)
        cell_h = 1.6 + 0.16 * lines  # inches: image + caption lines
        if ax is None:
            _, ax = plt.subplots(figsize=figsize or (1.8 * ncol, cell_h * nrows))
        ax.set_axis_off()
        img_frac = 1.6 / cell_h  # share of each cell's height that the image takes
        pics = to_numpy_uint8(x)
        for i in range(n):
            r, k = divmod(i, ncol)
            sub = ax.inset_axes([k / ncol + 0.05 / ncol, 1 - (r + img_frac) / nrows,
                                 0.9 / ncol, 0.9 * img_frac / nrows])
            sub.imshow(pics[i][..., 0] if cmap else pics[i], cmap=cmap, vmin=0, vmax=255,
                       interpolation="nearest")
            sub.set_xticks([])
            sub.set_yticks([])
            sub.text(0.5, -0.04, wrapped[i], transform=sub.transAxes, ha="center", va="top", fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_curves(history, keys, ax=None, logy=False, title=None):
    """
    Plot training curves. history: list of dicts, each with 'step' and some of `keys`
    (e.g. [{'step': 0, 'loss': 1.2}, ...]); entries missing a key are skipped for it.
    """
    import matplotlib.pyplot as plt

    keys = [keys] if isinstance(keys, str) else list(keys)
    if not history:
        raise ValueError("history is empty")
    if any("step" not in h for h in history):
        raise ValueError("every history entry needs a 'step'")
    missing = [k for k in keys if not any(k in h for h in history)]
    if missing:
        seen = sorted({k for h in history for k in h} - {"step"})
        raise ValueError(f"keys {missing} not in history (it has {seen})")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(h["step"], float(h[k])) for h in history if k in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    if len(keys) > 1:
        ax.legend()
    else:
        ax.set_ylabel(keys[0])
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return ax
