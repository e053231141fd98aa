"""Chapter 13's recipes: unCLIP's decoder (CLIP image embedding -> 32-px image) on the chapter-07 CLIP, its ablation
without the text pathway, and the 32 -> 64 upsampler with and without conditioning augmentation; with the
measurements the chapter makes on them.

How the decoder is measured (decoder_report): test scenes (half one-object, half two-object, never trained on) are
rendered, encoded by the CLIP, and their embeddings decoded with no caption; the oracle scores each image against
its scene's caption (caption accuracy, per attribute, binding errors) and against its exact labels (every object's
shape, colour, size and cell). How the upsampler is measured (upsampler_report): real test scenes rendered at 64 px,
area-downsampled to 32 and enlarged again: the oracle's caption accuracy at 64 beside the same 32-px inputs, FID
at 64 beside the real floor, PSNR against the real 64-px image.
"""

import time

import torch

from .. import data
from ..decoder import Decoder, decoder_loss
from ..lab import metrics
from ..lab.oracle import load_oracle, matches, read
from ..lab.scoreboard import score
from ..lab.train import train
from ..lab.zoo import Recipe
from ..prior import EmbeddingDataset
from ..upsampler import Upsampler, upsampler_loss
from .clip import CLIP
from .common import shapes_train
from .prior import CLIP_SIZES, P_TWO, test_prompts

# the chosen CFG scale (guide "both"): the best caption accuracy of the cpu sweep over scales 1-5 (results/decoder_cpu.json);
# validity and per-embedding diversity fall with every step up in scale
GUIDANCE = 2.0
SCALES = (1.0, 2.0, 3.0, 4.0, 5.0)
DATA = {"smoke": dict(size=1_000, p_two=P_TWO), "cpu": dict(size=50_000, p_two=P_TWO),
        "full": dict(size=100_000, p_two=P_TWO)}
# sizes of the measurements: prompts per kind (one-, two-object), embeddings x seeds of the diversity test,
# images of the speed test
EVAL = {"smoke": dict(prompts=16, spread_embeds=4, spread_seeds=2, speed=8),
        "cpu": dict(prompts=500, spread_embeds=100, spread_seeds=5, speed=64),
        "full": dict(prompts=1000, spread_embeds=200, spread_seeds=5, speed=64)}

# the U-Net of chapter 11 (patchified at cpu), attention at <= 8x8 reading the context tokens
NET = {"smoke": dict(widths=[16, 32], patch_size=2, attention_levels=[1]),
       "cpu": dict(widths=[32, 64, 128], patch_size=2, attention_levels=[1, 2]),
       "full": dict(widths=[64, 128, 256], patch_size=1, attention_levels=[2], blocks_per_level=2)}
SMALL_TRAINING = dict(steps=20, batch_size=32, lr=1e-3, warmup_steps=5, log_every=5)
# chapter 11's budget: constant lr after warm-up, bf16, EMA with warm-up; cpu: ~0.2 s a step on 2 cores, 9 minutes
TRAINING = {
    "smoke": SMALL_TRAINING,
    "cpu": dict(steps=2600, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="constant", grad_clip=1.0,
                ema_decay=0.998, ema_warmup=True, bf16=True, log_every=50),
    "full": dict(steps=30000, batch_size=128, lr=2e-4, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
                 ema_decay=0.9995, ema_warmup=True, bf16=True, log_every=200),
}


def fit_decoder(model, job):
    """Bind the decoder to its CLIP, encode the training scenes once (EmbeddingDataset keeps the images), train."""
    clip = job.needs["clip"]
    size, p_two = job.recipe.data[job.preset]["size"], job.recipe.data[job.preset]["p_two"]
    dataset = EmbeddingDataset(clip, data.sample_scenes(size, "train", seed=0, p_two=p_two), keep_images=True)
    model.bind(clip)
    return train(model, decoder_loss, dataset, job.train_config(), run_dir=job.run_dir, kind=job.recipe.kind)


def encode(clip, images, batch_size=500):
    return torch.cat([clip.encode_image(images[i:i + batch_size]).cpu() for i in range(0, len(images), batch_size)])


def decode_prompts(model, prompts, n, seed, needs):
    """The benchmark's sampler: render each prompt, encode the render with the CLIP, decode the embedding (no
    caption) at the chosen scale. The scoreboard row of a decoder is "decoding real embeddings"."""
    clip = needs["clip"]
    images = data.render(data.scenes_from_prompts(prompts, seed))
    return model.decode(clip, encode(clip, images), guidance=GUIDANCE, seed=seed)


