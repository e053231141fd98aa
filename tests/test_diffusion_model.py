"""DiffusionModel (diffusion_model.py) around any denoiser: tiny toy networks over vectors (unCLIP's prior) and over
images with several conditions (unCLIP's decoder, an upsampler); condition dropout, guidance, errors, checkpoints;
and layers.TransformerBlock. Everything here is small enough to run in seconds on a CPU."""
import pytest
import torch
from torch import nn

from minidalle2 import diffusion
from minidalle2.diffusion_model import DiffusionModel
from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.layers import TransformerBlock, timestep_embedding
from minidalle2.unet import NoisyClassifier, UNet

D, E = 4, 3                 # the vector net: sample size, text-embedding size
C, R, L = 2, 4, 5           # the image net: channels, resolution, context tokens


def with_null(value, null, batch):
    """value with its all-NaN rows (or a missing value) replaced by the learned null."""
    if value is None:
        return null.expand(batch, *null.shape)
    dropped = value.isnan().flatten(1).all(1).view(-1, *[1] * (value.ndim - 1))
    return torch.where(dropped, null.to(value.dtype), value)


class VectorNet(nn.Module):
    """A toy prior: an MLP over (x_t (B, D), t, text (B, E)); a NaN text row means "no text" (a learned null)."""

    def __init__(self, dim=D, text_dim=E, hidden=128, num_timesteps=1000):
        super().__init__()
        self.config = dict(dim=dim, text_dim=text_dim, hidden=hidden, num_timesteps=num_timesteps)
        self.null = nn.Parameter(torch.randn(text_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(dim + text_dim + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, text=None):
        text = with_null(text, self.null, len(x))
        return self.mlp(torch.cat([x, timestep_embedding(t, 32).to(x.dtype), text.to(x.dtype)], 1))


class ImageNet(nn.Module):
    """A toy decoder/upsampler: x_t (B, C, R, R) with an image condition (B, C, R, R) concatenated, plus a vector
    `emb` (B, E) and token states `context` (B, L, E), each with a learned null. Records what it receives."""

    def __init__(self, num_timesteps=1000):
        super().__init__()
        self.config = dict(num_timesteps=num_timesteps)
        self.emb_null, self.context_null = nn.Parameter(torch.randn(E)), nn.Parameter(torch.randn(L, E))
        self.emb, self.context = nn.Linear(E, C), nn.Linear(E, C)
        self.mix = nn.Conv2d(2 * C, C, 1)
        self.seen = []

    def forward(self, x, t, emb=None, context=None, image_cond=None):
        self.seen.append({k: None if v is None else v.detach().clone()
                          for k, v in dict(emb=emb, context=context, image_cond=image_cond).items()})
        e = self.emb(with_null(emb, self.emb_null, len(x)).to(x.dtype))
        c = self.context(with_null(context, self.context_null, len(x)).to(x.dtype)).mean(1)
        return self.mix(torch.cat([x, image_cond.to(x.dtype)], 1)) + (e + c)[:, :, None, None] \
            + timestep_embedding(t, C).to(x.dtype)[:, :, None, None]


def vector_model(**kwargs):
    torch.manual_seed(0)
    return DiffusionModel(VectorNet(**kwargs), (D,), conditions={"text": 0.5})


def image_model():
    torch.manual_seed(0)
    return DiffusionModel(ImageNet(), (C, R, R), conditions={"emb": 0.1, "context": 0.5, "image_cond": 0.0})


def image_conditions(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(n, E, generator=g), "context": torch.randn(n, L, E, generator=g),
            "image_cond": torch.rand(n, C, R, R, generator=g) * 2 - 1}


def is_null(rows):
    """(B,) True where a row is all NaN (null_condition); a partly-NaN row is a bug either way."""
    nan = rows.isnan().flatten(1)
    assert (nan.all(1) | ~nan.any(1)).all(), "a condition row is partly NaN"
    return nan.all(1)


# ----------------------------------------------------------------------------- (a) a vector denoiser

def test_vector_model_loss_and_generate_shapes():
    model = vector_model()
    batch = {"image": torch.randn(16, D), "text": torch.randn(16, E)}
    loss, logs = model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(logs) == {"mse"}
    loss.backward()
    assert all(p.grad is not None for p in model.net.mlp.parameters())
    samples = model.generate(6, cond={"text": torch.randn(6, E)}, guidance=2.0, steps=4)
    assert samples.shape == (6, D) and samples.dtype == torch.float32 and torch.isfinite(samples).all()
    assert model.training, "generate must restore training mode"


def test_cfg_is_pred_u_plus_w_times_the_difference():
    model = vector_model()
    x_t, text = torch.randn(5, D), torch.randn(5, E)
    t = torch.tensor([0, 10, 500, 900, 999])
    pred_c = model(x_t, t, text=text)
    pred_u = model(x_t, t, text=diffusion.null_condition(text))
    assert not torch.allclose(pred_c, pred_u), "the toy net ignores its condition: the check would be vacuous"
    for w in (0.0, 1.0, 3.0):
        got = diffusion.guided_prediction(model, x_t, t, {"text": text}, guidance=w)
        torch.testing.assert_close(got, pred_u + w * (pred_c - pred_u), rtol=1e-5, atol=1e-5)
    # an int t is one timestep for the whole batch
    got = diffusion.guided_prediction(model, x_t, 7, {"text": text}, guidance=2.0)
    seven = torch.full((5,), 7)
    pc, pu = model(x_t, seven, text=text), model(x_t, seven, text=diffusion.null_condition(text))
    torch.testing.assert_close(got, pu + 2.0 * (pc - pu), rtol=1e-5, atol=1e-5)


def test_same_seed_same_samples():
    model = vector_model()
    text = torch.randn(4, E)
    a = model.generate(4, cond={"text": text}, guidance=2.0, steps=5, seed=3)
    b = model.generate(4, cond={"text": text}, guidance=2.0, steps=5, seed=3)
    c = model.generate(4, cond={"text": text}, guidance=2.0, steps=5, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # in batches, the batch starting at row `start` is seeded with seed + start
    halves = model.generate(4, cond={"text": text}, guidance=2.0, steps=5, seed=3, batch_size=2)
    assert torch.equal(halves[:2], model.generate(2, cond={"text": text[:2]}, guidance=2.0, steps=5, seed=3))
    assert torch.equal(halves[2:], model.generate(2, cond={"text": text[2:]}, guidance=2.0, steps=5, seed=5))


def test_vector_samples_are_not_clamped():
    """Vectors (CLIP embeddings) are not images: nothing should pin them to [-1, 1]. An untrained eps-net predicting
    ~0 makes x0 = x_t / sqrt(abar) at the last step, far outside [-1, 1] for unit-variance noise."""
    model = vector_model()
    nn.init.zeros_(model.net.mlp[-1].weight), nn.init.zeros_(model.net.mlp[-1].bias)     # predicts eps = 0
    samples = model.generate(64, cond={"text": torch.randn(64, E)}, steps=5)
    assert samples.abs().max() > 1.5, f"samples lie in [{samples.min():.3f}, {samples.max():.3f}]"


def test_vector_model_overfits_a_few_vectors():
    model = vector_model()
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(8, D, generator=g) * 0.5, torch.randn(8, E, generator=g)

    def eval_loss():
        with torch.no_grad():   # the same t and noise every time: a fixed 2,048-row estimate
            return model.loss({"image": x0.repeat(256, 1), "text": text.repeat(256, 1)},
                              generator=torch.Generator().manual_seed(1))[0].item()

    initial = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train_g = torch.Generator().manual_seed(2)
    for _ in range(200):
        loss, _ = model.loss({"image": x0.repeat(16, 1), "text": text.repeat(16, 1)}, generator=train_g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = eval_loss()
    assert final < 0.3 * initial, f"loss {initial:.3f} -> {final:.3f} after 200 Adam steps on 8 vectors"


# ----------------------------------------------------------------------------- (b) several conditions

def test_training_drops_each_condition_independently_and_never_the_image():
    model = image_model()
    n = 4000
    conds = image_conditions(n)
    batch = {"image": torch.rand(n, C, R, R) * 2 - 1, **conds}
    model.net.seen.clear()
    model.loss(batch, generator=torch.Generator().manual_seed(0))
    (seen,) = model.net.seen
    emb_null, context_null = is_null(seen["emb"]), is_null(seen["context"])
    # kept rows are passed through untouched
    torch.testing.assert_close(seen["emb"][~emb_null], conds["emb"][~emb_null], rtol=0, atol=0)
    torch.testing.assert_close(seen["context"][~context_null], conds["context"][~context_null], rtol=0, atol=0)
    p_emb, p_context = emb_null.float().mean().item(), context_null.float().mean().item()
    joint = (emb_null & context_null).float().mean().item()
    assert abs(p_emb - 0.1) < 0.03, f"emb dropped in {p_emb:.3f} of rows, p_drop = 0.1"
    assert abs(p_context - 0.5) < 0.03, f"context dropped in {p_context:.3f} of rows, p_drop = 0.5"
    # independent: both dropped in ~ p_emb * p_context of the rows (0.1 if one draw served both, 0 if exclusive)
    assert abs(joint - p_emb * p_context) < 0.015, f"joint drop rate {joint:.3f} vs {p_emb * p_context:.3f}"
    assert abs(context_null[emb_null].float().mean() - context_null[~emb_null].float().mean()) < 0.08
    # p_drop = 0: the low-resolution image reaches the net exactly as given
    assert torch.equal(seen["image_cond"], conds["image_cond"])
    # the same generator seed drops the same rows
    model.net.seen.clear()
    model.loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(is_null(model.net.seen[0]["emb"]), emb_null)


def guided_call(model, n=3, **kwargs):
    """The first network call of a guided generate: (conditions received, the n given)."""
    conds = image_conditions(n, seed=1)
    model.net.seen.clear()
    model.generate(n, cond=conds, guidance=2.0, steps=2, **kwargs)
    assert len(model.net.seen) == 2, "guidance 2 on two steps: one batched (conditional + unconditional) call each"
    first = model.net.seen[0]
    assert all(len(v) == 2 * n for v in first.values()), "CFG batches the two halves together"
    return first, conds


def test_guidance_nulls_only_the_droppable_conditions_by_default():
    model = image_model()
    seen, conds = guided_call(model)
    for name in ("emb", "context"):
        cond_half, uncond_half = seen[name].chunk(2)
        assert torch.equal(cond_half, conds[name]), f"{name}: the conditional half is not the given condition"
        assert is_null(uncond_half).all(), f"{name} (p_drop > 0) is not nulled in the unconditional half"
    for half in seen["image_cond"].chunk(2):
        assert torch.equal(half, conds["image_cond"]), "image_cond (p_drop = 0) must reach both halves unchanged"


def test_guidance_nulls_exactly_the_conditions_named():
    model = image_model()
    seen, conds = guided_call(model, null=("context",))
    for half in seen["emb"].chunk(2):
        assert torch.equal(half, conds["emb"]), "emb was not named in null but was changed"
    assert torch.equal(seen["context"][:3], conds["context"]) and is_null(seen["context"][3:]).all()
    for half in seen["image_cond"].chunk(2):
        assert torch.equal(half, conds["image_cond"])


def test_guidance_never_nulls_a_condition_that_is_never_dropped():
    """Given only image_cond (p_drop = 0), guidance has nothing to null: a clear error, or image_cond kept."""
    model = image_model()
    conds = {"image_cond": image_conditions(2)["image_cond"]}
    model.net.seen.clear()
    try:
        model.generate(2, cond=conds, guidance=2.0, steps=1)
    except ValueError:
        return
    assert not is_null(model.net.seen[0]["image_cond"]).any(), "image_cond (p_drop = 0) was nulled"


def test_nulling_a_condition_that_was_not_given_is_an_error():
    model = image_model()
    conds = image_conditions(3)
    with pytest.raises(ValueError, match="nulls only conditions it was given"):
        model.generate(3, cond=conds, guidance=2.0, steps=2, null=("nope",))
    del conds["emb"]
    with pytest.raises(ValueError, match=r"also needs the condition\(s\) \['emb'\]"):
        model.generate(3, cond=conds, guidance=2.0, steps=2)
    with pytest.raises(ValueError, match="nulls only conditions it was given"):
        diffusion.guided_prediction(model, torch.randn(3, C, R, R), 5, conds, guidance=2.0, null=("emb",))


# ----------------------------------------------------------------------------- (c) clear errors

@pytest.mark.parametrize("sample_shape", [(), (3, 0, 4), "3x32x32", (3.0, 32, 32), (True,), None, 64])
def test_bad_sample_shape_is_named(sample_shape):
    with pytest.raises(ValueError, match="sample_shape must be the shape of one sample"):
        DiffusionModel(VectorNet(), sample_shape)


@pytest.mark.parametrize("conditions", [{"text": 1.0}, {"text": -0.1}, {"text": True}, {"text": "0.5"}, {1: 0.1}])
def test_bad_conditions_are_named(conditions):
    with pytest.raises(ValueError, match="drop probability in \\[0, 1\\)"):
        DiffusionModel(VectorNet(), (D,), conditions=conditions)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prediction="noise"), "prediction must be one of"), (dict(weighting="snr"), "weighting must be one of")])
