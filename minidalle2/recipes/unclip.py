"""Chapter 14: the whole unCLIP pipeline from the zoo's models, and the measurements the chapter makes on it.

Nothing here trains a model of its own: load_unclip(preset) loads (or trains) the chapter-07 CLIP, a chapter-12 prior,
the chapter-13 decoder and upsampler, all at one preset, and joins them (unclip.UnCLIP). The reports, each on test
scenes never trained on, scored by the oracle:
- text_to_image_report: caption accuracy on one- and two-object prompts (binding errors and the relation apart),
  per-prompt diversity, and the same on the held-out (shape, colour, size) triples (compositional zero-shot);
- prior_comparison: the same prompts through other priors (AR, MLP regressor, no prior, a real render's embedding),
  with and without the decoder reading the caption;
- variations_report, inversion_report, interpolation_report, text_diff_report: the manipulations;
- speed_report: one caption to four 64-px images, each stage's share.
"""

import time

import torch

from .. import data
from ..lab import metrics, zoo
from ..lab.oracle import load_oracle, read
from ..lab.scoreboard import add_row, score
from ..lab.presets import check_preset, default_preset
from ..unclip import UnCLIP
from .prior import test_prompts
from .registry import get

PRIORS = ("prior_diffusion", "prior_ar", "prior_mlp", "prior_none", "prior_real")
# sizes: prompts per kind (one-, two-object) for the main row and for the comparisons; held-out prompts; prompts x
# images of the per-prompt diversity; prompts per kind of the guidance and reranking sweeps; images x copies of the
# variations; paths x frames; text-diff pairs
EVAL = {"smoke": dict(prompts=4, compare=4, holdout=4, tune=2, spread=(2, 2), variations=(4, 2), paths=(2, 3),
                      edits=4, thetas=(0.0, 0.5), speed_repeats=1),
        "cpu": dict(prompts=500, compare=250, holdout=250, tune=100, spread=(100, 4), variations=(100, 4),
                    paths=(100, 9), edits=201, thetas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), speed_repeats=3),
        "full": dict(prompts=1000, compare=500, holdout=500, tune=200, spread=(200, 4), variations=(200, 4),
                     paths=(100, 9), edits=402, thetas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), speed_repeats=3)}
SPEED_CAPTION = "a big red circle above a small blue square"
ATTRIBUTES = ("shape", "color", "size", "position")


def eval_sizes(preset, sizes=None):
    """EVAL[preset] with some sizes replaced, e.g. a notebook's smaller run: eval_sizes("cpu", {"paths": (20, 9)})."""
    unknown = sorted(set(sizes or {}) - set(EVAL[preset]))
    if unknown:
        raise ValueError(f"unknown measurement size(s) {unknown}; the sizes are {', '.join(EVAL[preset])}")
    return {**EVAL[preset], **(sizes or {})}


