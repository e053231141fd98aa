"""Chapter 12 (unCLIP's prior): the text as one tensor, the diffusion prior's causal network and its prefix cache,
classifier-free guidance that nulls only the text, the embedding normalisation and the PCA quantiser, the
autoregressive prior's decode against teacher forcing, checkpoints, a tiny overfit, and the smoke recipe.
Everything runs on a tiny random CLIP, in one thread, in seconds on a CPU (the two recipe tests train the smoke CLIP
and a smoke prior each: a few seconds)."""
import math

import pytest
import torch
import torch.nn.functional as F

from minidalle2 import clip as clip_module
from minidalle2 import data, diffusion, prior, recipes
from minidalle2.lab import zoo
from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.layers import timestep_embedding

D, W = 32, 32          # the tiny CLIP's embedding size and text width (the tiny_clip fixture of tests/conftest.py)
CAPTIONS = ["a big red circle", "a small blue square at the top left", "a green triangle above a yellow cross"]


def close(a, b, atol=1e-6, rtol=0.0):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def text(tiny_clip):
    """(text_condition of CAPTIONS, the token states, the mask, the pooled embeddings)."""
    with torch.no_grad():
        states, mask, embed = tiny_clip.text_states(CAPTIONS, with_embedding=True)
    return prior.text_condition(states, mask, embed), states, mask, embed


@pytest.fixture(scope="module")
def pairs(tiny_clip):
    """16 (caption, image embedding) pairs of train scenes through the tiny CLIP."""
    return prior.EmbeddingDataset(tiny_clip, data.sample_scenes(16, "train", seed=0))


def diffusion_prior(seed=0, **changes):
    torch.manual_seed(seed)
    return prior.DiffusionPrior(**{**dict(embed_dim=D, text_width=W, width=32, layers=2), **changes})


def ar_prior(seed=0, **changes):
    torch.manual_seed(seed)
    return prior.ARPrior(**{**dict(embed_dim=D, text_width=W, k=8, bins=16, width=32, layers=2), **changes})


def fit_batch(model, loss_fn, batch, steps, lr=3e-3):
    """Adam on one fixed batch for `steps` steps (seeded: the loss's random t and dropout are the same every run)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(0)
    for _ in range(steps):
        loss, _ = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def unit_cluster(n, dim=D, seed=0):
    """n unit vectors around one direction, as CLIP embeddings are (not spread over the whole sphere)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g) + 2 * torch.randn(dim, generator=torch.Generator().manual_seed(99)),
                       dim=-1)


def noisy_inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, 1000, (n,), generator=g)


# ----------------------------------------------------------------------------- 1. the text, shapes, masks

def test_text_condition_round_trips_through_split_text(text):
    cond, states, mask, embed = text
    B, L = mask.shape
    assert cond.shape == (B, L + 1, max(W, D))
    assert mask[:, 0].all() and not mask.all(), "captions of different lengths: the test needs some padding"
    assert cond[:, :L][~mask].isnan().all() and not cond[:, :L][mask].isnan().any(), "padding -> NaN, tokens kept"
    assert not cond[:, L].isnan().any()
    got_states, got_mask, got_embed, dropped = prior.split_text(cond, W, D)
    assert torch.equal(got_mask, mask) and torch.equal(got_embed, embed) and not dropped.any()
    assert torch.equal(got_states[mask], states[mask]) and (got_states[~mask] == 0).all()
    # a fully-NaN row (CFG's null) is a dropped text; the others are untouched
    nulled = cond.clone()
    nulled[1] = float("nan")
    _, mask2, embed2, dropped = prior.split_text(nulled, W, D)
    assert dropped.tolist() == [False, True, False]
    assert torch.equal(mask2[[0, 2]], mask[[0, 2]]) and torch.equal(embed2[[0, 2]], embed[[0, 2]])
    assert prior.split_text(diffusion.null_condition(cond), W, D)[3].all()


