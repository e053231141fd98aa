"""The scoreboard: score any generator's samples with the oracle, and keep one table for the course.

    report = score(images, prompts)                  # oracle readings -> numbers
    add_row("ddpm", "cpu", report, train_seconds=..., sample_seconds=...)
    print(format_table(load_rows()))                 # or: python -m minidalle2 scoreboard

Numbers (all from the oracle, never from the model being scored):
- validity: share of images the oracle reads as a well-formed scene (1-2 objects, no junk, sure);
- caption_accuracy: share of images that are valid AND satisfy every attribute their prompt states;
- attr_<name>: per attribute (shape, color, size, position, relation, count), share of prompts
  stating it whose image gets it right;
- fid / kid: in oracle feature space against real renders of the same prompts (or of the test
  split), beside fid_floor / kid_floor: the same numbers for two sets of real images of equal size;
- binding_errors: among two-object prompts, the share of images with the right attributes on the wrong objects
  (colours swapped between the shapes, ...): the failure unCLIP's paper reports for its decoder;
- coverage: share of the 30 shape x colour pairs seen among valid objects; coverage_entropy;
- diversity: mean pairwise feature distance over all images; diversity_per_prompt: the same between
  images of one prompt, when prompts repeat;
- for image -> image models (auto-encoders, denoisers; `score_reconstructions`): psnr against the
  originals, and recon_caption_accuracy / recon_validity: the oracle on the reconstructions.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch

from .. import data
from . import metrics
from .checkpoint import atomic_write_bytes
from .oracle import load_oracle, matches, read
from .train import machine_description
from .zoo import cache_dir

SCOREBOARD_ENV = "MINIDALLE2_SCOREBOARD"
ATTRIBUTES = ("shape", "color", "size", "position")
COLUMNS = ("model", "preset", "n", "caption_accuracy", "validity", "fid", "fid_floor", "coverage",
           "diversity", "psnr", "recon_caption_accuracy", "train_seconds", "sample_seconds")


def _attribute_hits(prompt, objects, hits, totals):
    """Credit each stated attribute if some assignment of detected objects to the prompt's gets it."""
    rows = [r for r in objects.tolist() if r[0] >= 0]
    totals["count"] += 1
    hits["count"] += len(rows) == len(prompt.objects)
    orders = [rows, rows[::-1]] if len(rows) == 2 else [rows]
    best = None
    for order in orders:
        got = {a: 0 for a in ATTRIBUTES}
        for spec, row in zip(prompt.objects, order):
            for i, a in enumerate(ATTRIBUTES):
                want = (spec.shape, spec.color, spec.size, spec.position)[i]
                got[a] += want is not None and want == row[i]
        if prompt.relation is not None:
            got["relation"] = len(order) == 2 and prompt.relation in data.relations_between(order[0][3], order[1][3])
        if best is None or sum(got.values()) > sum(best.values()):
            best = got
    for i, a in enumerate(ATTRIBUTES):
        stated = sum((s.shape, s.color, s.size, s.position)[i] is not None for s in prompt.objects)
        totals[a] += stated
        hits[a] += min(best[a], stated)
    if prompt.relation is not None:
        totals["relation"] += 1
        hits["relation"] += bool(best.get("relation"))


def binding_error(prompt, objects):
    """Two objects whose attributes are all the prompt's, bound to the wrong objects: for each attribute the two
    detected values are the two stated ones (as a multiset, e.g. a red and a blue), yet no pairing of detected with
    stated objects gets every object right (the red is the square, not the circle). False for one-object prompts."""
    rows = [r for r in objects.tolist() if r[0] >= 0]
    if len(prompt.objects) != 2 or len(rows) != 2:
        return False
    specs = [(s.shape, s.color, s.size) for s in prompt.objects]
    for i in range(3):
        stated = [s[i] for s in specs if s[i] is not None]
        got = [r[i] for r in rows]
        if any(stated.count(v) > got.count(v) for v in stated):
            return False                                   # a stated value is missing: not a binding error
    def fits(spec, row):
        return all(w is None or w == g for w, g in zip(spec, row[:3]))
    return not any(fits(specs[0], a) and fits(specs[1], b) for a, b in (rows, rows[::-1]))


def reference_images(n, prompts=None, seed=1, resolution=32):
    """Real renders to compare against: of the same prompts if given, else of the test split."""
    scenes = data.scenes_from_prompts(prompts, seed) if prompts is not None else data.sample_scenes(n, "test", seed)
    return data.render(scenes, resolution)


