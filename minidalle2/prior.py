"""
unCLIP's prior (Ramesh et al., 2022, section 2.2): a caption's CLIP text embedding -> a CLIP image embedding,
the one the decoder (chapter 13) will draw. Why a second model at all: a caption's text embedding is not an
image embedding (the modality gap: the two clouds sit apart on the sphere), and one caption has many images
(its unstated details), so the map is one-to-many -- a regressor collapses onto their mean, a generative prior
samples them.

    text = text_condition(*clip.text_states(captions, with_embedding=True))   # (B, L + 1, W): tokens + pooled
    model = DiffusionPrior(embed_dim=64, text_width=128)     # a causal transformer, x0-prediction
    loss, logs = prior_loss(model, batch)                    # batch: text, text_embed, image_embed
    z = model.sample(clip, ["a big red circle above a small blue square"], best_of=2)   # (1, 64), unit length

Two priors, as in the paper:
- DiffusionPrior: a DiffusionModel over vectors (diffusion.py's scheduler, unchanged). Its network reads the
  sequence [text tokens.., pooled text embedding, timestep, noised image embedding z_t, query] through a causal
  transformer; the output at the query is the clean embedding z_0 (x0-prediction, trained with MSE).
- ARPrior: the embedding -> PCA (k components) -> each coordinate quantised into `bins` quantile buckets ->
  a causal transformer predicts the codes in order of decreasing variance, after the text as a prefix.
and, for the table, RegressionPrior (an MLP: text embedding -> image embedding, deterministic), TextPrior (the
text embedding itself: "no prior") and RenderPrior (the embedding of a real render of the caption: the ceiling).

Both priors drop the whole text (tokens and pooled embedding together) 10% of the time for classifier-free
guidance; the text travels as one tensor (text_condition) so that diffusion.null_condition's NaN row nulls all
of it, and never the noised image embedding. Embeddings are modelled after EmbeddingNorm (per-dimension
standardisation by default, its statistics are buffers saved with the weights) and mapped back to unit length.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .clip import CLIPBound
from .diffusion import check_scale, drop_condition
from .diffusion_model import DiffusionModel
from .layers import TransformerBlock, expect_latents, timestep_embedding

NORMALIZATIONS = ("standardize", "sqrt_d", "unit")
P_DROP_TEXT = 0.1       # the share of training rows whose text is replaced by the learned null (the paper's 10%)
SAMPLE_STEPS = 64       # DDIM steps of the diffusion prior (the paper samples its prior with 64)
BEST_OF = 2             # the paper's best-of-N: keep the sample closest to the text embedding


# ----------------------------------------------------------------------------- the text, as one tensor

def text_condition(states, mask, embed):
    """The text a prior reads, packed into one tensor (B, L + 1, P), P = max(W, D): rows 0..L-1 the token states
    (B, L, W) with NaN where `mask` (B, L) is False (padding), row L the pooled text embedding (B, D), zero-padded.
    One tensor, so that CFG's null (a row of NaN: diffusion.null_condition) drops tokens and embedding together."""
    if states.ndim != 3 or mask.shape != states.shape[:2] or embed.ndim != 2 or len(embed) != len(states):
        raise ValueError(f"text_condition expects states (B, L, W), mask (B, L) and embed (B, D), got "
                         f"{tuple(states.shape)}, {tuple(mask.shape)}, {tuple(embed.shape)}")
    if not mask[:, 0].all():
        raise ValueError("text_condition: every caption needs at least its first token (mask[:, 0] all True)")
    width = max(states.shape[2], embed.shape[1])
    tokens = F.pad(states.float(), (0, width - states.shape[2])).masked_fill(~mask[..., None].to(states.device), float("nan"))
    pooled = F.pad(embed.float(), (0, width - embed.shape[1]))[:, None]
    return torch.cat([tokens, pooled.to(tokens.device)], 1)


def split_text(text, text_width, embed_dim):
    """text_condition's tensor -> (states (B, L, W) with 0 at padding, mask (B, L), embed (B, D), dropped (B,)):
    dropped rows (all NaN, CFG's null) are the network's to replace with its learned null."""
    if text.ndim != 3 or text.shape[2] < max(text_width, embed_dim):
        raise ValueError(f"a prior's text is text_condition(states, mask, embed): (B, L + 1, >= {max(text_width, embed_dim)}), "
                         f"got {tuple(text.shape)}")
    nan = text.isnan()
    dropped = nan.flatten(1).all(1)
    mask = ~nan[:, :-1].any(-1)
    clean = text.nan_to_num(0.0)
    return clean[:, :-1, :text_width], mask, clean[:, -1, :embed_dim], dropped


