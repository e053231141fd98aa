"""Checks of chapter 12 (the unCLIP prior): the diffusion prior's attention mask, the AR prior's PCA quantizer,
and best-of-N (the paper's reranking of sampled image embeddings by their dot product with the text embedding)."""

import torch
import torch.nn.functional as F

from ... import prior
from .core import CheckFailed, call, expect_close, expect_shape, passed

# ----------------------------------------------------------------------------- the diffusion prior's mask

_EXTRA = ("pooled", "t", "z_t", "query")    # what follows the L text tokens in the diffusion prior's sequence


def _position(i, L):
    return f"text token {i}" if i < L else _EXTRA[i - L]


def _text_mask(lengths, L):
    return torch.arange(L)[None] < torch.tensor(lengths)[:, None]


def _reference_mask(text_mask):
    B, L = text_mask.shape
    keys = torch.cat([text_mask, text_mask.new_ones(B, len(_EXTRA))], 1)              # (B, L + 4)
    return torch.ones(L + 4, L + 4, dtype=torch.bool).tril()[None] & keys[:, None, :]   # query i, key j


def prior_sequence_mask(fn):
    """fn(text_mask (B, L) bool) -> (B, L + 4, L + 4) bool: mask[b, i, j] = query i may attend to key j =
    j <= i (causal) and key j is not padding; the sequence is [text tokens (L), pooled, t, z_t, query]."""
    name = "prior_sequence_mask"
    for lengths, L in (([6, 4, 2], 6), ([3, 3], 3), ([5, 1, 2, 5], 7)):
        text_mask = _text_mask(lengths, L)
        B = len(lengths)
        what = f"{name}(text_mask) for {B} captions of {lengths} real tokens out of L = {L}"
        out = call(fn, text_mask.clone(), name=name)
        if not isinstance(out, torch.Tensor):
            raise CheckFailed(f"{what}: expected a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) == (L + 4, L + 4):
            raise CheckFailed(f"{what}: got one ({L + 4}, {L + 4}) mask; each caption has its own padding, so return "
                              f"one mask per caption, shape ({B}, {L + 4}, {L + 4})")
        if out.ndim == 4 and out.shape[1] == 1 and tuple(out.shape[2:]) == (L + 4, L + 4):
            raise CheckFailed(f"{what}: got shape {tuple(out.shape)}; return (B, L + 4, L + 4) without the head axis "
                              "(the attention adds it itself)")
        if out.ndim == 3 and out.shape[0] == B and out.shape[1] == out.shape[2] and out.shape[1] != L + 4:
            raise CheckFailed(f"{what}: got {out.shape[1]} positions, expected L + 4 = {L + 4}: the sequence is the "
                              "L text tokens, then the pooled text embedding, the timestep, z_t and the query")
        expect_shape(out, (B, L + 4, L + 4), what)
        if out.dtype != torch.bool:
            raise CheckFailed(f"{what}: expected a bool tensor (True = may attend, as F.scaled_dot_product_attention "
                              f"reads a boolean attn_mask), got dtype {out.dtype}")
        if not torch.equal(text_mask, _text_mask(lengths, L)):
            raise CheckFailed(f"{name}: do not modify text_mask in place")
        ref = _reference_mask(text_mask)
        if torch.equal(out, ref):
            continue
        keys = torch.cat([text_mask, text_mask.new_ones(B, 4)], 1)
        tril = torch.ones(L + 4, L + 4, dtype=torch.bool).tril()[None].expand(B, -1, -1)
        padded = not text_mask.all()
        mistakes = [
            (~ref, "True and False are swapped: True means 'may attend' (the convention of the boolean attn_mask "
                   "of F.scaled_dot_product_attention and of layers.TransformerBlock)"),
            (ref.transpose(1, 2), "the mask is transposed: rows are queries and columns are keys, mask[b, i, j] "
                                  "says whether position i may read position j, so it is lower-triangular"),
            (tril & keys[:, :, None], "padding masks the rows (queries) instead of the columns (keys): no position "
                                      "may READ a padding token"),
            (ref & keys[:, :, None], "you also masked the padding rows: a padding query then sees no key at all, "
                                     "and its softmax is NaN; mask only the columns (its output is never read)"),
            (torch.ones(L + 4, L + 4, dtype=torch.bool).tril(-1)[None] & keys[:, None, :],
             "a position must see itself: use the diagonal too (torch.tril with diagonal=0)"),
            (torch.ones(L + 4, L + 4, dtype=torch.bool).tril(1)[None] & keys[:, None, :],
             "off by one: position i may read keys j <= i, not j <= i + 1 (torch.tril with diagonal=0)"),
            (keys[:, None, :].expand(B, L + 4, L + 4), "causality is missing: position i may only read positions j <= i "
                                                 "(torch.tril), so the text never sees t, z_t or the query"),
            (torch.cat([text_mask.new_ones(B, 4), text_mask], 1)[:, None, :] & tril,
             "the padding columns are in the wrong place: the text comes FIRST (columns 0..L-1), then the pooled "
             "embedding, t, z_t and the query (never padding)"),
        ]
        if padded:
            mistakes.append((tril, "the padding is not masked: no query may attend to a key where text_mask is "
                                   "False (AND the causal mask with the key mask, broadcast over the rows)"))
        for wrong, hint in mistakes:
            if torch.equal(out, wrong):
                raise CheckFailed(f"{what}: {hint}")
        bad = (out != ref).nonzero()
        b, i, j = bad[0].tolist()
        raise CheckFailed(f"{what}: {len(bad)} of {out.numel()} entries are wrong; the first is caption {b}, query "
                          f"{i} ({_position(i, L)}) and key {j} ({_position(j, L)}). mask[b, i, j] = (j <= i) and "
                          "key j is a real token or one of the four after the text")
    passed(name, "causal, padding keys masked, one (L + 4) x (L + 4) mask per caption, for three batches")


# ----------------------------------------------------------------------------- the AR prior's quantizer

def _fitted_quantizer(dim, k, bins, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, dim)                               # a few directions carry most variance
    z = F.normalize(torch.randn(3000, dim, generator=g) * scales + 0.7 * torch.randn(dim, generator=g), dim=-1)
    return prior.PCAQuantizer(dim, k, bins).fit(z), z


def pca_round_trip(quantize, dequantize):
    """quantize(z, mean, components, edges) -> codes (B, k) long; dequantize(codes, mean, components, centers) ->
    (B, D): the two halves of prior.PCAQuantizer (encode, decode)."""
    for dim, k, bins, seed in ((12, 5, 8, 0), (6, 6, 3, 1)):
        q, points = _fitted_quantizer(dim, k, bins, seed)
        g = torch.Generator().manual_seed(seed + 10)
        z = torch.cat([points[:40], F.normalize(torch.randn(8, dim, generator=g), dim=-1)])   # seen and fresh points
        B = len(z)
        mean, comps, edges, centers = (t.clone() for t in (q.mean, q.components, q.edges, q.centers))
        name = "pca_quantize"
        what = f"{name}(z ({B}, {dim}), mean, components ({k}, {dim}), edges ({k}, {bins - 1}))"
        z_in = z.clone()
        codes = call(quantize, z_in, mean, comps, edges, name=name)
        if not torch.equal(z_in, z) or not torch.equal(mean, q.mean) or not torch.equal(comps, q.components):
            raise CheckFailed(f"{name}: do not modify its inputs in place (z - mean makes a new tensor; z -= mean does not)")
        if isinstance(codes, torch.Tensor) and tuple(codes.shape) == (k, B) and k != B:
            raise CheckFailed(f"{what}: got shape {tuple(codes.shape)}: one row of k codes per embedding, (B, k)")
        if isinstance(codes, torch.Tensor) and tuple(codes.shape) == (B, dim) and k != dim:
            raise CheckFailed(f"{what}: got {dim} codes per embedding; keep only the k = {k} leading components "
                              "(components is (k, D): coords = (z - mean) @ components.T)")
        expect_shape(codes, (B, k), what)
        if codes.is_floating_point():
            raise CheckFailed(f"{what}: codes are bucket indices (integers, e.g. from torch.bucketize), got {codes.dtype}")
        want = q.encode(z)
        if not torch.equal(codes.long(), want):
            nomean = torch.stack([torch.bucketize((z @ q.components.T)[:, j].contiguous(), q.edges[j])
                                  for j in range(k)], 1)
            if torch.equal(codes.long(), nomean):
                raise CheckFailed(f"{what}: subtract the mean before projecting: coords = (z - mean) @ components.T")
            if torch.equal(codes.long(), want + 1) or torch.equal(codes.long(), want - 1):
                raise CheckFailed(f"{what}: off by one: a coordinate below the first edge is bucket 0, above the "
                                  "last is bucket bins - 1 (torch.bucketize(coords[:, j], edges[j]))")
            if codes.min() < 0 or codes.max() > bins - 1:
                raise CheckFailed(f"{what}: codes must lie in 0..{bins - 1} (bins - 1 inner edges cut {bins} buckets); "
                                  f"got {int(codes.min())}..{int(codes.max())}")
            bad = (codes.long() != want).nonzero()
            raise CheckFailed(f"{what}: {len(bad)} of {want.numel()} codes are wrong (first: embedding "
                              f"{bad[0, 0].item()}, component {bad[0, 1].item()}). Project: coords = (z - mean) @ "
                              "components.T; then code[:, j] = the bucket of coords[:, j] among edges[j]")

        name = "pca_dequantize"
        what = f"{name}(codes ({B}, {k}), mean, components ({k}, {dim}), centers ({k}, {bins}))"
        z_hat = call(dequantize, want.clone(), mean, comps, centers, name=name)
        expect_shape(z_hat, (B, dim), what)
        ref = q.decode(want)
        if isinstance(z_hat, torch.Tensor) and z_hat.shape == ref.shape and not torch.allclose(z_hat, ref, atol=1e-5):
            for wrong, hint in [
                (ref - q.mean, "add the mean back: z_hat = coords @ components + mean"),
                (F.normalize(ref, dim=-1), "do not normalise here: dequantize returns the PCA reconstruction "
                                           "(the AR prior maps it to unit length afterwards)"),
                (q.edges.gather(1, want.clamp(max=bins - 2).T).T @ q.components + q.mean,
                 "use the bucket CENTERS (the mean training value in each bucket), not its edges"),
            ]:
                if torch.allclose(z_hat.float(), wrong, atol=1e-5):
                    raise CheckFailed(f"{what}: {hint}")
        expect_close(z_hat, ref, what, atol=1e-5, hint="coords[:, j] = centers[j, codes[:, j]]; z_hat = coords @ "
                                                       "components + mean")
        back = call(dequantize, call(quantize, z, mean, comps, edges, name="pca_quantize"), mean, comps, centers,
                    name=name)
        expect_close(back, q.decode(q.encode(z)), f"the round trip dequantize(quantize(z)) with k={k}, bins={bins}",
                     atol=1e-5)
    kept = 1 - ((back - z).pow(2).sum() / (z - z.mean(0)).pow(2).sum()).item()
    passed("pca_quantize / pca_dequantize", f"codes and reconstructions match prior.PCAQuantizer (two sizes); with "
           f"k = D = {dim} and {bins} buckets the round trip keeps {kept:.1%} of the variance (the rest is rounding)")


# ----------------------------------------------------------------------------- best-of-N

def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def best_of_n(fn):
    """fn(candidates (N, B, D), text_embed (B, D)) -> (B, D): for each caption b, the candidate n with the largest dot
    product <candidates[n, b], text_embed[b]> (prior.keep_best)."""
    name = "best_of_n"
    g = torch.Generator().manual_seed(3)
    norms = torch.rand(3, 5, 1, generator=g) * 1.5 + 0.5
    cases = [("4 unit candidates for each of 4 captions", _unit(4, 4, 8, seed=0), _unit(4, 8, seed=1)),
             ("3 unit candidates for each of 5 captions", _unit(3, 5, 8, seed=2), _unit(5, 8, seed=3)),
             ("1 candidate for each of 2 captions", _unit(1, 2, 8, seed=4), _unit(2, 8, seed=5)),
             ("3 candidates of lengths 0.5-2 for each of 5 captions", None, None)]
    # the last case: candidates whose lengths change the winner (dot product vs cosine pick differently)
    for s in range(6, 200):
        c, t = _unit(3, 5, 8, seed=s) * norms, _unit(5, 8, seed=s + 1000)
        if not torch.equal(prior.keep_best(c, t), prior.keep_best(F.normalize(c, dim=-1), t)):
            cases[-1] = (cases[-1][0], c, t)
            break
    for what, cand, text in [c for c in cases if c[1] is not None]:
        N, B, D = cand.shape
        label = f"{name}(candidates ({N}, {B}, {D}), text_embed ({B}, {D})), {what}"
        out = call(fn, cand.clone(), text.clone(), name=name)
        if isinstance(out, torch.Tensor) and not out.is_floating_point() and out.ndim == 1:
            raise CheckFailed(f"{label}: return the chosen embeddings ({B}, {D}), not their indices: "
                              "candidates[best, torch.arange(B)]")
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (B, B, D):
            raise CheckFailed(f"{label}: got shape {tuple(out.shape)}: candidates[best] picks whole candidate SETS; "
                              "index both axes, candidates[best, torch.arange(B)]")
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (1, B, D):
            raise CheckFailed(f"{label}: got shape (1, {B}, {D}); return ({B}, {D}), one embedding per caption")
        expect_shape(out, (B, D), label)
        want = prior.keep_best(cand, text)
        if torch.allclose(out.float(), want, atol=1e-6):
            continue
        scores = (cand * text[None]).sum(-1)                          # (N, B)
        cols = torch.arange(B)
        mistakes = [(cand[scores.argmin(0), cols], "you kept the candidate FARTHEST from the text (argmin); keep the "
                                                    "largest dot product (argmax)"),
                    (cand[scores.sum(1).argmax()], "you kept one candidate index for all captions; choose for each "
                                                    "caption separately: argmax over the N axis, one per column b"),
                    (prior.keep_best(F.normalize(cand, dim=-1), text),
                     "you scored by cosine (or renormalised the candidates); best-of-N keeps the largest plain dot "
                     "product <z, t> (the paper's rule and prior.keep_best): the candidates are unit vectors, so "
                     "do not renormalise them"),
                    (F.normalize(want, dim=-1), "return the chosen candidate as it is, not renormalised")]
        if N == B:
            mistakes.insert(0, (cand[scores.argmax(1), cols], "argmax over the wrong axis: scores is (N, B), one column "
                                                               "per caption; take argmax over the candidates (dim 0)"))
        for wrong, hint in mistakes:
            if wrong.shape == out.shape and torch.allclose(out.float(), wrong, atol=1e-6) and \
                    not torch.allclose(wrong, want, atol=1e-6):
                raise CheckFailed(f"{label}: {hint}")
        picked = [next((n for n in range(N) if torch.allclose(out[b].float(), cand[n, b], atol=1e-6)), None)
                  for b in range(B)]
        if None in picked:
            raise CheckFailed(f"{label}: row {picked.index(None)} of your answer is none of that caption's "
                              "candidates; return candidates[n_b, b] for each caption b")
        wrong_rows = [b for b in range(B) if not torch.allclose(out[b].float(), want[b], atol=1e-6)]
        raise CheckFailed(f"{label}: {len(wrong_rows)} of {B} captions keep another candidate than the one with the "
                          f"largest dot product with the text embedding (first: caption {wrong_rows[0]})")
    passed(name, "keeps, per caption, the candidate with the largest dot product with its text embedding "
                 "(square and non-square batches, N = 1, unnormalised candidates)")


def best_of_n_on_the_prior(fn, candidates, text_embed, score):
    """The student's best_of_n put to work on candidates (N, B, D) sampled from the trained prior: its picks must be
    prior.keep_best's, and score(embeddings) -> a number (e.g. kNN caption accuracy) is reported for both."""
    name = "best_of_n on the trained prior"
    N, B, D = candidates.shape
    out = call(fn, candidates.clone(), text_embed.clone(), name="best_of_n")
    expect_shape(out, (B, D), f"best_of_n(candidates ({N}, {B}, {D}), text_embed ({B}, {D}))")
    want = prior.keep_best(candidates, text_embed)
    differ = int((~torch.isclose(out.float(), want, atol=1e-6).all(1)).sum())
    if differ:
        raise CheckFailed(f"{name}: on {differ} of {B} captions your best_of_n keeps another candidate than "
                          "prior.keep_best; make the check of the exercise above pass first")
    mine, library, one = float(score(out)), float(score(want)), float(score(candidates[0]))
    passed(name, f"{B} test captions x {N} sampled candidates: kNN caption accuracy {mine:.3f} with your "
                 f"best_of_n, {library:.3f} with prior.keep_best, {one:.3f} with the first candidate alone")