@torch.no_grad()
def score(images, prompts=None, oracle=None, reference=None, seed=0):
    """Oracle numbers for a batch of generated images (N, 3, R, R) in [-1, 1], with optional prompts."""
    if prompts is not None:
        data.check_prompt_list(prompts)
    oracle = oracle or load_oracle()
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    parsed = [data.parse_caption(p) if isinstance(p, str) else p for p in prompts] if prompts is not None else None
    reading = read(oracle, images)
    report = {"n": len(images), "validity": reading.valid.float().mean().item()}

    if parsed is not None:
        ok = [bool(v) and matches(p, o) for p, o, v in zip(parsed, reading.objects, reading.valid)]
        report["caption_accuracy"] = sum(ok) / len(ok)
        hits = {a: 0 for a in (*ATTRIBUTES, "relation", "count")}
        totals = dict(hits)
        for p, o in zip(parsed, reading.objects):
            _attribute_hits(p, o, hits, totals)
        report.update({f"attr_{a}": hits[a] / totals[a] for a in hits if totals[a]})
        two = [i for i, p in enumerate(parsed) if len(p.objects) == 2]
        if two:   # share of two-object prompts drawn with their attributes on the wrong objects
            report["binding_errors"] = sum(binding_error(parsed[i], reading.objects[i]) for i in two) / len(two)

    # coverage of the 30 shape x colour pairs among objects in valid images
    objects = reading.objects[reading.valid].reshape(-1, 4)
    objects = objects[objects[:, 0] >= 0]
    pairs = data.pair_id(objects[:, 0], objects[:, 1])
    num_pairs = data.NUM_PAIRS
    report["coverage"], counts = metrics.coverage(pairs, num_pairs) if len(pairs) else (0.0, torch.zeros(num_pairs))
    report["coverage_entropy"] = metrics.normalized_entropy(counts) if len(pairs) else 0.0

    if len(images) >= 2:
        report["diversity"] = metrics.mean_pairwise_distance(reading.features)
        if prompts is not None:  # how different are the images drawn for the same prompt?
            ids = {p: i for i, p in enumerate(dict.fromkeys(map(str, prompts)))}
            groups = torch.tensor([ids[str(p)] for p in prompts])
            if torch.bincount(groups).max() >= 2:
                report["diversity_per_prompt"] = metrics.mean_pairwise_distance(reading.features, groups)

        # FID/KID against real images of the same distribution, and the floor at the same n
        n = len(images)
        ref = reference if reference is not None else reference_images(n, parsed, seed + 1, images.shape[-1])
        ref2 = reference_images(n, parsed, seed + 2, images.shape[-1]) if reference is None else None
        real = read(oracle, ref).features
        report["fid"] = metrics.frechet_distance(reading.features, real)
        report["kid"] = metrics.kernel_distance(reading.features, real, subsets=20, subset_size=min(n, 500))[0]
        if ref2 is not None:
            real2 = read(oracle, ref2).features
            report["fid_floor"] = metrics.frechet_distance(real2, real)
            report["kid_floor"] = metrics.kernel_distance(real2, real, subsets=20, subset_size=min(n, 500))[0]
    return report


def score_reconstructions(reconstructions, originals, captions, oracle=None):
    """Numbers for an image -> image model (auto-encoder, denoiser): mean PSNR against the originals,
    and the oracle's caption accuracy and validity on the reconstructions, keyed recon_*."""
    originals = data.check_images(originals, name="originals")
    reconstructions = data.check_images(reconstructions, slack=float("inf"), name="reconstructions")
    data.check_prompt_list(captions, "captions")
    if len(captions) != len(originals):
        raise ValueError(f"got {len(originals)} images but {len(captions)} captions")
    report = score(reconstructions.clamp(-1, 1), captions, oracle=oracle)
    return {"n": len(originals), "psnr": metrics.psnr(reconstructions, originals).mean().item(),
            "recon_caption_accuracy": report["caption_accuracy"], "recon_validity": report["validity"]}


# ----------------------------------------------------------------------------- the table

def default_path() -> Path:
    return Path(os.environ.get(SCOREBOARD_ENV) or cache_dir() / "scoreboard.jsonl")


def add_row(model, preset, report, *, train_seconds=None, sample_seconds=None, path=None, **extra):
    """Append one row to the scoreboard (JSON lines; the file is rewritten atomically)."""
    path = Path(path) if path else default_path()
    row = {"model": model, "preset": preset, **report, "train_seconds": train_seconds,
           "sample_seconds": sample_seconds, "date": datetime.date.today().isoformat(),
           "machine": machine_description(), **extra}
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + (json.dumps(row) + "\n").encode())
    return row


def load_rows(path=None) -> list[dict]:
    path = Path(path) if path else default_path()
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
    return rows


def format_table(rows, columns=COLUMNS) -> str:
    """A markdown table: one row per scored run; '-' where a number does not apply."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def format_other_numbers(row, columns=COLUMNS) -> str:
    """The row's numbers that the table has no column for (a CLIP's R@1, a VAE's ELBO...), one per line."""
    return "\n".join(f"{k}: {v:.4g}" for k, v in sorted(row.items())
                     if k not in columns and isinstance(v, (int, float)) and not isinstance(v, bool))