def test_bad_process_settings_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DiffusionModel(VectorNet(), (D,), **kwargs)


def test_a_net_that_is_not_a_module_is_named():
    with pytest.raises(ValueError, match="net must be a torch.nn.Module"):
        DiffusionModel(lambda x, t: x, (D,))


def test_the_nets_timesteps_must_match_the_process():
    with pytest.raises(ValueError, match="T = 1000.*num_timesteps=1000"):
        DiffusionModel(VectorNet(num_timesteps=100), (D,))
    DiffusionModel(VectorNet(num_timesteps=100), (D,), T=100)     # matching: fine


def test_generate_with_an_unknown_condition_is_named():
    with pytest.raises(ValueError, match=r"conditions are \['text'\], got \['caption'\]"):
        vector_model().generate(2, cond={"caption": torch.randn(2, E)}, steps=2)
    with pytest.raises(ValueError, match=r"conditions are \['text'\], got \['cond'\]"):
        vector_model().generate(2, cond=torch.randn(2, E), steps=2)     # a bare tensor is the condition "cond"


def test_generate_on_an_unconditional_model_refuses_cond():
    torch.manual_seed(0)
    model = DiffusionModel(VectorNet(), (D,))
    assert not model.conditional
    with pytest.raises(ValueError, match="unconditional: leave cond=None"):
        model.generate(2, cond={"text": torch.randn(2, E)}, steps=2)
    assert model.generate(2, steps=2).shape == (2, D)