def check_captions(captions, tokenize=None):
    """Captions a Shapes prior can read: a non-empty list of non-empty strings of known words (data.parse_caption
    names an unknown one) that fit the CLIP context (no silent truncation: a prior would read another caption)."""
    captions = data.check_prompt_list(captions, "captions")
    if not isinstance(captions, (list, tuple)) or not captions:
        raise ValueError(f"captions must be a non-empty list of strings, got {captions!r:.60}")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"caption {i} is a {type(c).__name__}, not a string")
        if not c.strip():
            raise ValueError(f"caption {i} is empty; a prior needs a caption that names at least one shape")
        data.parse_caption(c)   # unknown words, contradictions: a named error
    if tokenize is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")   # clip.tokenize warns when it truncates; a prior refuses instead
            tokenize(list(captions))
        for w in caught:
            if "truncated" in str(w.message):
                raise ValueError(f"a caption is too long for the prior's CLIP: {w.message}")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return list(captions)


# ----------------------------------------------------------------------------- normalisation

class EmbeddingNorm(nn.Module):
    """The space a prior models. CLIP embeddings are unit vectors, so each coordinate is ~ 1/sqrt(D): far smaller
    than the unit-variance noise diffusion adds. "standardize": (z - mean) / std per dimension (statistics from the
    training embeddings, saved as buffers); "sqrt_d": z * sqrt(D); "unit": z as it is. decode() maps back to unit length."""

    def __init__(self, dim, mode="standardize"):
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
        self.mode = mode
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, embeddings):
        expect_latents(embeddings, len(self.mean), "EmbeddingNorm.fit", "embeddings")
        if self.mode == "standardize":
            self.mean.copy_(embeddings.mean(0))
            self.std.copy_(embeddings.std(0).clamp(min=1e-6))
        return self

    def encode(self, z):
        expect_latents(z, len(self.mean), "EmbeddingNorm.encode", "embeddings")
        if self.mode == "standardize":
            return (z - self.mean) / self.std
        return z * math.sqrt(len(self.mean)) if self.mode == "sqrt_d" else z

    def decode(self, x):
        expect_latents(x, len(self.mean), "EmbeddingNorm.decode", "embeddings")
        z = x * self.std + self.mean if self.mode == "standardize" else x
        return F.normalize(z.float(), dim=-1)


# ----------------------------------------------------------------------------- what every prior shares

class Prior(CLIPBound, nn.Module):
    """A text -> image-embedding model. sample(clip, captions) checks the captions and the CLIP, encodes the text
    and returns (B, D) unit-length image embeddings; subclasses implement embed(text, text_embed, seed, **options).
    bind(clip) records the CLIP it is trained on; check_clip(clip) refuses another (clip.CLIPBound)."""

    def __init__(self, embed_dim, text_width, normalization="standardize"):
        super().__init__()
        self.embed_dim, self.text_width = embed_dim, text_width
        self.norm = EmbeddingNorm(embed_dim, normalization)
        self.register_clip_id()

    @torch.no_grad()
    def encode_text(self, clip, captions):
        """(text, text_embed) for captions: text_condition(...) and the pooled (B, D) embeddings."""
        captions = check_captions(captions, clip.tokenize)
        states, mask, embed = clip.text_states(captions, with_embedding=True)
        return text_condition(states, mask, embed), embed

    @torch.no_grad()
    def sample(self, clip, captions, seed=0, **options):
        self.check_clip(clip)
        text, text_embed = self.encode_text(clip, captions)
        device = self.clip_id.device
        return self.embed(text.to(device), text_embed.to(device), seed=seed, **options).float().cpu()

    def embed(self, text, text_embed, seed=0, **options):
        raise NotImplementedError


def keep_best(candidates, text_embed):
    """The paper's best-of-N: candidates (N, B, D) unit embeddings -> (B, D), for each caption the candidate with
    the largest dot product with its text embedding (B, D)."""
    if candidates.ndim != 3 or candidates.shape[1:] != text_embed.shape:
        raise ValueError(f"keep_best expects candidates (N, B, D) and text_embed (B, D), got "
                         f"{tuple(candidates.shape)} and {tuple(text_embed.shape)}")
    scores = (candidates * text_embed[None]).sum(-1)                       # (N, B): <z_i, t>
    return candidates[scores.argmax(0), torch.arange(candidates.shape[1])]