def test_text_condition_pads_the_narrower_part():
    """Token width 24 and embedding size 40: one tensor of width 40, each part recovered at its own width."""
    g = torch.Generator().manual_seed(0)
    states, embed = torch.randn(2, 5, 24, generator=g), torch.randn(2, 40, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    cond = prior.text_condition(states, mask, embed)
    assert cond.shape == (2, 6, 40)
    assert (cond[0, :5, 24:] == 0).all(), "token states are zero-padded to the common width"
    got_states, got_mask, got_embed, dropped = prior.split_text(cond, 24, 40)
    assert torch.equal(got_mask, mask) and torch.equal(got_embed, embed) and not dropped.any()
    assert torch.equal(got_states[mask], states[mask])


def test_text_prefix_shapes_and_key_mask(text):
    cond, _, mask, _ = text
    B, L = mask.shape
    torch.manual_seed(0)
    prefix = prior.TextPrefix(D, W, context_length=L, width=48)
    tokens, keys = prefix(cond)
    assert tokens.shape == (B, L + 1, 48) and keys.shape == (B, 1, 1, L + 1) and keys.dtype == torch.bool
    assert torch.equal(keys[:, 0, 0, :L], mask) and keys[:, 0, 0, L].all(), "padding hidden, pooled embedding seen"
    assert torch.isfinite(tokens).all()
    # a dropped text: the learned null tokens, every position visible
    null_tokens, null_keys = prefix(diffusion.null_condition(cond))
    assert null_keys.all() and torch.isfinite(null_tokens).all()
    close(null_tokens[0], null_tokens[1])
    assert not torch.allclose(null_tokens[0], tokens[0])
    with pytest.raises(ValueError, match=f"the text has {L} token positions; this prior reads at most {L - 1}"):
        prior.TextPrefix(D, W, context_length=L - 1, width=48)(cond)


def full_pass(net, z_t, t, text):
    """The network's sequence [text tokens, pooled, t, z_t, query] through its blocks in one causal pass, without
    the prefix cache: (hidden states (B, L + 4, width), each block's keys and values)."""
    h, keys = net.text(text)
    steps = torch.stack([net.time_in(timestep_embedding(t, net.width)), net.z_in(z_t),
                         net.query.expand(len(z_t), -1)], 1) + net.step_position
    h, keys = torch.cat([h, steps], 1), prior.extend_keys(keys, 3)
    kvs = []
    for block in net.blocks:
        h, kv = block(h, keys, return_kv=True)
        kvs.append(kv)
    return h, kvs


def test_prior_net_is_one_causal_pass_whose_text_never_sees_t_or_z_t(text):
    cond, _, mask, _ = text
    P = mask.shape[1] + 1                                      # prefix length: tokens and the pooled embedding
    net = diffusion_prior().diffusion.net.eval()
    z, t = noisy_inputs(3)
    z2, t2 = noisy_inputs(3, seed=2)
    out = net(z, t, cond)
    assert out.shape == (3, D) and out.dtype == torch.float32 and torch.isfinite(out).all()
    h, kvs = full_pass(net, z, t, cond)
    close(net.out(h[:, -1]), out, atol=1e-5)        # the cached prefix + 3 tokens is one causal pass
    prefix_kv, _ = net._prefix_kv(cond)
    for (k, v), (pk, pv) in zip(kvs, prefix_kv):
        close(k[:, :, :P], pk, atol=1e-5)
        close(v[:, :, :P], pv, atol=1e-5)
    # another z_t, another t: the text's hidden states, keys and values do not move; the output does
    for other_z, other_t in ((z2, t), (z, t2)):
        h_other, kvs_other = full_pass(net, other_z, other_t, cond)
        close(h_other[:, :P], h[:, :P])               # the text never sees t or z_t
        for (k, v), (k2, v2) in zip(kvs, kvs_other):
            close(k2[:, :, :P], k[:, :, :P]), close(v2[:, :, :P], v[:, :, :P])
        assert (net(other_z, other_t, cond) - out).abs().amax(1).min() > 1e-4, "the query must read t and z_t"
    # and the output reads the text
    assert (net(z, t, cond.roll(1, 0)) - out).abs().amax(1).min() > 1e-4


# ----------------------------------------------------------------------------- 2. the null path

def test_the_null_text_is_the_learned_null_handed_over_explicitly(text):
    cond, _, mask, _ = text
    B, L = mask.shape
    model = diffusion_prior().eval()
    net = model.diffusion.net
    with torch.no_grad():   # a trained-looking null: far from its tiny initial values
        net.text.null_tokens.normal_(0, 1)
        net.text.null_pooled.normal_(0, 0.2)
    z, t = noisy_inputs(B)
    explicit = prior.text_condition(net.text.null_tokens[:L].detach().expand(B, -1, -1),
                                    torch.ones(B, L, dtype=torch.bool), net.text.null_pooled.detach().expand(B, -1))
    nulled = net(z, t, diffusion.null_condition(cond))
    close(nulled, net(z, t, explicit), atol=1e-5)
    assert not torch.allclose(nulled, net(z, t, cond), atol=1e-4)
    # guidance 0 is the unconditional call: the NaN-nulled text, through the DiffusionModel
    close(diffusion.guided_prediction(model.diffusion, z, t, {"text": cond}, guidance=0.0), nulled, atol=1e-6)


def test_every_dropped_row_gives_the_same_output_whatever_its_text(text):
    cond = text[0]
    net = diffusion_prior().diffusion.net.eval()
    z, t = noisy_inputs(1)
    z, t = z.expand(3, -1), t.expand(3)
    out = net(z, t, diffusion.null_condition(cond))
    close(out[1], out[0]), close(out[2], out[0])
    # one dropped row among kept ones: the same output as alone (rows never mix)
    mixed = cond.clone()
    mixed[1] = float("nan")
    close(net(z, t, mixed)[1], out[1], atol=1e-5)
    assert not torch.allclose(net(z, t, cond)[1], out[1], atol=1e-4), "the text must matter when it is kept"


# ----------------------------------------------------------------------------- 3. only the text is dropped

def record_inputs(net):
    """Record (z_t, t, conditions) of every call of net."""
    seen = []
    net.register_forward_pre_hook(lambda module, args, kwargs: seen.append((*args, dict(kwargs))), with_kwargs=True)
    return seen


def is_null(rows):
    return rows.isnan().flatten(1).all(1)


def test_training_drops_only_the_text_never_z_t(pairs):
    model = diffusion_prior(p_drop_text=0.9)
    assert model.diffusion.conditions == {"text": 0.9} and model.diffusion.prediction == "x0"
    model.norm.fit(pairs.image_embed)
    seen = record_inputs(model.diffusion.net)
    batch = pairs.get_batch(torch.arange(16).repeat(4))
    x0 = model.norm.encode(batch["image_embed"])
    model.diffusion.loss({"z": x0, "text": batch["text"]}, generator=torch.Generator().manual_seed(0))
    ((z_t, t, conds),) = seen
    assert set(conds) == {"text"}
    g = torch.Generator().manual_seed(0)     # replay diffusion_loss's draws: t, the noise, then the dropped rows
    t_ref = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(64, generator=g) < 0.9
    assert torch.equal(t, t_ref)
    assert torch.isfinite(z_t).all(), "z_t was nulled"
    close(z_t, diffusion.q_sample(model.diffusion.schedule, x0, t_ref, noise), atol=0)
    assert torch.equal(is_null(conds["text"]), drop) and 0 < (~drop).sum() < 20
    close(conds["text"][~drop], batch["text"][~drop], atol=0)     # kept rows untouched (NaN padding included)
    # prior_loss takes the same path: its z_t is the noised, normalised image embedding, always finite
    seen.clear()
    torch.manual_seed(0)
    loss, logs = prior.prior_loss(model, batch)
    assert torch.isfinite(loss) and "mse" in logs
    ((z_t, _, conds),) = seen
    assert torch.isfinite(z_t).all() and 40 < is_null(conds["text"]).sum() < 64


def test_guidance_nulls_only_the_text(text):
    cond, *_, embed = text
    model = diffusion_prior()
    seen = record_inputs(model.diffusion.net)
    z, _ = noisy_inputs(3)
    diffusion.guided_prediction(model.diffusion.eval(), z, 500, {"text": cond}, guidance=3.0)
    model.embed(cond, embed, best_of=1, guidance=2.0, steps=3)
    assert len(seen) == 4, "CFG: one batched call (conditional + unconditional rows) per step"
    for z_t, t, conds in seen:
        first, second = z_t.chunk(2)
        assert torch.isfinite(z_t).all() and torch.equal(first, second), "both halves must see the same z_t"
        assert torch.equal(*t.chunk(2))
        cond_half, uncond_half = conds["text"].chunk(2)
        close(cond_half, cond, atol=0)
        assert is_null(uncond_half).all()
    assert torch.equal(seen[0][0][:3], z)


# ----------------------------------------------------------------------------- 4. normalisation, checkpoints

@pytest.mark.parametrize("mode", prior.NORMALIZATIONS)
def test_embedding_norm_decode_inverts_encode(mode):
    z = unit_cluster(300)
    norm = prior.EmbeddingNorm(D, mode).fit(z)
    x = norm.encode(z)
    close(norm.decode(x), z, atol=1e-5)
    if mode == "standardize":
        close(x.mean(0), torch.zeros(D), atol=1e-4)
        close(x.std(0), torch.ones(D), atol=1e-4)
    elif mode == "sqrt_d":
        close(x.norm(dim=-1), torch.full((300,), math.sqrt(D)), atol=1e-4)
    else:
        assert torch.equal(x, z)


def test_statistics_and_samples_survive_a_checkpoint(tmp_path, tiny_clip):
    model = diffusion_prior().bind(tiny_clip)
    model.norm.fit(unit_cluster(500))
    assert model.clip_id.any() and (model.norm.std != 1).all()
    save_model(model, tmp_path / "prior", "prior_diffusion")
    loaded = load_model(tmp_path / "prior", prior.DiffusionPrior, "prior_diffusion")
    assert loaded.config == model.config
    for name in ("norm.mean", "norm.std", "clip_id"):
        assert torch.equal(loaded.state_dict()[name], model.state_dict()[name]), name
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a = model.eval().sample(tiny_clip, CAPTIONS, seed=3, steps=5)
    b = loaded.eval().sample(tiny_clip, CAPTIONS, seed=3, steps=5)
    assert a.shape == (3, D) and torch.equal(a, b)
    close(a.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the statistics matter: the same weights without them sample elsewhere
    fresh = diffusion_prior().eval()
    assert not torch.allclose(fresh.sample(tiny_clip, CAPTIONS, seed=3, steps=5), a, atol=1e-3)


def test_ar_prior_quantizer_survives_a_checkpoint(tmp_path, tiny_clip):
    model = ar_prior().bind(tiny_clip)
    model.quantizer.fit(unit_cluster(500))
    save_model(model, tmp_path / "ar", "prior_ar")
    loaded = load_model(tmp_path / "ar", prior.ARPrior, "prior_ar")
    for name in ("quantizer.mean", "quantizer.components", "quantizer.edges", "quantizer.centers", "clip_id"):
        assert torch.equal(loaded.state_dict()[name], model.state_dict()[name]), name
    assert torch.equal(model.eval().sample(tiny_clip, CAPTIONS, seed=1), loaded.eval().sample(tiny_clip, CAPTIONS, seed=1))


# ----------------------------------------------------------------------------- 5. PCA and quantisation

def low_rank_embeddings(n=2000, seed=0):
    """Unit embeddings whose variance decays over a fixed random basis: a few components hold most of it.
    The basis and the mean are the same for every seed (one distribution); the seed draws the samples."""
    g = torch.Generator().manual_seed(0)
    scales = torch.exp(-torch.arange(D, dtype=torch.float32) / 2.0)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    mean = 3 * F.normalize(torch.randn(D, generator=g), dim=0)
    samples = torch.randn(n, D, generator=torch.Generator().manual_seed(seed + 1))
    return F.normalize(mean + (samples * scales) @ basis.T, dim=-1)


def pca_residual(z, k):
    """Share of the variance a k-component PCA (PCAQuantizer's mean and components) leaves, computed directly."""
    q = prior.PCAQuantizer(D, k, 2).fit(z)
    centered = z - q.mean
    projected = centered @ q.components.T @ q.components
    return ((centered - projected) ** 2).sum().item() / (centered ** 2).sum().item()


def test_smallest_k_keeps_99_percent_of_the_variance():
    z = low_rank_embeddings()
    k = prior.PCAQuantizer.smallest_k(z)
    assert 2 <= k < D // 2, f"smallest_k = {k}: the data should need a few components"
    assert pca_residual(z, k) < 0.01 <= pca_residual(z, k - 1)
    share, _ = prior.PCAQuantizer.explained(z)
    assert (share[1:] <= share[:-1] + 1e-7).all() and share.sum().item() == pytest.approx(1, abs=1e-5)
    assert prior.PCAQuantizer.smallest_k(z, max_error=0.1) < k


def test_quantization_round_trip_error_is_bounded_by_the_bucket_width():
    """decode(encode(z)) - z splits, orthogonally, into the PCA residual (the dropped components) and, along each
    kept component, the distance from the coordinate to its bucket's mean, which is at most the bucket's width
    (the outer buckets end at the training minimum and maximum). On these embeddings, k = smallest_k and 16 bins,
    the dropped components leave under 1% of the variance and the buckets under 2% more (measured: 2.1% in all)."""
    z = low_rank_embeddings()
    k, bins = prior.PCAQuantizer.smallest_k(z), 16
    q = prior.PCAQuantizer(D, k, bins).fit(z)
    codes = q.encode(z)
    assert codes.shape == (len(z), k) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < bins
    counts = torch.stack([torch.bincount(codes[:, j], minlength=bins) for j in range(k)])
    assert counts.min() >= len(z) / bins - 5 and counts.max() <= len(z) / bins + 5, "quantile buckets are balanced"
    coords = (z - q.mean) @ q.components.T
    bounds = torch.cat([coords.min(0).values[:, None], q.edges, coords.max(0).values[:, None]], 1)   # (k, bins + 1)
    width = (bounds[:, 1:] - bounds[:, :-1]).gather(1, codes.T).T                                      # (N, k)
    decoded = q.decode(codes)
    coord_error = (decoded - q.mean) @ q.components.T - coords
    assert (coord_error.abs() <= width + 1e-5).all(), "a coordinate left its bucket"
    residual = ((z - q.mean) - coords @ q.components).pow(2).sum(1)
    error = (decoded - z).pow(2).sum(1)
    close(error, coord_error.pow(2).sum(1) + residual, atol=1e-5)
    assert (error <= width.pow(2).sum(1) + residual + 1e-5).all()
    variance = (z - z.mean(0)).pow(2).sum(1).mean()
    assert residual.mean() / variance < 0.01, f"PCA residual {residual.mean() / variance:.4f} of the variance"
    quantization = coord_error.pow(2).sum(1).mean() / variance
    assert quantization < 0.02, f"quantisation error {quantization:.4f} of the variance"
    # unseen embeddings of the same distribution: codes still in range, error of the same size
    fresh = low_rank_embeddings(500, seed=1)
    fresh_codes = q.encode(fresh)
    assert fresh_codes.min() >= 0 and fresh_codes.max() < bins
    fresh_error = (q.decode(fresh_codes) - fresh).pow(2).sum(1).mean()
    assert fresh_error / variance < 0.035, f"unseen embeddings: error {fresh_error / variance:.4f} of the variance"


# ----------------------------------------------------------------------------- 6. the diffusion prior overfits

OVERFIT_COSINE = 0.95

def test_diffusion_prior_overfits_sixteen_pairs(pairs):
    """16 captions through the tiny CLIP, each paired with its own target embedding. The random CLIP's image
    embeddings are all alike (mutual cosine ~ 1.000), so the targets are 16 unit vectors around one direction
    instead (mutual cosine ~ 0.87, like real CLIP image embeddings). After 200 Adam steps, 20 DDIM steps land on
    each caption's own target (measured: cosine >= 0.999, every sample nearest its own)."""
    targets = unit_cluster(16, seed=3)
    model = diffusion_prior()
    model.norm.fit(targets)
    batch = {**pairs.get_batch(torch.arange(16).repeat(4)), "image_embed": targets.repeat(4, 1)}
    fit_batch(model, prior.prior_loss, batch, steps=200)
    model.eval()
    one = pairs.get_batch(torch.arange(16))
    z = model.embed(one["text"], one["text_embed"], seed=0, best_of=1, steps=20)
    close(z.norm(dim=-1), torch.ones(16), atol=1e-5)
    cos = z @ targets.T                                     # (16 samples, 16 targets)
    own = cos.diag()
    others = (targets @ targets.T)[~torch.eye(16, dtype=torch.bool)].mean()   # how alike the targets are
    assert own.min() > OVERFIT_COSINE, f"cosine to its own target: min {own.min():.3f}, mean {own.mean():.3f}"
    assert (cos.argmax(1) == torch.arange(16)).float().mean() >= 15 / 16, "samples must be nearest their own target"
    assert own.mean() > others + 0.5 * (1 - others), f"own {own.mean():.3f} vs the targets' mutual cosine {others:.3f}"


# ----------------------------------------------------------------------------- 7. vectors and images, one sampler

class FlatLinear(torch.nn.Module):
    """A toy denoiser that reads x as flat vectors (B, D) and returns the shape it was given."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(D, D, generator=g) / D ** 0.5)
        self.b = torch.nn.Parameter(torch.randn(D, generator=g))

    def forward(self, x, t, cond=None):
        out = x.flatten(1) @ self.w + self.b * (t.float()[:, None] / 1000)
        return (out if cond is None else out + cond.flatten(1)).view_as(x)


@pytest.mark.parametrize("method, eta, prediction", [("ddim", 0.0, "x0"), ("ddim", 1.0, "eps"), ("ddpm", 0.0, "v")])
def test_the_sampler_on_vectors_matches_it_on_1x1_images(method, eta, prediction):
    model, schedule = FlatLinear(), diffusion.Schedule("cosine", 1000)
    cond = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    kwargs = dict(steps=7, method=method, eta=eta, prediction=prediction, seed=11, clip_x0=False)
    vectors = diffusion.sample(model, schedule, (4, D), cond=cond, **kwargs)
    images = diffusion.sample(model, schedule, (4, D, 1, 1), cond=cond[:, :, None, None].expand(4, D, 1, 1), **kwargs)
    assert vectors.shape == (4, D) and torch.isfinite(vectors).all()
    close(vectors, images.view(4, D), atol=1e-5, rtol=1e-5)
    # one step, with noise given
    g = torch.Generator().manual_seed(2)
    pred, x_t, noise = (torch.randn(4, D, generator=g) for _ in range(3))
    step = diffusion.ddim_step(schedule, pred, 500, x_t, 300, prediction, eta=0.5, clip_x0=False, noise=noise)
    as_image = diffusion.ddim_step(schedule, pred.view(4, D, 1, 1), 500, x_t.view(4, D, 1, 1), 300, prediction,
                                   eta=0.5, clip_x0=False, noise=noise.view(4, D, 1, 1))
    for a, b in zip(step, as_image):
        close(a, b.view(4, D), atol=1e-6, rtol=1e-6)


def test_prior_sampling_is_diffusion_sample_over_vectors(text):
    cond, *_, embed = text
    model = diffusion_prior()
    model.norm.fit(unit_cluster(200))
    for guidance in (1.0, 3.0):
        got = model.embed(cond, embed, seed=4, best_of=2, guidance=guidance, steps=6)
        dm = model.diffusion.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # generate samples under bf16 autocast
            x = diffusion.sample(dm, dm.schedule, (6, D), steps=6, eta=0.0, cond={"text": cond.repeat(2, 1, 1)},
                                 guidance=None if guidance == 1 else guidance, seed=4, clip_x0=False, prediction="x0",
                                 null=("text",))
        want = prior.keep_best(model.norm.decode(x.float()).view(2, 3, D), F.normalize(embed, dim=-1))
        close(got, want, atol=1e-6)
    assert got.shape == (3, D)


# ----------------------------------------------------------------------------- 8. the prefix cache

def test_prefix_cache_gives_the_uncached_output_and_is_cleared(text):
    cond = text[0]
    net = diffusion_prior().diffusion.net.eval()
    (z1, t1), (z2, t2) = noisy_inputs(3, seed=1), noisy_inputs(3, seed=2)
    nulled = diffusion.null_condition(cond)
    want1, want2, want_null = net(z1, t1, cond), net(z2, t2, cond), net(z2, t2, nulled)   # gradients on: no cache
    assert net._cache is None
    calls = []
    hook = net.text.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        got1 = net(z1, t1, cond)
        assert net._cache is not None and calls == [1]
        got2 = net(z2, t2, cond.clone())
        assert calls == [1], "the same text again: its prefix must come from the cache"
        got_null = net(z2, t2, nulled)
        assert calls == [1, 1], "another text: the prefix must be recomputed"
    hook.remove()
    close(got1, want1), close(got2, want2), close(got_null, want_null)
    assert not torch.allclose(got_null, got2, atol=1e-4)
    net.eval()
    assert net._cache is None, ".eval() clears the cache"
    with torch.no_grad():
        net(z1, t1, cond)
    net.train()
    assert net._cache is None, ".train() clears the cache"
    with torch.no_grad():
        net(z1, t1, cond)
    assert net._cache is None, "no cache in training mode"


def test_prefix_cache_tells_a_dropped_text_from_a_text_of_sevens(text):
    cond = text[0]
    net = diffusion_prior().diffusion.net.eval()
    z, t = noisy_inputs(3)
    sevens = torch.full_like(cond, 7.0)
    want = net(z, t, sevens)
    with torch.no_grad():
        net(z, t, diffusion.null_condition(cond))
        got = net(z, t, sevens)
    close(got, want, atol=1e-5)


# ----------------------------------------------------------------------------- 9. best-of-N, the AR prior

def test_keep_best_picks_the_largest_dot_product():
    g = torch.Generator().manual_seed(0)
    candidates = F.normalize(torch.randn(5, 6, D, generator=g), dim=-1)
    text_embed = F.normalize(torch.randn(6, D, generator=g), dim=-1)
    best = prior.keep_best(candidates, text_embed)
    picks = []
    for b in range(6):
        scores = [float(candidates[n, b] @ text_embed[b]) for n in range(5)]
        picks.append(scores.index(max(scores)))
        assert torch.equal(best[b], candidates[picks[-1], b])
    assert len(set(picks)) > 1, "the test needs captions whose best candidates differ"


def test_ar_prior_embeds_unit_vectors_and_its_loss_decreases(text, pairs):
    model = ar_prior()
    model.quantizer.fit(unit_cluster(500))
    cond, *_, embed = text
    for best_of in (1, 3):
        z = model.eval().embed(cond, embed, seed=0, best_of=best_of)
        assert z.shape == (3, D) and torch.isfinite(z).all()
        close(z.norm(dim=-1), torch.ones(3), atol=1e-5)
    model.quantizer.fit(pairs.image_embed)
    batch = pairs.get_batch(torch.arange(16))
    with torch.no_grad():
        before, logs = prior.ar_prior_loss(model.eval(), batch)
    assert torch.isfinite(before) and 0 <= logs["code_accuracy"] <= 1
    model.train()
    fit_batch(model, prior.ar_prior_loss, batch, steps=30)
    with torch.no_grad():
        after, _ = prior.ar_prior_loss(model.eval(), batch)
    assert after < 0.8 * before, f"AR loss {before:.3f} -> {after:.3f} after 30 steps on 16 pairs"


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_ar_logits_equal_the_kv_cache_decode(text, guidance):
    """embed's loop (a key-value cache, one code at a time) gives, at every step, the logits that teacher forcing
    (ARPrior.logits) gives for the codes it sampled; guided, the unconditional half is the nulled text's."""
    cond, *_, embed = text
    model = ar_prior().eval()
    model.quantizer.fit(unit_cluster(500))
    heads, fed = [], []
    hooks = [model.head.register_forward_hook(lambda m, i, o: heads.append(o.detach().float())),
             model.code_in.register_forward_hook(lambda m, i, o: fed.append(i[0].detach()))]
    with torch.no_grad():
        z = model.embed(cond, embed, seed=0, guidance=guidance, best_of=1)   # one candidate per caption
    for h in hooks:
        h.remove()
    assert len(heads) == model.k and len(fed) == model.k - 1
    decoded = torch.stack(heads, 1)                                   # (B or 2B, k, bins)
    codes = torch.stack(fed + [torch.zeros_like(fed[0])], 1)         # the last code is never fed back: any value
    with torch.no_grad():
        teacher = model.logits(cond, codes)
        close(decoded[:3], teacher, atol=2e-5, rtol=1e-4)
        if guidance != 1:
            close(decoded[3:], model.logits(diffusion.null_condition(cond), codes), atol=2e-5, rtol=1e-4)
    # the output is the de-quantised codes (for some last code)
    options = torch.stack([F.normalize(model.quantizer.decode(torch.cat([codes[:, :-1], torch.full((3, 1), c)], 1)), dim=-1)
                           for c in range(model.bins)])               # (bins, B, D)
    assert ((options - z[None]).abs().amax(-1) < 1e-5).any(0).all()


# ----------------------------------------------------------------------------- 10. the recipes

def test_smoke_recipe_trains_once_then_loads_and_reports(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    first = recipes.load("prior_diffusion", "smoke", progress=False)
    assert "training 'prior_diffusion'" in capsys.readouterr().out
    second = recipes.load("prior_diffusion", "smoke", progress=False)
    assert "loaded 'prior_diffusion'" in capsys.readouterr().out, "the second load must come from the cache"
    assert isinstance(second, prior.DiffusionPrior) and not second.training
    want, got = first.state_dict(), second.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    clip_model = recipes.load("clip", "smoke")
    assert torch.equal(second.clip_id, clip_module.signature(clip_model)), "bound to the CLIP it was trained on"
    assert (second.norm.std != 1).all(), "the normalisation statistics were fitted and saved"
    recipe = recipes.get("prior_diffusion")
    report = recipe.report(second, **zoo.with_needs(recipe, "smoke"))
    keys = {"n", "bank", "knn_caption_accuracy", "knn_caption_accuracy_one", "knn_caption_accuracy_two",
            "sample_seconds_per_1000", "cosine_to_truth", "cosine_text_to_truth", "cosine_truth_to_truth", "fd",
            "fd_floor", "spread_sampled", "spread_real", "diversity_ratio"}
    assert set(report) == keys
    assert all(math.isfinite(v) for v in report.values()), report
    assert report["n"] == 64 and report["bank"] == 500
    assert all(0 <= report[k] <= 1 for k in keys if k.startswith("knn"))
    assert all(-1 <= report[k] <= 1 for k in keys if k.startswith("cosine"))
    assert report["spread_real"] > 0 and report["diversity_ratio"] >= 0


def test_smoke_ar_recipe_fits_its_quantizer_and_reports(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    model = recipes.load("prior_ar", "smoke", progress=False)
    assert isinstance(model, prior.ARPrior) and model.clip_id.any()
    assert model.quantizer.centers.abs().sum() > 0 and (model.quantizer.edges[:, 1:] >= model.quantizer.edges[:, :-1]).all()
    recipe = recipes.get("prior_ar")
    report = recipe.report(model, **zoo.with_needs(recipe, "smoke"))
    assert all(math.isfinite(v) for v in report.values()) and 0 <= report["knn_caption_accuracy"] <= 1


# ----------------------------------------------------------------------------- the baselines

def test_baselines_return_unit_embeddings_of_the_right_kind(tiny_clip):
    captions = CAPTIONS[:2]
    text_prior = prior.TextPrior(D, W).bind(tiny_clip)
    close(text_prior.sample(tiny_clip, captions), tiny_clip.encode_text(captions), atol=1e-6)
    render_prior = prior.RenderPrior(D, W).bind(tiny_clip)
    want = tiny_clip.encode_image(data.render(data.scenes_from_prompts(captions, 5)))
    close(render_prior.sample(tiny_clip, captions, seed=5), want, atol=1e-6)
    torch.manual_seed(0)
    regression = prior.RegressionPrior(D, W, hidden=16).eval()
    z = regression.sample(tiny_clip, captions)
    assert z.shape == (2, D)
    close(z.norm(dim=-1), torch.ones(2), atol=1e-5)