def test_generate_without_cond_on_a_model_with_several_conditions_is_named():
    with pytest.raises(ValueError, match="conditional .*context, emb, image_cond.*give cond"):
        image_model().generate(2, steps=2)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_generate_bad_n_is_named(n):
    with pytest.raises(ValueError, match="n must be a positive number"):
        vector_model().generate(n, steps=2)


# ----------------------------------------------------------------------------- (d) checkpoints

def tiny_unet_model():
    torch.manual_seed(0)
    net = UNet(widths=[8, 16], patch_size=2, attention_levels=[], num_classes=3)
    with torch.no_grad():   # random weights everywhere (the head starts at zero): loading must really matter
        for p in net.parameters():
            p.normal_(0, 0.1)
    return DiffusionModel(net, (3, 32, 32), schedule="cosine", prediction="v", weighting="min_snr",
                          conditions={"cond": 0.2})


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    model = tiny_unet_model()
    save_model(model, tmp_path / "m", "diffusion")
    loaded = load_model(tmp_path / "m", DiffusionModel.factory(UNet), "diffusion")
    assert isinstance(loaded.net, UNet)
    assert loaded.config == model.config
    assert (loaded.sample_shape, loaded.schedule.name, loaded.schedule.T, loaded.prediction, loaded.weighting,
            loaded.conditions) == ((3, 32, 32), "cosine", 1000, "v", "min_snr", {"cond": 0.2})
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    labels = torch.tensor([0, 2])
    a = model.generate(2, cond=labels, guidance=2.0, steps=3, seed=5)
    b = loaded.generate(2, cond=labels, guidance=2.0, steps=3, seed=5)
    assert torch.equal(a, b)
    assert a.abs().max() <= 1, "image samples are clamped to [-1, 1]"
    # a conditional UNet model given no cond samples its unconditional model (class -1)
    torch.testing.assert_close(loaded.generate(2, steps=3), loaded.generate(2, cond=torch.tensor([-1, -1]), steps=3))