def _check_best_of(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of must be an int >= 1 (the number of candidates per caption), got {n!r}")


# ----------------------------------------------------------------------------- the diffusion prior

class TextPrefix(nn.Module):
    """The start of both priors' sequences: the caption's token states and its pooled embedding, projected to the
    transformer's width, with positions; a dropped text (CFG's NaN null) becomes learned null tokens."""

    def __init__(self, embed_dim, text_width, context_length, width):
        super().__init__()
        self.embed_dim, self.text_width, self.context_length = embed_dim, text_width, context_length
        self.tokens_in, self.pooled_in = nn.Linear(text_width, width), nn.Linear(embed_dim, width)
        self.position = nn.Parameter(torch.randn(context_length + 1, width) * 0.02)
        self.null_tokens = nn.Parameter(torch.randn(context_length, text_width) * 0.02)
        self.null_pooled = nn.Parameter(torch.randn(embed_dim) * 0.02)

    def forward(self, text):
        """text_condition(...) (B, L + 1, P) -> (tokens (B, L + 1, width), key mask (B, 1, 1, L + 1))."""
        states, mask, pooled, dropped = split_text(text, self.text_width, self.embed_dim)
        L = states.shape[1]
        if L > self.context_length:
            raise ValueError(f"the text has {L} token positions; this prior reads at most {self.context_length}")
        states = torch.where(dropped[:, None, None], self.null_tokens[:L].to(states.dtype), states)
        pooled = torch.where(dropped[:, None], self.null_pooled.to(pooled.dtype), pooled)
        mask = mask | dropped[:, None]
        # the pooled embedding is unit length (coordinates ~ 1/sqrt(D)): scaled to unit variance like the states
        tokens = torch.cat([self.tokens_in(states), self.pooled_in(pooled * math.sqrt(self.embed_dim))[:, None]], 1)
        keys = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        return tokens + self.position[:L + 1], keys[:, None, None]


def extend_keys(keys, n):
    """A key mask (B, 1, 1, P) with n more positions that every query may see."""
    return torch.cat([keys, keys.new_ones(*keys.shape[:-1], n)], -1)


class DiffusionPriorNet(nn.Module):
    """net(z_t, t, text) -> z_0: a causal transformer over [text tokens (L), pooled text embedding, timestep,
    z_t, query]; the output at the query (it sees everything before it) is projected to the clean embedding.
    The text comes before t and z_t, so causal attention never lets it see them: while sampling, its keys and
    values are computed once per caption batch and reused at every step (a prefix cache)."""

    def __init__(self, embed_dim=64, text_width=128, context_length=24, width=128, layers=4, heads=4,
                 num_timesteps=1000):
        super().__init__()
        self.config = dict(embed_dim=embed_dim, text_width=text_width, context_length=context_length, width=width,
                           layers=layers, heads=heads, num_timesteps=num_timesteps)
        self.embed_dim, self.width = embed_dim, width
        self.text = TextPrefix(embed_dim, text_width, context_length, width)
        self.time_in = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.z_in = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.step_position = nn.Parameter(torch.randn(3, width) * 0.02)    # timestep, z_t, query
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))
        self._cache = None

    def train(self, mode=True):
        self._cache = None    # the cache lives for one sampling call (DiffusionModel.generate calls eval())
        return super().train(mode)

    def _prefix_kv(self, text):
        """The blocks' keys and values over the text; reused while sampling, as long as the same text comes back to
        the same weights (a parameter's version counts its in-place changes: optimizer steps, load_state_dict)."""
        key = (text.shape, text.device, torch.is_autocast_enabled(text.device.type),
               tuple(p._version for p in self.parameters()))
        caching = not self.training and not torch.is_grad_enabled()
        if caching and self._cache is not None and self._cache[0] == key and \
                torch.equal(self._cache[1].isnan(), text.isnan()) and \
                torch.equal(self._cache[1].nan_to_num(0.0), text.nan_to_num(0.0)):
            return self._cache[2:]
        h, keys = self.text(text)
        kv = []
        for block in self.blocks:
            h, layer_kv = block(h, keys, return_kv=True)
            kv.append(layer_kv)
        if caching:
            self._cache = (key, text.clone(), kv, keys)
        return kv, keys

    def forward(self, z_t, t, text):
        if z_t.ndim != 2 or z_t.shape[1] != self.embed_dim:
            raise ValueError(f"the prior denoises embeddings (B, {self.embed_dim}), got {tuple(z_t.shape)}")
        kv, keys = self._prefix_kv(text)
        h = torch.stack([self.time_in(timestep_embedding(t, self.width)), self.z_in(z_t),
                         self.query.expand(len(z_t), -1).to(z_t.dtype)], 1) + self.step_position
        keys = extend_keys(keys, 3)
        for block, past in zip(self.blocks, kv):
            h = block(h, keys, past=past)
        return self.out(h[:, -1]).to(z_t.dtype)


