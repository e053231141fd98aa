"""Chapter 07 (CLIP): the contrastive loss, the temperature, the encoders' contract, the recipe, the adapter."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from minidalle2 import clip, data, recipes
from minidalle2.course.checks import CheckFailed
from minidalle2.course.checks import clip as checks
from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.data import ShapesDataset
from minidalle2.lab.train import TrainConfig
from minidalle2.lab.train import train

TINY = dict(embed_dim=16, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1, context_length=20)


def tiny(**kw):
    torch.manual_seed(0)
    return clip.CLIP(**{**TINY, **kw})


@pytest.fixture(scope="module")
def batch():
    return ShapesDataset(32, "train", seed=0).get_batch(torch.arange(32))


def features(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


# ----------------------------------------------------------------------------- the loss

def test_loss_matches_a_direct_computation():
    img, txt = features()
    scale = 1 / 0.07
    loss = clip.contrastive_loss(img, txt, scale)
    logits = scale * torch.tensor([[float(img[i] @ txt[j]) for j in range(6)] for i in range(6)])
    i2t = -sum(math.log(torch.softmax(logits[i], 0)[i]) for i in range(6)) / 6      # each row: its pair
    t2i = -sum(math.log(torch.softmax(logits[:, j], 0)[j]) for j in range(6)) / 6   # each column: its pair
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    perfect = F.normalize(torch.eye(6), dim=-1)          # orthogonal pairs, scale 100: loss near 0
    assert clip.contrastive_loss(perfect, perfect, 100.0).item() < 1e-6
    assert clip.contrastive_loss(perfect, perfect, 1.0).item() > 1.0   # a hot softmax cannot be sure


def test_loss_matches_open_clip_clip_loss_values_and_gradients():
    from open_clip.loss import ClipLoss
    img, txt = features(8, 7, seed=3)
    for scale in (1.0, 14.3, 100.0):
        a = [t.clone().requires_grad_() for t in (img, txt)]
        b = [t.clone().requires_grad_() for t in (img, txt)]
        ours, theirs = clip.contrastive_loss(*a, scale), ClipLoss()(*b, scale)
        assert torch.allclose(ours, theirs, atol=1e-6)
        ours.backward(), theirs.backward()
        assert all(torch.allclose(x.grad, y.grad, atol=1e-5, rtol=1e-4) for x, y in zip(a, b))
    assert clip.contrastive_loss(img, txt, 10.0) == pytest.approx(clip.contrastive_loss(txt, img, 10.0).item())


def test_temperature_starts_at_007_and_is_clamped_at_100(batch):
    model = tiny()
    assert model.logit_scale.item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(1000))
    assert model.logit_scale.item() == pytest.approx(100.0)      # the value used is clamped at once
    model.train()
    clip.clip_loss(model, batch)                                  # and training clamps the parameter itself
    assert model.model.logit_scale.item() == pytest.approx(math.log(100))
    # a run pushed hard towards a colder softmax never passes 100
    config = TrainConfig(steps=8, batch_size=16, lr=0.5)
    result = train(tiny(), clip.clip_loss, ShapesDataset(64, "train"), config, progress=False)
    assert max(h["logit_scale"] for h in result.history) <= 100 + 1e-4


def test_no_weight_decay_on_gains_biases_and_temperature():
    from minidalle2.lab.train import make_optimizer
    model = tiny()
    groups = make_optimizer(model, TrainConfig(steps=1, batch_size=1, lr=1e-3, weight_decay=0.1)).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "model.logit_scale" in names
    assert all(n.endswith(("bias", ".weight")) and ("ln" in n or "bias" in n) or n in
               ("model.logit_scale", "model.visual.class_embedding") for n in names)
    assert "model.token_embedding.weight" not in names


# ----------------------------------------------------------------------------- the encoders' contract

def test_encoders_shapes_and_normalisation(batch):
    model = tiny().eval()
    v, t = model.encode_image(batch["image"][:5]), model.encode_text(batch["caption"][:3])
    assert v.shape == (5, 16) and t.shape == (3, 16)
    assert torch.allclose(v.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    states, mask = model.text_states(batch["caption"][:3])
    assert states.shape == (3, 20, 32) and mask.shape == (3, 20) and mask.dtype == torch.bool
    tokens = model.tokenize(batch["caption"][:3])
    assert torch.equal(mask.sum(1), (tokens != 0).sum(1))         # start .. end, no padding
    # the embedding is the end token's state, projected: the states are the ones it was pooled from
    end = mask.sum(1) - 1
    pooled = states[torch.arange(3), end] @ model.model.text_projection
    assert torch.allclose(F.normalize(pooled, dim=-1), t, atol=1e-5)
    logits = model(batch["image"][:4], batch["caption"][:6])
    assert logits.shape == (4, 6)


def test_bad_inputs_get_clear_errors(batch):
    model = tiny()
    with pytest.raises(ValueError, match="empty list of captions"):
        model.encode_text([])
    with pytest.raises(TypeError, match="caption 1 is a int"):
        model.encode_text(["a red circle", 3])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode_image(batch["image"][:2, :, :16, :16])
    with pytest.raises(ValueError, match=r"single image"):
        model.encode_image(batch["image"][0])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        clip.CLIP(**{**TINY, "patch_size": 5})
    with pytest.warns(UserWarning, match="truncated"):                # too long: truncated, with a warning
        tokens = model.tokenize(["a big red circle " * 10])
    assert tokens.shape == (1, 20) and tokens[0, -1] == clip.tokenizer().eot_token_id


def test_model_round_trips_through_safetensors(tmp_path, batch):
    model = tiny().eval()
    save_model(model, tmp_path / "clip", "clip")
    again = load_model(tmp_path / "clip", clip.CLIP, "clip").eval()
    assert torch.equal(model.encode_image(batch["image"][:4]), again.encode_image(batch["image"][:4]))
    assert torch.equal(model.encode_text(batch["caption"][:4]), again.encode_text(batch["caption"][:4]))


def test_frozen_encoders_stay_frozen_downstream(tmp_path, batch):
    recipes.load("clip", "smoke", cache=tmp_path, progress=False)
    frozen = recipes.load("clip", "smoke", cache=tmp_path, progress=False)   # as a later chapter gets it
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}

    class Probe(torch.nn.Module):          # a downstream model that holds CLIP and trains a head on it
        def __init__(self):
            super().__init__()
            self.clip, self.head = frozen, torch.nn.Linear(frozen.embed_dim, 5)
            self.config = {}

    def loss_fn(probe, b):
        return F.cross_entropy(probe.head(probe.clip.encode_image(b["image"])), b["objects"][:, 0, 0])
    train(Probe(), loss_fn, ShapesDataset(64, "train"), TrainConfig(steps=3, batch_size=16, lr=1e-2), progress=False)
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in frozen.parameters())


# ----------------------------------------------------------------------------- retrieval and zero-shot

def test_retrieval_counts_exact_pairs_and_same_scene():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]            # captions 2 and 3 swapped
    labels = torch.tensor([[0], [1], [2], [2]])  # items 2 and 3 show the same scene
    r = clip.retrieval(img, txt, labels)
    assert r["r1_image_to_text"] == r["r1_text_to_image"] == 0.5
    assert r["r1_image_to_text_same_scene"] == r["r1_text_to_image_same_scene"] == 1.0
    assert r["r1_exact_ceiling"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)


def test_zero_shot_classify_with_prompt_ensembles():
    classes = F.normalize(torch.randn(3, 4, 8), dim=-1)
    images = F.normalize(classes.mean(1)[[2, 0, 1]] + 0.01 * torch.randn(3, 8), dim=-1)
    assert clip.zero_shot_classify(images, classes).tolist() == [2, 0, 1]
    assert clip.zero_shot_classify(images, F.normalize(classes.mean(1), dim=-1)).tolist() == [2, 0, 1]
    # marginal rule: the class whose prompts hold the most probability, log sum_p exp(scale * cos)
    scores = torch.logsumexp(20.0 * torch.einsum("nd,kpd->nkp", images, classes), 2)
    assert torch.equal(clip.zero_shot_classify(images, classes, logit_scale=20.0), scores.argmax(1))
    e = torch.eye(3)
    one_sure = torch.stack([e[[0, 0]], torch.stack([e[1], e[2]])])   # class 1: a prompt at the image, one far
    image = e[1][None]
    assert clip.zero_shot_classify(image, one_sure, logit_scale=50.0).item() == 1
    prompts = clip.class_prompts("color")
    assert len(prompts) == 6 and len(prompts[0]) == 5 * 2 * 9 and "red" in prompts[0][0]
    assert len(clip.class_prompts("triple")) == 60
    with pytest.raises(ValueError, match="attribute"):
        clip.class_prompts("texture")


def test_training_learns_on_a_small_batch(batch):
    model = tiny(image_layers=[1, 1, 1, 1], image_width=8)      # open_clip's ResNet tower
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    b = {"image": batch["image"][:8], "caption": batch["caption"][:8]}
    losses = []
    for _ in range(30):
        loss, logs = clip.clip_loss(model.train(), b)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and losses[-1] < 0.1 * losses[0]
    assert logs["batch_accuracy"] == 1.0


# ----------------------------------------------------------------------------- exercise checks

def test_checks_pass_the_reference():
    checks.contrastive_loss(clip.contrastive_loss)
    checks.zero_shot_classify(lambda img, cls, scale: clip.zero_shot_classify(img, cls, scale))


@pytest.mark.parametrize("wrong, match", [
    (lambda i, t, s: F.cross_entropy(s * i @ t.T, torch.arange(len(i))), "one direction"),
    (lambda i, t, s: 0.5 * (F.cross_entropy(i @ t.T, torch.arange(len(i))) +
                            F.cross_entropy(t @ i.T, torch.arange(len(i)))), "temperature"),
    (lambda i, t, s: F.cross_entropy(s * i @ t.T, torch.arange(len(i))) +
     F.cross_entropy(s * t @ i.T, torch.arange(len(i))), "average"),
    (lambda i, t, s: 0.5 * (F.cross_entropy(s * i @ t.T / 0.07, torch.arange(len(i))) +
                            F.cross_entropy(s * t @ i.T / 0.07, torch.arange(len(i)))), "already"),
])
def test_contrastive_check_catches_mistakes(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        checks.contrastive_loss(wrong)


def _lse(scale=10.0):
    return lambda img, cls, s: torch.logsumexp(scale * torch.einsum("nd,kpd->nkp", img, cls), 2)


@pytest.mark.parametrize("wrong, match", [
    (lambda img, cls, s: _lse()(img, cls, s).argmax(0), "shape"),
    (lambda img, cls, s: _lse()(img, cls, s), "shape"),
    (lambda img, cls, s: clip.zero_shot_classify(img, cls), "averaged the prompt embeddings"),
    (lambda img, cls, s: (s * torch.einsum("nd,kpd->nkp", img, cls)).amax(2).argmax(1), "max"),
    (lambda img, cls, s: (s * torch.einsum("nd,kpd->nkp", img, cls)).mean(2).argmax(1), "averaged the logits"),
    (lambda img, cls, s: _lse(1.0)(img, cls, s).argmax(1), "logit_scale is missing"),
    (lambda img, cls, s: _lse()(img, cls, s).argmin(1), "argmin"),
    (lambda img, cls, s: _lse()(img, cls, s).argmax(1).float(), "indices"),
])
def test_zero_shot_check_catches_mistakes(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        checks.zero_shot_classify(wrong)


# ----------------------------------------------------------------------------- recipe and adapter

def test_recipe_trains_caches_and_reports(tmp_path):
    recipe = recipes.get("clip")
    assert recipe.sample is None and recipe.report is not None
    model = recipes.load("clip", "smoke", cache=tmp_path, progress=False)
    again = recipes.load("clip", "smoke", cache=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    history = recipes.training_history("clip", "smoke", cache=tmp_path)
    assert history and "logit_scale" in history[0]
    numbers = clip.evaluate(model, n=32)
    for key in ("r1_text_to_image", "r1_image_to_text", "zero_shot_shape", "zero_shot_color",
                "triple_accuracy_heldout", "r1_exact_ceiling"):
        assert 0 <= numbers[key] <= 1


def test_pretrained_adapter_loads_a_local_open_clip_checkpoint(tmp_path, batch):
    import open_clip
    import safetensors.torch
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 48, "layers": 1, "width": 32, "head_width": 32,
                                              "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-test-clip.json")
    torch.manual_seed(0)
    original = open_clip.create_model("tiny-test-clip").eval()
    safetensors.torch.save_file(original.state_dict(), str(tmp_path / "weights.safetensors"))
    adapted = clip.load_pretrained("tiny-test-clip", tmp_path / "weights.safetensors")
    assert not any(p.requires_grad for p in adapted.parameters())
    captions = batch["caption"][:3]
    expected = original.encode_text(open_clip.get_tokenizer("tiny-test-clip")(captions), normalize=True)
    assert torch.allclose(adapted.encode_text(captions), expected, atol=1e-6)
    v = adapted.encode_image(batch["image"][:2])       # 32x32 Shapes images, resized to 48x48
    assert v.shape == (2, 16) and torch.allclose(v.norm(dim=-1), torch.ones(2), atol=1e-5)
    states, mask = adapted.text_states(captions)
    assert states.shape == (3, 77, 32) and mask.sum(1).max() < 20
    with pytest.raises(FileNotFoundError, match="no open_clip checkpoint"):
        clip.load_pretrained("tiny-test-clip", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        adapted.encode_image(batch["image"][:2] * 3)


def test_two_object_twins_differ_only_in_the_swapped_attribute():
    a, b = [0, 0, 1, 0], [1, 4, 0, 8]        # a big red circle at the top left, a small blue square at the bottom right
    own = data.caption([a, b])
    colors = data.caption([[0, 4, 1, 0], [1, 0, 0, 8]])
    cells = data.caption([[0, 0, 1, 8], [1, 4, 0, 0]])
    assert own == "a big red circle above a small blue square"
    assert colors == "a big blue circle above a small red square"
    assert cells == "a big red circle below a small blue square"
    assert data.parse_caption(colors).objects[0].color == 4 and data.parse_caption(cells).relation == "below"


def test_two_object_report_is_in_range_for_an_untrained_model():
    torch.manual_seed(0)
    model = recipes.get("clip").build_model("smoke")
    out = clip.two_object_report(model, n=24)
    for key in ("two_object_r1_image_to_text_same_scene", "two_object_r1_text_to_image_same_scene",
                "two_object_color_swap_accuracy", "two_object_relation_swap_accuracy"):
        assert 0.0 <= out[key] <= 1.0, key