def test_factory_refuses_a_checkpoint_of_another_network(tmp_path):
    save_model(tiny_unet_model(), tmp_path / "m", "diffusion")
    with pytest.raises(ValueError, match="network is a UNet, not a NoisyClassifier"):
        load_model(tmp_path / "m", DiffusionModel.factory(NoisyClassifier), "diffusion")


# ----------------------------------------------------------------------------- (e) TransformerBlock

def test_transformer_block_keeps_the_shape():
    torch.manual_seed(0)
    block = TransformerBlock(dim=16, heads=4)
    x = torch.randn(2, 7, 16)
    assert block(x).shape == (2, 7, 16)
    assert block(torch.randn(3, 1, 16)).shape == (3, 1, 16)


@pytest.mark.parametrize("causal", [True, False])
def test_transformer_block_causality(causal):
    torch.manual_seed(0)
    block = TransformerBlock(dim=16, heads=4, causal=causal).eval()
    x = torch.randn(2, 7, 16)
    j = 4
    changed = x.clone()
    changed[:, j] += torch.randn(2, 16)
    before, after = block(x), block(changed)
    earlier_moved = (after[:, :j] - before[:, :j]).abs().max().item()
    if causal:
        assert earlier_moved < 1e-6, f"causal: changing token {j} moved earlier outputs by {earlier_moved:.2e}"
    else:
        assert earlier_moved > 1e-3, "causal=False: every position should see token j"
    assert (after[:, j:] - before[:, j:]).abs().amax(dim=-1).min() > 1e-3, "token j and later must see the change"