class DiffusionPrior(Prior):
    """The diffusion prior: DiffusionModel(DiffusionPriorNet, (D,), cosine schedule, x0-prediction (the paper's;
    prediction="eps" for the comparison), the text dropped P_DROP_TEXT of the time), over EmbeddingNorm-ed image
    embeddings."""

    def __init__(self, embed_dim=64, text_width=128, context_length=24, width=128, layers=4, heads=4,
                 normalization="standardize", schedule="cosine", T=1000, p_drop_text=P_DROP_TEXT, prediction="x0"):
        super().__init__(embed_dim, text_width, normalization)
        self.config = dict(embed_dim=embed_dim, text_width=text_width, context_length=context_length, width=width,
                           layers=layers, heads=heads, normalization=normalization, schedule=schedule, T=T,
                           p_drop_text=p_drop_text)
        if prediction != "x0":   # recorded only off the paper's x0, so that the x0 checkpoints keep their fingerprints
            self.config["prediction"] = prediction
        net = DiffusionPriorNet(embed_dim, text_width, context_length, width, layers, heads, T)
        self.diffusion = DiffusionModel(net, (embed_dim,), schedule, T, prediction=prediction,
                                        conditions={"text": p_drop_text}, data_key="z")

    def embed(self, text, text_embed, seed=0, best_of=BEST_OF, guidance=1.0, steps=SAMPLE_STEPS, eta=0.0):
        """best_of candidates per caption (DDIM with `steps` steps and `eta`, CFG scale `guidance` that nulls only
        the text), decoded to unit length; the one closest to the text embedding is kept."""
        _check_best_of(best_of)
        B = len(text)
        z = self.diffusion.generate(best_of * B, cond={"text": text.repeat(best_of, 1, 1)},
                                    guidance=None if guidance == 1 else guidance, steps=steps, eta=eta, seed=seed,
                                    batch_size=best_of * B)
        candidates = self.norm.decode(z).view(best_of, B, -1)
        return keep_best(candidates, F.normalize(text_embed.float(), dim=-1))


def prior_loss(model, batch):
    """MSE between the network's z_0 and the clean (normalised) image embedding, at a random t (diffusion_loss)."""
    return model.diffusion.loss({"z": model.norm.encode(batch["image_embed"]), "text": batch["text"]})


# ----------------------------------------------------------------------------- the autoregressive prior

class PCAQuantizer(nn.Module):
    """z (B, D) -> codes (B, k): PCA onto the k leading components, then each coordinate into `bins` buckets cut at
    its training quantiles; decode() maps each code to its bucket's mean and back through the PCA."""

    def __init__(self, dim, k, bins):
        super().__init__()
        if not 1 <= k <= dim or bins < 2:
            raise ValueError(f"PCAQuantizer needs 1 <= k <= dim ({dim}) and bins >= 2, got k={k}, bins={bins}")
        self.k, self.bins = k, bins
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.eye(dim)[:k])        # (k, D), rows in decreasing variance
        self.register_buffer("edges", torch.zeros(k, bins - 1))         # inner bucket edges per coordinate
        self.register_buffer("centers", torch.zeros(k, bins))           # mean training value per bucket

    @staticmethod
    def explained(embeddings):
        """(variance share of every component, in decreasing order; the components (D, D))."""
        centered = embeddings.double() - embeddings.double().mean(0)
        _, s, vh = torch.linalg.svd(centered, full_matrices=False)
        var = s ** 2
        return (var / var.sum()).float(), vh.float()

    @staticmethod
    def smallest_k(embeddings, max_error=0.01):
        """The fewest components whose reconstruction leaves < max_error of the variance (relative error)."""
        share, _ = PCAQuantizer.explained(embeddings)
        residual = 1 - share.cumsum(0)
        return int((residual < max_error).nonzero()[0]) + 1

    @torch.no_grad()
    def fit(self, embeddings):
        expect_latents(embeddings, len(self.mean), "PCAQuantizer.fit", "embeddings")
        self.mean.copy_(embeddings.mean(0))
        _, vh = self.explained(embeddings)
        self.components.copy_(vh[:self.k])
        coords = (embeddings - self.mean) @ self.components.T                       # (N, k)
        q = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64)[1:-1]
        self.edges.copy_(torch.quantile(coords.double(), q, dim=0).T.float())
        codes = self._bucketize(coords)
        for j in range(self.k):
            sums = torch.zeros(self.bins).index_add_(0, codes[:, j], coords[:, j])
            counts = torch.bincount(codes[:, j], minlength=self.bins).clamp(min=1)
            self.centers[j] = sums / counts
        return self

    def _bucketize(self, coords):
        return torch.stack([torch.bucketize(coords[:, j].contiguous(), self.edges[j]) for j in range(self.k)], 1)

    def encode(self, z):
        expect_latents(z, len(self.mean), "PCAQuantizer.encode", "embeddings")
        return self._bucketize((z - self.mean) @ self.components.T)

    def decode(self, codes):
        if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.shape[1] != self.k or codes.is_floating_point():
            got = f"{tuple(codes.shape)} {codes.dtype}" if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"PCAQuantizer.decode expects integer codes (B, {self.k}), got {got}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.bins):
            raise ValueError(f"PCAQuantizer.decode: codes must lie in [0, {self.bins}), got {int(codes.min())}..{int(codes.max())}")
        coords = self.centers.gather(1, codes.T).T                                   # (B, k)
        return coords @ self.components + self.mean