def load_unclip(preset=None, prior="prior_diffusion", decoder="decoder", upsampler="upsampler", cache=None):
    """UnCLIP of the zoo's models at one preset (each loaded, or trained if not cached); the CLIP is the decoder's."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}: choose one of {', '.join(PRIORS)}")
    preset = check_preset(preset) if preset is not None else default_preset()
    models = {name: zoo.load_or_train(get(name), preset, cache=cache) for name in (prior, decoder)}
    clip = zoo.Needs(get(decoder), preset, cache)["clip"]
    up = zoo.load_or_train(get(upsampler), preset, cache=cache) if upsampler else None
    return UnCLIP(clip, models[prior], models[decoder], up)


# ----------------------------------------------------------------------------- text -> image

def _split_scores(images, prompts, n, oracle):
    """score() on the first n (one-object) and the next n (two-object) prompts, keyed _one / _two."""
    out = {}
    for kind, part in (("one", slice(0, n)), ("two", slice(n, 2 * n))):
        if part.start >= len(images):
            continue
        report = score(images[part], prompts[part], oracle=oracle)
        out.update({f"{k}_{kind}": v for k, v in report.items()
                    if k.startswith(("caption_accuracy", "attr_", "binding", "validity", "fid"))})
    return out


@torch.no_grad()
def pipeline_scores(pipe, n, seed, spread=None, oracle=None, **options):
    """The oracle on pipe(prompts) for n one-object + n two-object test prompts (one image each): the overall and
    split numbers, at the output resolution and (key suffix _32) at the decoder's; with spread = (prompts, images),
    the per-prompt diversity of that many images of the first prompts of each kind."""
    oracle = oracle or load_oracle()
    prompts, _ = test_prompts(n, seed)
    start = time.perf_counter()
    stages = pipe.generate(prompts, n=1, seed=seed, return_stages=True, **options)
    seconds = time.perf_counter() - start
    report = score(stages.images, prompts, oracle=oracle)
    out = {"n": len(prompts), **{k: report[k] for k in report if k.startswith(
        ("caption_accuracy", "attr_", "binding", "validity", "fid", "kid", "coverage"))}}
    out.update(_split_scores(stages.images, prompts, n, oracle))
    if stages.low_res is not stages.images:
        out["caption_accuracy_32"] = score(stages.low_res, prompts, oracle=oracle)["caption_accuracy"]
    out["sample_seconds_per_1000"] = seconds * 1000 / len(prompts)
    out["stage_seconds"] = stages.seconds
    if spread:
        k, m = spread
        half = max(k // 2, 1)
        few = prompts[:half] + prompts[n:n + half]
        images = pipe.generate(few, n=m, seed=seed + 1, **options)
        out["diversity_per_prompt"] = score(images, [p for p in few for _ in range(m)], oracle=oracle)["diversity_per_prompt"]
    return out


@torch.no_grad()
def text_to_image_report(pipe, preset, seed=5000, sizes=None, **options):
    """The chapter's main row: test prompts (caption accuracy, split, binding, relation, diversity), and the held-out
    triples (holdout split) beside them."""
    sizes, oracle = eval_sizes(preset, sizes), load_oracle()
    out = pipeline_scores(pipe, sizes["prompts"], seed, sizes["spread"], oracle, **options)
    held = data.sample_scenes(sizes["holdout"], "holdout", seed=seed + 7, num_objects=1)
    seen = data.sample_scenes(sizes["holdout"], "test", seed=seed + 7, num_objects=1)
    for name, scenes in (("holdout", held), ("seen", seen)):
        images = pipe.generate(scenes.captions, n=1, seed=seed + 8, **options)
        out[f"caption_accuracy_{name}_one"] = score(images, scenes.captions, oracle=oracle)["caption_accuracy"]
    return out


def prior_comparison(preset, seed=5100, cache=None, use_captions=True):
    """The same prompts (EVAL's `compare` per kind) through the pipeline with each prior, the decoder reading the
    caption too (use_captions) or the embedding alone; every row at the decoder's resolution (no upsampler: it is the
    same for all)."""
    sizes, oracle, rows = EVAL[preset], load_oracle(), {}
    n, spread = sizes["compare"], (sizes["spread"][0] // 2, sizes["spread"][1])
    for prior in PRIORS:
        pipe = load_unclip(preset, prior=prior, upsampler=None, cache=cache)
        rows[prior] = pipeline_scores(pipe, n, seed, spread, oracle, use_captions=use_captions)
    return rows


# ----------------------------------------------------------------------------- the manipulations

def same_objects(source, reading, attributes):
    """(N,) bool: does each read scene (N, 2, 4) hold the source scene's objects (N, 2, 4), compared on `attributes`
    only (as multisets: the order of the objects does not matter)?"""
    cols = [ATTRIBUTES.index(a) for a in attributes]
    out = []
    for s, r in zip(source.tolist(), reading.tolist()):
        key = lambda rows: sorted(tuple(row[c] for c in cols) for row in rows if row[0] >= 0)
        out.append(key(s) == key(r))
    return torch.tensor(out)


def _share(mask):
    return mask.float().mean().item() if len(mask) else None


def test_images(n, seed):
    """n test scenes (half one-object, half two-object) and their renders."""
    _, scenes = test_prompts(n // 2, seed)
    return data.render(scenes), scenes


@torch.no_grad()
def variations_report(pipe, preset, seed=5200, eta=None, sizes=None):
    """Variations of test images (half one-object, half two-object), with fresh noise and from their inverted noise:
    how often each attribute is kept (every object's), validity, both for each kind apart, and the per-image
    diversity of the copies (0: all copies identical)."""
    k, m = eval_sizes(preset, sizes)["variations"]
    images, scenes = test_images(k, seed)
    oracle, out = load_oracle(), {"images": len(images), "copies": m}
    for mode, invert in (("fresh", False), ("inverted", True)):
        varied = pipe.variations(images, n=m, seed=seed, invert=invert, eta=eta)
        reading = read(oracle, varied)
        source = scenes.objects.repeat_interleave(m, 0)
        # among the valid variations (None if none is valid), and among all (an invalid one keeps nothing)
        row = {f"kept_{a}": _share(same_objects(source, reading.objects, (a,))[reading.valid]) for a in ATTRIBUTES}
        kept = same_objects(source, reading.objects, ("shape", "color"))
        row["kept_shape_and_color"] = _share(kept[reading.valid])
        row["kept_shape_and_color_of_all"] = _share(kept & reading.valid)
        row["validity"] = reading.valid.float().mean().item()
        half = len(source) // 2                                   # one-object sources first (test_images)
        for kind, part in (("one", slice(0, half)), ("two", slice(half, None))):
            row[f"kept_shape_and_color_of_all_{kind}"] = _share((kept & reading.valid)[part])
            row[f"kept_position_{kind}"] = _share(same_objects(source[part], reading.objects[part], ("position",))
                                                  [reading.valid[part]])
            row[f"validity_{kind}"] = _share(reading.valid[part])
        row["diversity_per_image"] = metrics.mean_pairwise_distance(reading.features,
                                                                    torch.arange(len(images)).repeat_interleave(m))
        row["pixel_distance_between_copies"] = (varied.view(len(images), m, -1)[:, 1:]
                                                - varied.view(len(images), m, -1)[:, :1]).abs().mean().item()
        out[mode] = row
    return out


@torch.no_grad()
def inversion_report(pipe, preset, seed=5300, sizes=None):
    """DDIM inversion of the decoder: PSNR of decoding each test image's embedding from its inverted noise (eta = 0),
    beside decoding it from random noise; at the decoder's resolution."""
    k, _ = eval_sizes(preset, sizes)["variations"]
    images, _ = test_images(k, seed)
    z = pipe.encode_image(images)
    x_T = pipe.invert(images)
    back = pipe.decode_embeddings(z, x_T=x_T, upsample=False)
    fresh = pipe.decode_embeddings(z, seed=seed, upsample=False)
    return {"images": len(images), "psnr_inverted": metrics.psnr(back, images).mean().item(),
            "psnr_random_noise": metrics.psnr(fresh, images).mean().item(),
            "x_T_std": x_T.std().item()}


@torch.no_grad()
def interpolation_report(pipe, preset, seed=5400, sizes=None):
    """Paths between pairs of one-object test images: the share of valid frames (the interior ones, and all), and
    for each attribute that differs between the ends, where along the path (0..1) the oracle first reads the far
    end's value for good (no later valid frame reads the near end's)."""
    paths, frames = eval_sizes(preset, sizes)["paths"]
    a = data.sample_scenes(paths, "test", seed=seed, num_objects=1)
    b = data.sample_scenes(paths, "test", seed=seed + 1, num_objects=1)
    strips = pipe.interpolate(data.render(a), data.render(b), frames=frames, seed=seed)       # (P, F, 3, R, R)
    reading = read(load_oracle(), strips.flatten(0, 1))
    valid = reading.valid.view(paths, frames)
    objects = reading.objects.view(paths, frames, 2, 4)[:, :, 0]                            # the first object read
    out = {"paths": paths, "frames": frames, "valid_interior": valid[:, 1:-1].float().mean().item(),
           "valid_all": valid.float().mean().item(), "ends_read_right": None}
    ends = [(objects[:, 0] == a.objects[:, 0]).all(-1), (objects[:, -1] == b.objects[:, 0]).all(-1)]
    out["ends_read_right"] = torch.stack(ends).float().mean().item()
    for i, name in enumerate(ATTRIBUTES):
        differ = a.objects[:, 0, i] != b.objects[:, 0, i]
        flips = []
        for p in differ.nonzero().flatten().tolist():
            at_a = (objects[p, :, i] == a.objects[p, 0, i]) & valid[p]
            at_b = (objects[p, :, i] == b.objects[p, 0, i]) & valid[p]
            # the first frame that reads b's value with no valid frame after it reading a's (invalid frames skipped)
            later = [f for f in range(frames) if at_b[f] and not at_a[f:].any()]
            if later:
                flips.append(later[0] / (frames - 1))
        out[f"flip_{name}"] = sum(flips) / len(flips) if flips else None
        out[f"flip_{name}_paths"] = len(flips)
    return out


def edit_pairs(n, seed):
    """n one-object test scenes, each with a caption change of one attribute (colour, shape and size in turn):
    (scenes, sources, targets, edited attribute per scene, the target value)."""
    scenes = data.sample_scenes(n, "test", seed=seed, num_objects=1)
    g = torch.Generator().manual_seed(seed)
    sources, targets, kinds, values = [], [], [], []
    names = {"shape": data.SHAPES, "color": data.COLORS, "size": data.SIZES}
    for i, (shape, color, size, _) in enumerate(scenes.objects[:, 0].tolist()):
        kind = ("color", "shape", "size")[i % 3]
        old = {"shape": shape, "color": color, "size": size}
        choices = [v for v in range(len(names[kind])) if v != old[kind]]
        new = dict(old, **{kind: choices[int(torch.randint(len(choices), (1,), generator=g))]})
        sources.append(data.object_phrase(old["shape"], old["color"], old["size"]))
        targets.append(data.object_phrase(new["shape"], new["color"], new["size"]))
        kinds.append(kind)
        values.append(new[kind])
    return scenes, sources, targets, kinds, values


@torch.no_grad()
def text_diff_report(pipe, preset, seed=5500, invert=True, sizes=None):
    """Text diffs on one-object test images, one attribute changed by caption: for each theta, the share of edits the
    oracle reads with the target value (success), with the other attributes kept, and both (a clean edit)."""
    sizes = eval_sizes(preset, sizes)
    n, thetas = sizes["edits"], sizes["thetas"]
    scenes, sources, targets, kinds, values = edit_pairs(n, seed)
    sources = [f"a {s}" for s in sources]
    targets = [f"a {t}" for t in targets]
    edited = pipe.text_diff(data.render(scenes), sources, targets, thetas, invert=invert, seed=seed)   # (n, K, ...)
    reading = read(load_oracle(), edited.transpose(0, 1).flatten(0, 1))
    objects = reading.objects.view(len(thetas), n, 2, 4)[:, :, 0]
    valid = reading.valid.view(len(thetas), n)
    col = torch.tensor([ATTRIBUTES.index(k) for k in kinds])
    target = torch.tensor(values)
    rows = []
    for j, theta in enumerate(thetas):
        got = objects[j]
        success = (got.gather(1, col[:, None])[:, 0] == target) & valid[j]
        others = torch.stack([(got[:, c] == scenes.objects[:, 0, c]) | (col == c) for c in range(4)], 1).all(1) & valid[j]
        row = {"theta": theta, "success": success.float().mean().item(), "others_kept": others.float().mean().item(),
               "clean_edit": (success & others).float().mean().item(), "validity": valid[j].float().mean().item()}
        for kind in ("color", "shape", "size"):
            sel = torch.tensor([k == kind for k in kinds])
            row[f"success_{kind}"] = success[sel].float().mean().item()
        rows.append(row)
    return {"edits": n, "inverted_noise": invert, "rows": rows}


def speed_report(pipe, repeats=3, caption=SPEED_CAPTION, n=4):
    """Seconds from one caption to n images (after one warm-up call), the median of `repeats`, with each stage's."""
    pipe.generate([caption], n=n)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        stages = pipe.generate([caption], n=n, return_stages=True)
        runs.append((time.perf_counter() - start, stages.seconds))
    total, seconds = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    return {"caption": caption, "images": n, "resolution": pipe.resolution, "seconds": total,
            "stage_seconds": seconds, "stage_share": {k: v / total for k, v in seconds.items()}}


# ----------------------------------------------------------------------------- the command line's hooks

def generate(preset, prompts, n, seed=0):
    """n images of the pipeline (the CLI's `sample unclip`): one per prompt, or n unconditional test captions."""
    prompts = prompts if prompts is not None else data.sample_scenes(n, "test", seed=seed).captions
    return load_unclip(preset).generate(list(prompts), n=1, seed=seed)


def benchmark(preset, n=1000, split="test", seed=0, path=None):
    """The scoreboard row `unclip`: n // 2 one-object and n // 2 two-object test prompts through the whole pipeline
    (the holdout split: one-object prompts of held-out triples), the speed test's seconds beside it."""
    pipe = load_unclip(preset)
    if split == "holdout":
        scenes = data.sample_scenes(n, "holdout", seed=seed + 100, num_objects=1)
        start = time.perf_counter()
        images = pipe.generate(scenes.captions, n=1, seed=seed)
        seconds = time.perf_counter() - start
        report = score(images, scenes.captions, seed=seed)
    else:
        start = time.perf_counter()
        report = pipeline_scores(pipe, max(n // 2, 1), seed + 100)
        seconds = time.perf_counter() - start
    report["seconds_1_caption_4_images"] = speed_report(pipe, repeats=1)["seconds"]
    train = sum(zoo.cached_meta(get(r), preset).get("seconds") or 0
                for r in ("clip", "prior_diffusion", "decoder", "upsampler"))
    return add_row("unclip", preset, report, train_seconds=train, sample_seconds=seconds, path=path, split=split)



# ----------------------------------------------------------------------------- the chapter's measurements, by section

SECTIONS = ("table", "compare", "compare_embedding_only", "guidance", "rerank", "variations", "inversion", "interpolation", "text_diff", "speed")
RERANK = (2, 4, 8)    # candidates per image; the guidance section's scale-2 row is the one-candidate baseline


def measure(preset, path, sections=SECTIONS, scoreboard=None):
    """Run the named sections of the chapter's measurement at `preset` and merge them into the JSON file `path`
    (written atomically after each section, with its command and the machine's load): what results/unclip_cpu.py
    and the claims command run. scoreboard: where `table` appends the benchmark row (default: the user's)."""
    import json
    import os
    from pathlib import Path

    from ..lab.checkpoint import atomic_write_json
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    path = Path(path)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("commands", {})
    pipe = None
    for section in sections:
        start, load = time.perf_counter(), os.getloadavg()[0]
        if section == "compare":
            results["compare"] = prior_comparison(preset)
        elif section == "compare_embedding_only":   # the decoder given no caption: it must read the embedding
            results["compare_embedding_only"] = prior_comparison(preset, use_captions=False)
        else:
            pipe = pipe or load_unclip(preset)
            if section == "table":
                results["table"] = text_to_image_report(pipe, preset)
                results["scoreboard_row"] = benchmark(preset, path=scoreboard)
            elif section == "guidance":   # the decoder's scale inside the pipeline (the caption read)
                n = EVAL[preset]["tune"]
                results["guidance"] = {str(w): pipeline_scores(pipe, n, 5600, decoder_guidance=w, upsample=False)
                                       for w in (1.0, 2.0, 3.0, 4.0)}
            elif section == "rerank":     # CLIP reranking on the guidance section's prompts and seeds
                n = EVAL[preset]["tune"]
                results["rerank"] = {str(k): pipeline_scores(pipe, n, 5600, upsample=False, rerank=k) for k in RERANK}
            elif section == "variations":   # eta 1 beside the default for the inverted noise
                results["variations"] = variations_report(pipe, preset)
                results["variations_eta_1"] = variations_report(pipe, preset, eta=1.0)["inverted"]
            elif section == "inversion":
                results["inversion"] = inversion_report(pipe, preset)
            elif section == "interpolation":
                results["interpolation"] = interpolation_report(pipe, preset)
            elif section == "text_diff":    # from the inverted noise (the paper's) and from random noise
                results["text_diff"] = text_diff_report(pipe, preset)
                results["text_diff_random_noise"] = text_diff_report(pipe, preset, invert=False)
            elif section == "speed":
                results["speed"] = speed_report(pipe, repeats=EVAL[preset]["speed_repeats"])
        results["commands"][section] = (f"PYTHONPATH=. python results/unclip_cpu.py {path} {section}" if preset == "cpu"
                                        else f"python -m minidalle2 claims --preset {preset}")
        results.setdefault("load", {})[section] = (f"1-min load {load:.2f} at the start, "
                                                   f"{time.perf_counter() - start:.0f} s")
        atomic_write_json(path, results)
    return results