def test_transformer_block_key_value_cache_equals_one_pass():
    """A causal prefix run once (return_kv) and the rest run after it (past=) give the outputs of one whole pass,
    with a padding mask too: what autoregressive decoding and the prior's prefix cache rely on."""
    torch.manual_seed(0)
    block = TransformerBlock(dim=16, heads=4).eval()
    x = torch.randn(3, 9, 16)
    keys = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    keys[0, ..., 2] = False                                   # a padded position in the prefix of row 0
    whole = block(x, keys)
    prefix, kv = block(x[:, :5], keys[..., :5], return_kv=True)
    assert kv[0].shape == (3, 4, 5, 4) and torch.allclose(prefix, whole[:, :5], atol=1e-6)
    rest = block(x[:, 5:], keys, past=kv)
    assert torch.allclose(rest, whole[:, 5:], atol=1e-5), (rest - whole[:, 5:]).abs().max()
    step, kv2 = block(x[:, 5:6], keys[..., :6], past=kv, return_kv=True)   # one token at a time
    step2 = block(x[:, 6:7], keys[..., :7], past=kv2)
    assert torch.allclose(torch.cat([step, step2], 1), whole[:, 5:7], atol=1e-5)
    assert not torch.allclose(block(x[:, 5:], keys[..., 5:]), whole[:, 5:], atol=1e-3)   # the prefix matters


@pytest.mark.parametrize("x", [torch.randn(2, 16), torch.randn(2, 7, 8), torch.randn(1, 2, 7, 16), [[0.0] * 16]])
def test_transformer_block_bad_input_is_named(x):
    block = TransformerBlock(dim=16, heads=4)
    with pytest.raises(ValueError, match=r"TransformerBlock expects tokens \(B, L, 16\)"):
        block(x)


def test_transformer_block_heads_must_divide_dim():
    with pytest.raises(ValueError, match="dim 10 must be divisible by heads 4"):
        TransformerBlock(dim=10, heads=4)


def test_a_model_that_never_drops_its_condition_samples_at_w_1_and_refuses_to_guide():
    torch.manual_seed(0)
    model = DiffusionModel(VectorNet(), (D,), conditions={"text": 0.0})
    text = torch.randn(2, E)
    assert model.generate(2, cond={"text": text}, guidance=1.0, steps=2).shape == (2, D)   # w = 1: conditional only
    with pytest.raises(ValueError, match="never drops a condition in training"):
        model.generate(2, cond={"text": text}, guidance=2.0, steps=2)