def label_accuracy(images, objects, oracle=None):
    """Share of images the oracle reads as exactly the source scene: every object's shape, colour, size, cell."""
    reading = read(oracle or load_oracle(), images)
    ok = [bool(v) and matches(data.prompt_from_labels(o), r) for o, r, v in zip(objects, reading.objects, reading.valid)]
    return sum(ok) / len(ok)


def split_report(images, scenes, n, oracle=None):
    """score() on the one-object half and the two-object half apart, keyed _one / _two, with label accuracy."""
    out = {}
    for kind, part in (("one", slice(0, n)), ("two", slice(n, 2 * n))):
        report = score(images[part], scenes.captions[part], oracle=oracle)
        report["label_accuracy"] = label_accuracy(images[part], scenes.objects[part], oracle)
        keep = [k for k in report if k.startswith(("caption_accuracy", "attr_", "binding", "validity", "label", "fid"))]
        out.update({f"{k}_{kind}": report[k] for k in keep})
    return out


@torch.no_grad()
def decoder_report(model, needs, preset=None, seed=3000, guidance=GUIDANCE, guide="both", captions=False, **options):
    """Decoding real embeddings of n one-object and n two-object test scenes (the module docstring), and the sampling
    time of the speed test (DDIM-50, CFG, `speed` images). captions=True also gives the decoder each scene's caption."""
    clip, sizes = needs["clip"], EVAL[preset or needs.preset]
    n = sizes["prompts"]
    prompts, scenes = test_prompts(n, seed)
    real = data.render(scenes)
    z = encode(clip, real)
    start = time.perf_counter()
    images = model.decode(clip, z, prompts if captions else None, guidance=guidance, guide=guide, seed=seed, **options)
    seconds = time.perf_counter() - start
    oracle = load_oracle()
    report = score(images, prompts, oracle=oracle)
    out = {"n": len(images), "guidance": guidance, "caption_accuracy": report["caption_accuracy"],
           "validity": report["validity"], "fid": report["fid"], "fid_floor": report["fid_floor"],
           "binding_errors": report.get("binding_errors"), "label_accuracy": label_accuracy(images, scenes.objects, oracle),
           "sample_seconds_per_1000": seconds * 1000 / len(images)}
    out.update({k: v for k, v in report.items() if k.startswith("attr_")})
    out.update(split_report(images, scenes, n, oracle))
    k = sizes["speed"]
    start = time.perf_counter()
    model.decode(clip, z[:k], guidance=guidance, guide=guide, seed=seed, **options)
    out[f"seconds_ddim50_{k}_images"] = time.perf_counter() - start
    return out


def per_embedding_diversity(model, clip, embeds, seeds, guidance=GUIDANCE, captions=None, oracle=None):
    """(images (E * seeds), mean oracle-feature distance between the decodings of one embedding with different
    noise): what the embedding leaves open."""
    images = torch.cat([model.decode(clip, embeds, captions, guidance=guidance, seed=s) for s in range(seeds)])
    groups = torch.arange(len(embeds)).repeat(seeds)
    features = read(oracle or load_oracle(), images).features
    return images, metrics.mean_pairwise_distance(features, groups)


