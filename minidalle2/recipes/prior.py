"""Chapter 12's recipes: the diffusion prior, the autoregressive prior, and the rows they are compared with (an MLP
regressor, the text embedding itself, and the embedding of a real render), all on the chapter-07 CLIP.

How a prior is measured without a decoder (prior_report), on held-out test captions, half one-object and half
two-object:
- knn caption accuracy: the labels of the nearest real image embedding in a bank (several renders of each test
  caption, their hard-negative twins, and random test scenes; >= 10,000 at cpu), scored against the caption exactly as the
  scoreboard scores an image (oracle.matches: every stated attribute, and the relation);
- cosine to truth: mean cosine between a sampled embedding and fresh renders of its caption, beside the same for the
  text embedding (image-text: the modality gap) and for another render (image-image);
- diversity ratio: the spread of several samples per caption over the spread of real renders of it (1: as varied
  as real, 0: collapsed onto one point); cosine to truth alone rewards collapse;
- Frechet distance between sampled and real embeddings of the same captions, beside real against real.
"""

import time

import torch

from .. import data, prior
from ..lab import metrics
from ..lab.oracle import matches
from ..lab.train import TrainResult, train
from ..lab.zoo import Recipe
from .clip import CLIP

# sizes of the measurement: prompts per kind (one-object, two-object), bank and renders of each prompt in it,
# renders per prompt for the truth, prompts in the diversity test and samples per prompt
EVAL = {"smoke": dict(prompts=32, bank=500, renders=2, truths=2, spread_prompts=8, spread_samples=4),
        "cpu": dict(prompts=500, bank=10_000, renders=4, truths=4, spread_prompts=100, spread_samples=16),
        "full": dict(prompts=1000, bank=20_000, renders=4, truths=4, spread_prompts=200, spread_samples=16)}
P_TWO = 0.5                          # two-object scenes in the priors' training captions
# the priors' training scenes (each recipe's `data`, so that it is part of the fingerprint)
TRAIN_DATA = {"smoke": dict(size=1_000, p_two=P_TWO), "cpu": dict(size=50_000, p_two=P_TWO),
              "full": dict(size=100_000, p_two=P_TWO)}


def embedding_data(clip, size, p_two=P_TWO):
    """The priors' training set: `size` train scenes through the frozen CLIP (prior.EmbeddingDataset)."""
    return prior.EmbeddingDataset(clip, data.sample_scenes(size, "train", seed=0, p_two=p_two))


def fit_prior(loss):
    """A recipe's fit: bind the prior to its CLIP, fit its normalisation (and quantizer) to the training
    embeddings, then the one training loop."""
    def fit(model, job):
        clip = job.needs["clip"]
        dataset = embedding_data(clip, **job.recipe.data[job.preset])
        model.bind(clip).norm.fit(dataset.image_embed)
        if hasattr(model, "quantizer"):
            model.quantizer.fit(dataset.image_embed)
        return train(model, loss, dataset, job.train_config(), run_dir=job.run_dir, kind=job.recipe.kind)
    return fit


def fit_nothing(model, job):
    """The rows that learn nothing (the text embedding, a real render) only record their CLIP."""
    return TrainResult(model.bind(job.needs["clip"]), model)


# ----------------------------------------------------------------------------- measurement

def test_prompts(n, seed):
    """(captions, scenes): n one-object then n two-object scenes of the test split (never trained on)."""
    one = data.sample_scenes(n, "test", seed=seed, num_objects=1)
    two = data.sample_scenes(n, "test", seed=seed + 1, num_objects=2)
    scenes = data.Scenes(torch.cat([one.objects, two.objects]), torch.cat([one.offsets, two.offsets]),
                         one.captions + two.captions, torch.cat([one.choices, two.choices]))
    return scenes.captions, scenes


def _encode(clip, scenes):
    images = data.render(scenes)
    return torch.cat([clip.encode_image(images[i:i + 500]).cpu() for i in range(0, len(images), 500)])