class ARPrior(Prior):
    """The autoregressive prior: codes = PCAQuantizer(z); a causal transformer over [text tokens (L), pooled text
    embedding, code_1, ..., code_k] predicts code_{i+1} at the position of code_i (code_1 at the pooled embedding's)."""

    def __init__(self, embed_dim=64, text_width=128, context_length=24, k=32, bins=128, width=128, layers=4,
                 heads=4, p_drop_text=P_DROP_TEXT):
        super().__init__(embed_dim, text_width, "unit")
        self.config = dict(embed_dim=embed_dim, text_width=text_width, context_length=context_length, k=k, bins=bins,
                           width=width, layers=layers, heads=heads, p_drop_text=p_drop_text)
        self.k, self.bins, self.p_drop_text = k, bins, p_drop_text
        self.quantizer = PCAQuantizer(embed_dim, k, bins)
        self.text = TextPrefix(embed_dim, text_width, context_length, width)
        self.code_in = nn.Embedding(bins, width)
        self.code_position = nn.Parameter(torch.randn(k, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, bins))

    def logits(self, text, codes):
        """Next-code logits (B, k, bins) for teacher-forced codes (B, k): position i predicts code i."""
        h, keys = self.text(text)
        L = h.shape[1]
        h = torch.cat([h, self.code_in(codes[:, :-1]) + self.code_position[:self.k - 1]], 1)
        keys = extend_keys(keys, self.k - 1)
        for block in self.blocks:
            h = block(h, keys)
        return self.head(h[:, L - 1:])

    def embed(self, text, text_embed, seed=0, best_of=BEST_OF, guidance=1.0, temperature=1.0):
        """Sample the k codes one by one (a key-value cache over the prefix), de-quantise, invert the PCA."""
        _check_best_of(best_of)
        check_scale(guidance, "guidance scale")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        B = len(text)
        text = text.repeat(best_of, 1, 1)
        guided = guidance != 1
        if guided:   # one batch: conditional rows, then the same rows with the text nulled
            text = torch.cat([text, torch.full_like(text, float("nan"))])
        g = torch.Generator().manual_seed(data.check_seed(seed))
        h, keys = self.text(text)
        past = [None] * len(self.blocks)
        codes = []
        for i in range(self.k):
            kv_new = []
            for j, block in enumerate(self.blocks):
                h, kv = block(h, keys, past=past[j], return_kv=True)
                kv_new.append(kv)
            past = kv_new
            logits = self.head(h[:, -1]).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            probs = F.softmax(logits / temperature, -1)
            code = torch.multinomial(probs.cpu(), 1, generator=g).to(probs.device)[:, 0]
            codes.append(code)
            keys = extend_keys(keys, 1)
            nxt = self.code_in(code) + self.code_position[i] if i + 1 < self.k else None
            h = (torch.cat([nxt, nxt]) if guided else nxt)[:, None] if nxt is not None else None
        z = F.normalize(self.quantizer.decode(torch.stack(codes, 1)), dim=-1)
        return keep_best(z.view(best_of, B, -1), F.normalize(text_embed.float(), dim=-1))