def guidance_sweep(model, needs, preset=None, scales=SCALES, seed=3100):
    """For each CFG scale: caption accuracy (one-, two-object) and per-embedding diversity, decoding real test
    embeddings of E scenes, each with S seeds (EVAL's spread sizes)."""
    clip, sizes = needs["clip"], EVAL[preset or needs.preset]
    E, S = sizes["spread_embeds"], sizes["spread_seeds"]
    prompts, scenes = test_prompts(E // 2, seed)
    z = encode(clip, data.render(scenes))
    oracle, rows = load_oracle(), []
    for w in scales:
        start = time.perf_counter()
        images, diversity = per_embedding_diversity(model, clip, z, S, guidance=w, oracle=oracle)
        seconds = time.perf_counter() - start
        report = score(images, prompts * S, oracle=oracle)
        one = [i for i in range(len(images)) if i % E < E // 2]
        two = [i for i in range(len(images)) if i % E >= E // 2]
        acc = lambda idx: score(images[idx], [prompts[i % E] for i in idx], oracle=oracle)["caption_accuracy"]
        rows.append({"scale": w, "caption_accuracy": report["caption_accuracy"], "caption_accuracy_one": acc(one),
                     "caption_accuracy_two": acc(two), "binding_errors": report.get("binding_errors"),
                     "validity": report["validity"], "fid": report["fid"], "diversity_per_embedding": diversity,
                     "images": len(images), "sample_seconds": seconds})
    return rows


# ----------------------------------------------------------------------------- the upsampler's measurement

def real_low_high(n, seed):
    """(32-px inputs, 64-px truth, scenes): n test scenes rendered at 64 px, area-downsampled to 32."""
    scenes = data.sample_scenes(n, "test", seed=seed, p_two=P_TWO)
    high = data.render(scenes, 64)
    return data.downsample(high, 32), high, scenes


@torch.no_grad()
def upsampling_report(model, low, captions, high=None, oracle=None, **options):
    """The oracle on `low` (32 px) and on model.upsample(low) (64 px): caption accuracy at both, FID at 64 beside
    the floor; PSNR against `high` if given; seconds per 1000 images."""
    oracle = oracle or load_oracle()
    start = time.perf_counter()
    up = model.upsample(low, **options)
    seconds = time.perf_counter() - start
    at_64, at_32 = score(up, captions, oracle=oracle), score(low, captions, oracle=oracle)
    out = {"caption_accuracy_64": at_64["caption_accuracy"], "caption_accuracy_32": at_32["caption_accuracy"],
           "validity_64": at_64["validity"], "fid_64": at_64["fid"], "fid_floor_64": at_64["fid_floor"],
           "sample_seconds_per_1000": seconds * 1000 / len(low)}
    if high is not None:
        out["psnr"] = metrics.psnr(up, high).mean().item()
        out["psnr_bilinear"] = metrics.psnr(model.enlarge(low).clamp(-1, 1), high).mean().item()
    return out


def upsampler_report(model, n=1000, speed=64, seed=4000):
    """upsampling_report on n real 32-px inputs (test scenes), and the time to upsample `speed` images."""
    low, high, scenes = real_low_high(n, seed)
    out = {"n": n, **upsampling_report(model, low, scenes.captions, high)}
    start = time.perf_counter()
    model.upsample(low[:speed])
    out[f"seconds_{speed}_images"] = time.perf_counter() - start
    return out


# ----------------------------------------------------------------------------- recipes

def _decoder_model(**extra):
    return {p: {**CLIP_SIZES[p], **NET[p], **extra} for p in NET}


DECODER = Recipe(
    "decoder", "decoder", Decoder, needs=(CLIP,), data=DATA, model=_decoder_model(), fit=fit_decoder,
    description="unCLIP decoder: U-Net + CLIP image embedding (added to emb, 4 context tokens) + CLIP text tokens; "
                "embedding dropped 10%, caption 50%",
    training=TRAINING, sample=decode_prompts, conditional=True, report=decoder_report)

DECODER_NO_TEXT = Recipe(
    "decoder_no_text", "decoder", Decoder, needs=(CLIP,), data=DATA, model=_decoder_model(use_text=False),
    fit=fit_decoder, description="ablation: the decoder without its text pathway (the CLIP image embedding only)",
    training=TRAINING, sample=decode_prompts, conditional=True, report=decoder_report)

UPSAMPLER_NET = {"smoke": dict(widths=[16, 32], patch_size=2, crop=32),
                 "cpu": dict(widths=[32, 64, 128], patch_size=2, crop=32),
                 "full": dict(widths=[64, 128, 256], patch_size=2, crop=64)}
# the decoder's budget in steps of the upsampler's cost; cpu: ~0.15 s a step on 32x32 crops (no attention), 3,500 in ~9 minutes
UPSAMPLER_TRAINING = {**TRAINING, "cpu": {**TRAINING["cpu"], "steps": 3500}, "full": {**TRAINING["full"], "steps": 20000}}


def upsampler_train(size, p_two=P_TWO):
    """`size` train scenes rendered at 64 px."""
    return shapes_train(size, resolution=64, p_two=p_two)


UPSAMPLER = Recipe(
    "upsampler", "upsampler", Upsampler, model=UPSAMPLER_NET, loss=upsampler_loss, dataset=upsampler_train,
    data=DATA, training=UPSAMPLER_TRAINING,
    description="32 -> 64 diffusion upsampler (convolutional, trained on 32x32 crops), conditioning augmentation "
                "(blur + noise of a known level)",
    report=upsampler_report)

UPSAMPLER_NO_AUG = UPSAMPLER.variant(
    "upsampler_no_aug", model=dict(augment=False),
    description="ablation: the 32 -> 64 upsampler trained on clean 32-px inputs")

RECIPES = [DECODER, DECODER_NO_TEXT, UPSAMPLER, UPSAMPLER_NO_AUG]