@torch.no_grad()
def embedding_bank(clip, scenes, size, seed, renders=1):
    """(embeddings, labels) of a bank of real images: `renders` renders of each test caption (`scenes` itself, then
    data.scenes_from_prompts: a relation leaves the cells open, so one render cannot stand for all of them), the
    hard-negative twin of each (data.twin_scenes), and random test scenes up to `size`."""
    parts = [scenes]
    for r in range(1, renders):
        again = data.scenes_from_prompts(scenes.captions, seed + 500 + r)
        parts.append(data.Scenes(again.objects, again.offsets, scenes.captions, scenes.choices))
    parts += [data.twin_scenes(s, "test", seed=seed + r) for r, s in enumerate(parts)]
    parts.append(data.sample_scenes(max(size - sum(map(len, parts)), 0), "test", seed=seed + 7, p_two=P_TWO))
    return (torch.cat([_encode(clip, s) for s in parts if len(s)]),
            torch.cat([s.objects for s in parts if len(s)]))


def knn_accuracy(embeddings, prompts, bank, labels):
    """Share of embeddings whose nearest bank image (cosine) satisfies its prompt (oracle.matches)."""
    nearest = torch.cat([(embeddings[i:i + 1000] @ bank.T).argmax(1) for i in range(0, len(embeddings), 1000)])
    parsed = [data.parse_caption(p) for p in prompts]
    return torch.tensor([matches(p, labels[j]) for p, j in zip(parsed, nearest.tolist())], dtype=torch.float)


def spread(x):
    """Mean distance of points (N, D) to their centroid."""
    return (x - x.mean(0)).norm(dim=-1).mean().item()