def ar_prior_loss(model, batch):
    """Cross-entropy of the k codes of the image embedding given the text (dropped P_DROP_TEXT of the time)."""
    codes = model.quantizer.encode(batch["image_embed"])
    text = drop_condition(batch["text"], model.p_drop_text) if model.training else batch["text"]
    logits = model.logits(text, codes)
    loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
    return loss, {"code_accuracy": (logits.argmax(-1) == codes).float().mean().detach()}


# ----------------------------------------------------------------------------- baselines

class RegressionPrior(Prior):
    """A deterministic MLP: pooled text embedding -> image embedding (MSE in the normalised space). It predicts the
    conditional mean: no diversity at all, which is why unCLIP's prior is generative."""

    def __init__(self, embed_dim=64, text_width=128, hidden=512, layers=3):
        super().__init__(embed_dim, text_width, "standardize")
        self.config = dict(embed_dim=embed_dim, text_width=text_width, hidden=hidden, layers=layers)
        dims = [embed_dim] + [hidden] * (layers - 1)
        self.net = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.SiLU())],
                                 nn.Linear(dims[-1], embed_dim))

    def embed(self, text, text_embed, seed=0, **options):
        return self.norm.decode(self.net(text_embed.float() * math.sqrt(self.embed_dim)))


def regression_loss(model, batch):
    return F.mse_loss(model.net(batch["text_embed"] * math.sqrt(model.embed_dim)),
                      model.norm.encode(batch["image_embed"]))


class TextPrior(Prior):
    """"No prior": the caption's own text embedding, used as if it were an image embedding."""

    def __init__(self, embed_dim=64, text_width=128):
        super().__init__(embed_dim, text_width, "unit")
        self.config = dict(embed_dim=embed_dim, text_width=text_width)

    def embed(self, text, text_embed, seed=0, **options):
        return F.normalize(text_embed.float(), dim=-1)


class RenderPrior(Prior):
    """The ceiling: the CLIP image embedding of a real render of the caption (data.scenes_from_prompts)."""

    def __init__(self, embed_dim=64, text_width=128):
        super().__init__(embed_dim, text_width, "unit")
        self.config = dict(embed_dim=embed_dim, text_width=text_width)

    @torch.no_grad()
    def sample(self, clip, captions, seed=0, **options):
        self.check_clip(clip)
        captions = check_captions(captions, clip.tokenize)
        images = data.render(data.scenes_from_prompts(captions, seed))
        return torch.cat([clip.encode_image(images[i:i + 500]).cpu() for i in range(0, len(images), 500)])


# ----------------------------------------------------------------------------- training data

class EmbeddingDataset:
    """Shapes scenes through a frozen CLIP, once: per scene the text (its token states, mask and pooled embedding)
    and the image embedding (keep_images=True: and the image, uint8). get_batch(indices) -> {"text":
    text_condition(...), "text_embed", "image_embed", "objects"[, "image"]} for train.train."""

    @torch.no_grad()
    def __init__(self, clip, scenes, batch_size=500, keep_images=False):
        was_training = clip.training
        clip.eval()
        device = clip.device
        states, masks, texts, images, pixels = [], [], [], [], []
        for i in range(0, len(scenes), batch_size):
            captions = scenes.captions[i:i + batch_size]
            s, m, e = clip.text_states(captions, with_embedding=True)
            states.append(s.half().cpu())
            masks.append(m.cpu())
            texts.append(e.cpu())
            part = data.Scenes(scenes.objects[i:i + batch_size], scenes.offsets[i:i + batch_size], captions)
            rendered = data.render(part)
            images.append(clip.encode_image(rendered.to(device)).cpu())
            if keep_images:
                pixels.append(data.to_uint8(rendered))
        clip.train(was_training)
        self.states, self.masks = torch.cat(states), torch.cat(masks)
        self.text_embed, self.image_embed = torch.cat(texts), torch.cat(images)
        self.objects, self.captions = scenes.objects, scenes.captions
        self.images = torch.cat(pixels) if keep_images else None

    def __len__(self):
        return len(self.image_embed)

    def get_batch(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return {"text": text_condition(self.states[indices], self.masks[indices], self.text_embed[indices]),
                "text_embed": self.text_embed[indices], "image_embed": self.image_embed[indices],
                "objects": self.objects[indices],
                **({"image": self.images[indices].float() / 127.5 - 1} if self.images is not None else {})}
