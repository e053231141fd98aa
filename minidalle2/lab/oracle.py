"""The evaluation oracle: a small CNN that reads every object of a Shapes image.

"It looks right" is not a result. The oracle looks at each cell of the 3x3 grid and says whether
it is empty, holds a well-formed object, or holds junk (a blurred blob, an off-palette colour, a
squashed shape: what a half-trained generator draws), and reads the object's shape, colour
and size. From that reading come the course's numbers: validity, caption accuracy, per-attribute
accuracy, coverage, diversity and FID/KID in the oracle's feature space (see `evaluate`).

The oracle is an instrument: it is trained once on real renders (`python -m minidalle2 train
oracle --preset full`), shipped in minidalle2/weights/, and never used to train a generator.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import data
from ..data import COLORS, GRID, SHAPES, SIZES

CELLS = GRID * GRID
OCCUPANCY = ("empty", "object", "junk")
HEADS = {"occupancy": len(OCCUPANCY), "shape": len(SHAPES), "color": len(COLORS), "size": len(SIZES)}
INPUT_SIZE = 48            # every image is resized to 48x48, so each grid cell is exactly 16x16 pixels
CONFIDENT = 0.9            # a reading is "valid" only if every decision is at least this sure
WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "oracle"


class Oracle(nn.Module):
    """Conv stack to a 12x12 map; every cell's 4x4 block of features goes through one shared head."""

    def __init__(self, widths=(16, 32, 64), cell_features=32):
        super().__init__()
        self.config = {"widths": list(widths), "cell_features": cell_features}
        layers, c_in = [], 3
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2  # 48 -> 48 -> 24 -> 12
            layers += [nn.Conv2d(c_in, c, 3, stride, 1), nn.GroupNorm(8, c), nn.GELU(),
                       nn.Conv2d(c, c, 3, 1, 1), nn.GroupNorm(8, c), nn.GELU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        block = INPUT_SIZE // 2 ** (len(widths) - 1) // GRID
        self.cell = nn.Sequential(nn.Linear(c_in * block * block, cell_features), nn.GELU())
        self.head = nn.Linear(cell_features, sum(HEADS.values()))
        # set after training so real images' features have unit RMS: FID/KID numbers of a readable size
        self.register_buffer("feature_scale", torch.ones(()))

    def cell_features(self, images):
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
        f = self.body(x)                                      # (N, C, 12, 12)
        n, c, h, _ = f.shape
        b = h // GRID
        f = f.view(n, c, GRID, b, GRID, b).permute(0, 2, 4, 1, 3, 5).reshape(n, CELLS, c * b * b)
        return self.cell(f)                                   # (N, 9, cell_features)

    def forward(self, images):
        """Logits per cell: (N, 9, 16) = occupancy(3) | shape(5) | color(6) | size(2)."""
        return self.head(self.cell_features(images))

    def features(self, images):
        """The feature vector FID/KID are computed on: every cell's features, concatenated."""
        return self.cell_features(images).flatten(1) * self.feature_scale


def split_logits(logits):
    return dict(zip(HEADS, logits.split(list(HEADS.values()), dim=-1)))


# ----------------------------------------------------------------------------- training data

def cell_targets(objects, junk=None):
    """Per-cell targets (N, 9, 4): occupancy, shape, color, size; -1 = not scored (empty or junk)."""
    n = objects.shape[0]
    targets = torch.full((n, CELLS, 4), -1, dtype=torch.long)
    targets[..., 0] = 0
    for k in range(objects.shape[1]):
        present = objects[:, k, 0] >= 0
        rows, cells = present.nonzero()[:, 0], objects[present, k, 3]
        is_junk = junk[present, k] if junk is not None else torch.zeros(len(rows), dtype=torch.bool)
        targets[rows, cells, 0] = torch.where(is_junk, 2, 1)
        targets[rows, cells, 1:] = torch.where(is_junk[:, None], -1, objects[present, k, :3])
    return targets


def _gaussian_blur(alpha, sigma):
    radius = int(3 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    a = alpha.reshape(-1, 1, *alpha.shape[-2:])
    a = F.conv2d(F.pad(a, (radius,) * 4), k.view(1, 1, 1, -1))
    a = F.conv2d(a, k.view(1, 1, -1, 1))
    return (a / a.amax((2, 3), keepdim=True).clamp(min=1e-6)).view_as(alpha)  # a blob keeps full contrast


def _off_palette_colors(n):
    """Random colours at least 0.35 (RGB distance) away from every palette colour."""
    rgb = torch.rand(n * 4 + 16, 3)
    far = torch.cdist(rgb, data.COLOR_RGB).amin(1) > 0.35
    rgb = rgb[far]
    return rgb[torch.arange(n) % len(rgb)]


def render_training_batch(objects, offsets, resolution, junk_prob=0.1, noise_std=0.08):
    """Real renders plus junk objects and pixel noise, with per-cell targets. Uses torch's global RNG."""
    n, k = objects.shape[:2]
    present = objects[..., 0] >= 0
    junk = present & (torch.rand(n, k) < junk_prob)
    kind = torch.randint(3, (n, k))                   # 0 blur, 1 off-palette colour, 2 squashed shape
    squash = torch.ones(n, k, 2)
    squashed = junk & (kind == 2)                     # one axis at 45-60%: no Shapes object looks like that
    axis = torch.randint(2, (n, k))
    squash[squashed, axis[squashed]] = 0.45 + 0.15 * torch.rand(int(squashed.sum()))
    alpha = data.object_alpha(objects, offsets, resolution, squash)
    rgb = data.COLOR_RGB[objects[..., 1].clamp(min=0)].clone()
    blur = junk & (kind == 0)
    if blur.any():
        sigma = (1.2 + 0.8 * torch.rand(1).item()) * resolution / 32
        alpha[blur] = _gaussian_blur(alpha[blur], sigma)
    off = junk & (kind == 1)
    rgb[off] = _off_palette_colors(int(off.sum()))
    images = data.composite(alpha, rgb)
    images = images + noise_std * torch.rand(n, 1, 1, 1) * torch.randn_like(images)
    return images.clamp(-1, 1), cell_targets(objects, junk)


class SceneLabels:
    """Scene labels only (no pixels): the oracle renders each batch itself, with junk and noise."""

    def __init__(self, size, seed=0):
        self.scenes = data.sample_scenes(size, "all", seed)

    def __len__(self):
        return len(self.scenes)

    def get_batch(self, indices):
        return {"objects": self.scenes.objects[indices], "offsets": self.scenes.offsets[indices]}


def oracle_loss(model, batch):
    """Sum of the four heads' cross-entropies; a resolution of 32 or 64 is drawn per batch."""
    resolution = 32 if torch.rand(1).item() < 0.5 else 64
    with torch.autocast("cpu", enabled=False):  # rendering is exact float32 work, even in a bf16 run
        images, targets = render_training_batch(batch["objects"].cpu(), batch["offsets"].cpu(), resolution)
    device = next(model.parameters()).device
    logits = split_logits(model(images.to(device)))
    targets = targets.to(device)
    losses = {name: F.cross_entropy(logits[name].flatten(0, 1), targets[..., i].flatten(), ignore_index=-1)
              for i, name in enumerate(HEADS)}
    return sum(losses.values()), {name: loss.item() for name, loss in losses.items()}


# ----------------------------------------------------------------------------- reading images

def check_readable(images):
    """Clear errors for what the oracle cannot read, instead of a deep torch traceback."""
    data.check_images(images, channels=(3,), slack=0.05)  # generators may overshoot a little
    if len(images) == 0:
        raise ValueError("images is empty: the oracle needs at least one image")
    if images.shape[2] != images.shape[3] or images.shape[2] < 16:
        raise ValueError(f"images must be square and at least 16x16 (N, 3, R, R), got {tuple(images.shape)}")


@dataclass
class Reading:
    """What the oracle sees in a batch of images."""
    probs: dict               # head name -> (N, 9, classes) probabilities
    objects: torch.Tensor     # (N, 2, 4) shape, color, size, cell of the detected objects (-1 rows if absent)
    count: torch.Tensor       # (N,) number of cells read as holding an object
    valid: torch.Tensor       # (N,) bool: 1-2 objects, no junk, every decision >= CONFIDENT
    features: torch.Tensor    # (N, D) feature vectors for FID/KID


@torch.no_grad()
def read(oracle, images, batch_size=500):
    """Run the oracle on images (N, 3, R, R) in [-1, 1]."""
    check_readable(images)
    device = next(oracle.parameters()).device
    cell = torch.cat([oracle.cell_features(images[i:i + batch_size].float().to(device))
                      for i in range(0, len(images), batch_size)])
    probs = {k: v.float().softmax(-1).cpu() for k, v in split_logits(oracle.head(cell)).items()}
    occupancy = probs["occupancy"].argmax(-1)
    count = (occupancy == 1).sum(1)
    confident = torch.stack([p.amax(-1) for p in probs.values()], -1) >= CONFIDENT  # (N, 9, 4)
    attrs_ok = confident.all(-1) | (occupancy == 0) & confident[..., 0]  # empty cells have no attributes
    valid = (count >= 1) & (count <= 2) & ~(occupancy == 2).any(1) & attrs_ok.all(1)
    # the first two occupied cells (row-major) become the label rows of the scene
    n, c = (occupancy == 1).nonzero(as_tuple=True)
    slot = (occupancy == 1).cumsum(1)[n, c] - 1
    rows = torch.stack([probs[h][n, c].argmax(-1) for h in ("shape", "color", "size")] + [c], -1)
    objects = torch.full((len(images), 2, 4), -1, dtype=torch.long)
    objects[n[slot < 2], slot[slot < 2]] = rows[slot < 2]
    return Reading(probs, objects, count, valid, (cell.flatten(1) * oracle.feature_scale).cpu())


def describe(reading, i):
    """One image's reading in words, e.g. 'valid: small red circle at the top'."""
    p = {name: probs[i].argmax(-1) for name, probs in reading.probs.items()}
    parts = []
    for c in range(CELLS):
        if p["occupancy"][c] == 1:
            parts.append(f"{SIZES[p['size'][c]]} {COLORS[p['color'][c]]} {SHAPES[p['shape'][c]]} "
                         f"at the {data.POSITIONS[c]}")
        elif p["occupancy"][c] == 2:
            parts.append(f"junk at the {data.POSITIONS[c]}")
    return f"{'valid' if reading.valid[i] else 'invalid'}: {'; '.join(parts) or 'nothing'}"


def _object_matches(spec, row):
    return all(want is None or want == got for want, got in zip(
        (spec.shape, spec.color, spec.size, spec.position), row))


def matches(prompt, objects):
    """Does a scene (2, 4 label rows) satisfy a Prompt? Every stated attribute and the relation must hold."""
    rows = [r for r in objects.tolist() if r[0] >= 0]
    if len(rows) != len(prompt.objects):
        return False
    if len(rows) == 1:
        return _object_matches(prompt.objects[0], rows[0])
    for a, b in (rows, rows[::-1]):   # either detected object may be the caption's first
        if _object_matches(prompt.objects[0], a) and _object_matches(prompt.objects[1], b):
            if prompt.relation is None or prompt.relation in data.relations_between(a[3], b[3]):
                return True
    return False


@functools.lru_cache(maxsize=1)
def load_oracle(path=None):
    """The shipped oracle (minidalle2/weights/oracle.*), in eval mode with gradients off."""
    from .checkpoint import load_model
    path = Path(path) if path else WEIGHTS
    if not path.with_suffix(".safetensors").exists():
        raise FileNotFoundError(f"no oracle weights at {path}.safetensors; "
                                "train them with: python -m minidalle2 train oracle --preset full")
    model = load_model(path, Oracle, expected_kind="oracle")
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- accuracy

@torch.no_grad()
def oracle_accuracy(oracle, n=2000, seed=12345):
    """Accuracy of every reading on fresh real renders (test + held-out splits, 32 and 64 pixels).

    shape/color/size: per object, read at the object's true cell; position: the set of occupied
    cells is exactly right; count: the number of objects is right; valid: real images read as valid.
    """
    scenes = [data.sample_scenes(n // 2, "test", seed), data.sample_scenes(n - n // 2, "holdout", seed)]
    objects = torch.cat([s.objects for s in scenes])
    offsets = torch.cat([s.offsets for s in scenes])
    targets = cell_targets(objects)
    report = {}
    for resolution in (32, 64):
        r = read(oracle, data.render(data.Scenes(objects, offsets, [""] * len(objects)), resolution))
        occupied = targets[..., 0] == 1
        occupancy = r.probs["occupancy"].argmax(-1)
        acc = {name: (r.probs[name].argmax(-1)[occupied] == targets[..., i][occupied]).float().mean().item()
               for i, name in enumerate(("shape", "color", "size"), 1)}
        acc["position"] = (occupancy == targets[..., 0]).all(1).float().mean().item()
        acc["count"] = (r.count == (objects[:, :, 0] >= 0).sum(1)).float().mean().item()
        acc["valid"] = r.valid.float().mean().item()
        report[str(resolution)] = acc
    report["images"] = n
    return report