@torch.no_grad()
def prior_report(model, needs, preset=None, seed=2000, **options):
    """The chapter's numbers for one prior (see the module docstring), sized by `preset` (default: its needs'
    preset); options go to model.sample (best_of, guidance, steps, ...)."""
    clip = needs["clip"]
    sizes = EVAL[preset or needs.preset]
    n, truths = sizes["prompts"], sizes["truths"]
    prompts, scenes = test_prompts(n, seed)
    bank, labels = embedding_bank(clip, scenes, sizes["bank"], seed, sizes["renders"])
    start = time.perf_counter()
    z = model.sample(clip, prompts, seed=seed, **options)
    seconds = time.perf_counter() - start
    hits = knn_accuracy(z, prompts, bank, labels)
    out = {"n": len(prompts), "bank": len(bank), "knn_caption_accuracy": hits.mean().item(),
           "knn_caption_accuracy_one": hits[:n].mean().item(), "knn_caption_accuracy_two": hits[n:].mean().item(),
           "sample_seconds_per_1000": seconds * 1000 / len(prompts)}
    # fresh renders of every prompt: the truth to compare with
    renders = torch.stack([_encode(clip, data.scenes_from_prompts(prompts, seed + 100 + k)) for k in range(truths)])
    text = torch.cat([clip.encode_text(prompts[i:i + 500]).cpu() for i in range(0, len(prompts), 500)])
    out["cosine_to_truth"] = (renders * z[None]).sum(-1).mean().item()
    out["cosine_text_to_truth"] = (renders * text[None]).sum(-1).mean().item()
    out["cosine_truth_to_truth"] = (renders[1:] * renders[0][None]).sum(-1).mean().item()
    out["fd"] = metrics.frechet_distance(z, renders[0])
    out["fd_floor"] = metrics.frechet_distance(renders[1], renders[0])
    # diversity: several samples of a few prompts, against as many real renders of each
    k, m = sizes["spread_prompts"], sizes["spread_samples"]
    few = prompts[:k // 2] + prompts[n:n + k // 2]
    samples = model.sample(clip, [p for p in few for _ in range(m)], seed=seed + 1, **options).view(len(few), m, -1)
    real = torch.stack([_encode(clip, data.scenes_from_prompts(few, seed + 300 + j)) for j in range(m)], 1)
    sampled_spread = sum(spread(s) for s in samples) / len(few)
    real_spread = sum(spread(r) for r in real) / len(few)
    out.update(spread_sampled=sampled_spread, spread_real=real_spread, diversity_ratio=sampled_spread / real_spread)
    return out


# ----------------------------------------------------------------------------- recipes

CLIP_SIZES = {p: dict(embed_dim=CLIP.model[p]["embed_dim"], text_width=CLIP.model[p]["text_width"])
              for p in CLIP.model}
SMALL_TRAINING = dict(steps=20, batch_size=32, lr=1e-3, warmup_steps=5, log_every=5)


def transformer_training(cpu_steps):
    """Both priors' budget: AdamW, warm-up then cosine decay, clipping, bf16, and an EMA with warm-up
    (train.ema_warmup_fn): a plain 0.999 EMA of a 1,230-step run keeps 0.999^1230 = 29% of the random initial
    weights, which left the AR prior's samples unrelated to their captions (kNN accuracy 0.04)."""
    return {"smoke": SMALL_TRAINING,
            "cpu": dict(steps=cpu_steps, batch_size=256, lr=1e-3, weight_decay=0.01, warmup_steps=100,
                        lr_schedule="cosine", grad_clip=1.0, ema_decay=0.999, ema_warmup=True, bf16=True, log_every=50),
            "full": dict(steps=20000, batch_size=512, lr=5e-4, weight_decay=0.01, warmup_steps=500,
                         lr_schedule="cosine", grad_clip=1.0, ema_decay=0.9995, ema_warmup=True, bf16=True,
                         log_every=100)}


def _per_preset(extra):
    return {p: {**CLIP_SIZES[p], **extra.get(p, {})} for p in CLIP_SIZES}


PRIOR_DIFFUSION = Recipe(
    "prior_diffusion", "prior_diffusion", prior.DiffusionPrior, needs=(CLIP,), data=TRAIN_DATA,
    description="diffusion prior: causal transformer over [text, pooled, t, z_t, query] -> z_0, CFG by dropping the text",
    # standardised embeddings. At 600 steps (results/prior_cpu.json, normalization_600_steps) plain unit vectors were
    # worst (FD 0.0043 vs 0.0021, diversity 0.06); sqrt_d and standardize were within noise (kNN 0.782 vs 0.771)
    model=_per_preset({"smoke": dict(width=32, layers=2, normalization="standardize"),
                       "cpu": dict(width=128, layers=4, normalization="standardize"),
                       "full": dict(width=256, layers=6, heads=8, normalization="standardize")}),
    fit=fit_prior(prior.prior_loss),
    training=transformer_training(2300),     # cpu: 2,300 steps of 256, ~0.23 s each on 2 cores: ~9 minutes
    report=prior_report)

# k: the fewest principal components that leave < 1% of the variance of the CLIP's training image embeddings
# (PCAQuantizer.smallest_k: 15 of 64 for the cpu CLIP, notebook 12 plots it); full's 48 is not measured yet
PRIOR_AR = Recipe(
    "prior_ar", "prior_ar", prior.ARPrior, needs=(CLIP,), data=TRAIN_DATA,
    description="autoregressive prior: PCA + quantile codes of the image embedding, a causal transformer after the text",
    model=_per_preset({"smoke": dict(k=8, bins=16, width=32, layers=2), "cpu": dict(k=15, bins=128, width=128, layers=4),
                       "full": dict(k=48, bins=256, width=256, layers=6, heads=8)}),
    fit=fit_prior(prior.ar_prior_loss),
    # cpu: the diffusion prior's minutes; its longer sequence ([text, pooled, 14 codes]) takes ~0.43 s a step
    training=transformer_training(1230),
    report=prior_report)

PRIOR_MLP = Recipe(
    "prior_mlp", "prior_mlp", prior.RegressionPrior, needs=(CLIP,), data=TRAIN_DATA,
    description="baseline: a deterministic MLP from the text embedding to the image embedding",
    model=_per_preset({"smoke": dict(hidden=64)}),
    fit=fit_prior(prior.regression_loss),
    training={"smoke": SMALL_TRAINING,
              "cpu": dict(steps=3000, batch_size=256, lr=1e-3, weight_decay=0.01, warmup_steps=100,
                          lr_schedule="cosine", log_every=50),
              "full": dict(steps=10000, batch_size=512, lr=1e-3, weight_decay=0.01, warmup_steps=200,
                           lr_schedule="cosine", log_every=100)},
    report=prior_report)

NO_TRAINING = {p: dict(steps=1, batch_size=1, lr=1e-3) for p in CLIP_SIZES}   # recorded, never run

PRIOR_NONE = Recipe(
    "prior_none", "prior_none", prior.TextPrior, needs=(CLIP,), model=_per_preset({}), fit=fit_nothing,
    description="baseline: no prior, the caption's text embedding used as the image embedding",
    training=NO_TRAINING, report=prior_report)

PRIOR_REAL = Recipe(
    "prior_real", "prior_real", prior.RenderPrior, needs=(CLIP,), model=_per_preset({}), fit=fit_nothing,
    description="ceiling: the CLIP image embedding of a real render of the caption",
    training=NO_TRAINING, report=prior_report)

RECIPES = [PRIOR_DIFFUSION, PRIOR_AR, PRIOR_MLP, PRIOR_NONE, PRIOR_REAL]
