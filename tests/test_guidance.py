"""Chapters 09-11: DiffusionModel (diffusion_model.py), classifier guidance and CFG (guidance.py), their recipes
(recipes/diffusion.py). Math and behaviour."""
import math

import pytest
import torch
from torch import nn

from minidalle2 import data, diffusion, diffusion_model, guidance
from minidalle2.diffusion_model import DiffusionModel
from minidalle2.recipes import diffusion as recipe
from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.unet import NoisyClassifier, UNet

TINY = dict(widths=[8, 16], patch_size=2, attention_levels=[1])


def tiny_model(num_classes=None, p_uncond=0.0, **process):
    torch.manual_seed(0)
    conditions = {"cond": p_uncond} if num_classes is not None or p_uncond else None
    return recipe.unet_diffusion(TINY | {"num_classes": num_classes}, conditions=conditions, **process)


class LinearClassifier(nn.Module):
    """logits = W flatten(x): grad_x log softmax(Wx)_y = W_y - sum_k p_k W_k, in closed form."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.weight = nn.Parameter(torch.randn(3, 3 * 32 * 32) * 0.01)

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T


# ----------------------------------------------------------------------------- DiffusionModel

def test_config_round_trip_rebuilds_the_same_model(tmp_path):
    model = tiny_model(prediction="v", weighting="min_snr", num_classes=30, p_uncond=0.1)
    save_model(model, tmp_path / "m", "diffusion")
    loaded = load_model(tmp_path / "m", DiffusionModel.factory(UNet), "diffusion")
    assert loaded.prediction == "v" and loaded.weighting == "min_snr" and loaded.conditions == {"cond": 0.1}
    x, t, c = torch.randn(2, 3, 32, 32), torch.tensor([3, 900]), torch.tensor([0, 29])
    torch.testing.assert_close(loaded(x, t, c), model(x, t, c))


@pytest.mark.parametrize("kwargs, words", [
    (dict(prediction="noise"), "prediction"), (dict(weighting="snr"), "weighting"),
    (dict(p_uncond=1.0), "drop probability"), (dict(p_uncond=0.1), "has none")])
def test_bad_process_settings_are_named(kwargs, words):
    with pytest.raises(ValueError, match=words):
        tiny_model(**kwargs)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_loss_is_diffusion_loss_with_the_models_settings(prediction):
    model = tiny_model(prediction=prediction, weighting="min_snr")
    batch = {"image": torch.rand(4, 3, 32, 32) * 2 - 1}
    got, _ = model.loss(batch, generator=torch.Generator().manual_seed(3))
    want, _ = diffusion.diffusion_loss(model, batch, model.schedule, prediction, "min_snr",
                                       generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)


def test_generate_is_seeded_in_range_and_batched_like_one_call():
    model = tiny_model(prediction="v")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # an untrained net outputs 0; make it do something
    a = model.generate(5, steps=4, seed=7, bf16=False)
    b = model.generate(5, steps=4, seed=7, bf16=False)
    assert a.shape == (5, 3, 32, 32) and a.abs().max() <= 1
    torch.testing.assert_close(a, b)
    in_parts = model.generate(5, steps=4, seed=7, bf16=False, batch_size=3)
    torch.testing.assert_close(in_parts[:3], model.generate(3, steps=4, seed=7, bf16=False))  # the first batch's call
    assert not torch.equal(model.generate(5, steps=4, seed=8, bf16=False), a)


def test_generate_rejects_bad_input():
    uncond, cond = tiny_model(), tiny_model(num_classes=30, p_uncond=0.1)
    with pytest.raises(ValueError, match="unconditional"):
        uncond.generate(2, cond=torch.tensor([0, 1]), steps=2)
    with pytest.raises(ValueError, match="positive number"):
        uncond.generate(0, steps=2)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance scale"):
            cond.generate(2, cond=torch.tensor([0, 1]), guidance=bad, steps=2)
    with pytest.raises(ValueError, match="out of range"):
        cond.generate(2, cond=torch.tensor([0, 30]), guidance=2.0, steps=2)
    with pytest.raises(ValueError, match="steps"):
        uncond.generate(2, steps=0)


def test_a_conditional_model_overfits_one_batch():
    model = tiny_model(prediction="x0", num_classes=30)
    data_batch = diffusion_model.class_batch(data.ShapesDataset(8, "train", num_objects=1).get_batch(torch.arange(8)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(100):
        loss, _ = model.loss(data_batch, generator=torch.Generator().manual_seed(0))  # the same t and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


# ----------------------------------------------------------------------------- classifier guidance

def test_log_prob_gradient_matches_the_closed_form_of_a_linear_classifier():
    clf = LinearClassifier()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 1])
    got = guidance.class_log_prob_gradient(clf, x, torch.zeros(4, dtype=torch.long), y)
    w = clf.weight.detach()
    p = torch.softmax(x.flatten(1) @ w.T, -1)
    want = (w[y] - p @ w).reshape(x.shape)             # grad log softmax_y = W_y - E_p[W]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_classifier_guidance_shifts_eps_by_the_stated_rule_in_every_parameterisation(prediction):
    schedule, clf = diffusion.Schedule("linear"), LinearClassifier()
    x_t, y, s = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]), 2.5
    t = torch.tensor([10, 500, 990])
    pred = torch.randn_like(x_t)
    guided = guidance.classifier_guidance(clf, schedule, y, s, prediction)(x_t, t, pred)
    _, eps = diffusion.predict_x0_eps(schedule, x_t, t, pred, prediction)
    _, eps_guided = diffusion.predict_x0_eps(schedule, x_t, t, guided, prediction)
    sigma = (1 - schedule.alphas_cumprod[t]).sqrt().float().reshape(-1, 1, 1, 1)
    want = eps - s * sigma * guidance.class_log_prob_gradient(clf, x_t, t, y)   # eps' = eps - s sqrt(1-abar) grad
    torch.testing.assert_close(eps_guided, want, atol=1e-4, rtol=1e-4)


def test_for_ddpm_the_rule_shifts_the_reverse_mean_by_s_beta_over_sqrt_alpha_times_the_gradient():
    schedule, clf = diffusion.Schedule("linear"), LinearClassifier()
    x_t, y, s, t = torch.randn(2, 3, 32, 32) * 0.3, torch.tensor([1, 2]), 3.0, 400
    eps = torch.randn_like(x_t)
    tt = torch.full((2,), t)
    guided = guidance.classifier_guidance(clf, schedule, y, s, "eps")(x_t, tt, eps)
    zero = torch.zeros_like(x_t)
    mean = diffusion.ddpm_step(schedule, eps, t, x_t, clip_x0=False, noise=zero)[0]
    mean_guided = diffusion.ddpm_step(schedule, guided, t, x_t, clip_x0=False, noise=zero)[0]
    beta, alpha = schedule.betas[t].item(), 1 - schedule.betas[t].item()
    grad = guidance.class_log_prob_gradient(clf, x_t, tt, y)
    torch.testing.assert_close(mean_guided - mean, s * beta / math.sqrt(alpha) * grad, atol=1e-5, rtol=1e-3)


def test_scale_zero_changes_nothing_and_bad_scales_or_classes_are_named():
    schedule, clf = diffusion.Schedule("linear"), LinearClassifier()
    x_t, pred, t = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.tensor([5, 6])
    assert torch.equal(guidance.classifier_guidance(clf, schedule, torch.tensor([0, 1]), 0.0)(x_t, t, pred), pred)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="classifier guidance scale"):
            guidance.classifier_guidance(clf, schedule, torch.tensor([0, 1]), bad)
    with pytest.raises(ValueError, match="out of range"):
        guidance.classifier_guidance(clf, schedule, torch.tensor([0, 3]), 1.0)
    with pytest.raises(ValueError, match="1-D tensor of integer"):
        guidance.classifier_guidance(clf, schedule, torch.tensor([0.5, 1.0]), 1.0)


def test_smoothed_gradient_is_the_mean_gradient_at_perturbed_copies_and_plain_at_zero_noise():
    clf, y, t = LinearClassifier(), torch.tensor([0, 2]), torch.tensor([100, 700])
    x = torch.randn(2, 3, 32, 32)
    std = torch.tensor([0.5, 2.0]).reshape(-1, 1, 1, 1)
    got = guidance.smoothed_class_log_prob_gradient(clf, x, t, y, std, 3, torch.Generator().manual_seed(7))
    noise = torch.randn((3, *x.shape), generator=torch.Generator().manual_seed(7))
    want = sum(guidance.class_log_prob_gradient(clf, x + std * noise[k], t, y) for k in range(3)) / 3
    torch.testing.assert_close(got, want)
    plain = guidance.class_log_prob_gradient(clf, x, t, y)
    assert not torch.allclose(got, plain, atol=1e-4)
    torch.testing.assert_close(guidance.smoothed_class_log_prob_gradient(clf, x, t, y, 0.0, 3), plain)


def test_smoothed_guidance_shifts_eps_by_the_smoothed_gradient_at_rho_times_the_noise_level():
    schedule, clf = diffusion.Schedule("cosine"), LinearClassifier()
    x_t, y, t, s, rho = torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([50, 900]), 3.0, 2.0
    eps = torch.randn_like(x_t)
    guided = guidance.classifier_guidance(clf, schedule, y, s, "eps", smoothing=rho, smoothing_samples=2, seed=5)
    sigma = (1 - schedule.alphas_cumprod[t]).sqrt().float().reshape(-1, 1, 1, 1)
    grad = guidance.smoothed_class_log_prob_gradient(clf, x_t, t, y, rho * sigma, 2, torch.Generator().manual_seed(5))
    torch.testing.assert_close(guided(x_t, t, eps), eps - s * sigma * grad, atol=1e-5, rtol=1e-4)
    for bad, words in ((dict(smoothing=-1.0), "smoothing must be"), (dict(smoothing=float("nan")), "smoothing must be"),
                       (dict(smoothing_samples=0), "smoothing_samples must be"),
                       (dict(smoothing_samples=2.5), "smoothing_samples must be")):
        with pytest.raises(ValueError, match=words):
            guidance.classifier_guidance(clf, schedule, y, s, **bad)


def test_smoothed_guided_generate_is_seeded():
    model, clf, y = tiny_model(prediction="v"), LinearClassifier(), torch.tensor([0, 1])
    run = lambda seed: guidance.classifier_guided_generate(model, clf, y, 20.0, smoothing=2.0, steps=3, seed=seed)
    torch.testing.assert_close(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    plain = guidance.classifier_guided_generate(model, clf, y, 20.0, steps=3, seed=3)
    assert not torch.allclose(run(3), plain)


def test_a_classifier_on_another_device_than_the_model_is_named():
    model, clf = tiny_model(prediction="v"), LinearClassifier().to("meta")  # "meta": a second device on any machine
    with pytest.raises(ValueError, match="diffusion model is on cpu but the classifier on meta"):
        guidance.classifier_guided_generate(model, clf, torch.tensor([0, 1]), 1.0, steps=2)


def test_a_classifier_trained_on_another_schedule_is_refused_by_name():
    clf = NoisyClassifier(num_classes=30, widths=[8, 16], patch_size=2, schedule="linear")
    cosine = diffusion.Schedule("cosine")
    batch = data.ShapesDataset(4, "train", num_objects=1).get_batch(torch.arange(4))
    for call in (lambda: guidance.classifier_guidance(clf, cosine, torch.tensor([0, 1]), 1.0),
                 lambda: guidance.noisy_classifier_loss(clf, batch, cosine),
                 lambda: guidance.accuracy_by_timestep(clf, cosine, n=4)):
        with pytest.raises(ValueError, match="'linear' schedule with T = 1000, but was given the 'cosine' schedule"):
            call()
    with pytest.raises(ValueError, match="T = 1000, but .* T = 500"):
        guidance.classifier_guidance(clf, diffusion.Schedule("linear", 500), torch.tensor([0]), 1.0)
    # the zoo's classifier is built for the zoo's diffusion process
    assert recipe.CLASSIFIER_GUIDANCE.build_model("smoke").config["schedule"] == recipe.PROCESS["schedule"]
    assert recipe.classifier_schedule().name == recipe.PROCESS["schedule"]


def test_classifier_guided_generate_runs_and_the_classifier_moves_the_samples():
    model = tiny_model(prediction="v")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    clf = LinearClassifier()
    y = torch.tensor([0, 1, 2])
    plain = guidance.classifier_guided_generate(model, clf, y, 0.0, steps=3)
    guided = guidance.classifier_guided_generate(model, clf, y, 50.0, steps=3)
    assert plain.shape == guided.shape == (3, 3, 32, 32)
    torch.testing.assert_close(plain, model.generate(3, steps=3))   # scale 0 is the unguided sampler
    p_plain = torch.softmax(clf(plain, None), -1)[torch.arange(3), y]
    p_guided = torch.softmax(clf(guided, None), -1)[torch.arange(3), y]
    assert (p_guided > p_plain).all()


def test_the_classifier_guidance_recipe_declares_the_ddpm_it_guides():
    # the zoo hands the same preset's ddpm to its sampler (no side channel on the classifier)
    assert recipe.CLASSIFIER_GUIDANCE.needs == (recipe.DDPM,)
    with pytest.raises(TypeError, match="needs"):
        recipe.sample_classifier_guided(recipe.CLASSIFIER_GUIDANCE.build_model("smoke"), ["a red circle"], 1, 0)


def test_generate_defaults_to_the_library_sampler_and_guided_generate_passes_eta_on():
    model = tiny_model(prediction="v")
    default = model.generate(2, steps=4, seed=1)
    torch.testing.assert_close(default, model.generate(2, steps=4, eta=diffusion_model.SAMPLE_ETA, seed=1))
    assert not torch.allclose(default, model.generate(2, steps=4, eta=1.0 - diffusion_model.SAMPLE_ETA, seed=1))
    assert model.generate(2, method="ddpm", steps=4, seed=1).shape == (2, 3, 32, 32)   # DDPM has no eta to default
    clf, y = LinearClassifier(), torch.tensor([0, 2])
    for eta in (0.0, 1.0):
        guide = guidance.classifier_guidance(clf, model.schedule, y, 3.0, model.prediction)
        torch.testing.assert_close(guidance.classifier_guided_generate(model, clf, y, 3.0, steps=4, eta=eta, seed=1),
                                   model.generate(2, guidance=guide, steps=4, eta=eta, seed=1))


def test_noisy_classifier_loss_and_accuracy_by_timestep():
    torch.manual_seed(0)
    clf = NoisyClassifier(num_classes=30, widths=[8, 16], patch_size=2)
    batch = data.ShapesDataset(16, "train", num_objects=1).get_batch(torch.arange(16))
    loss, logs = guidance.noisy_classifier_loss(clf, batch, diffusion.Schedule("linear"))
    assert loss.ndim == 0 and abs(loss.item() - math.log(30)) < 0.5 and 0 <= logs["accuracy"] <= 1
    acc = guidance.accuracy_by_timestep(clf, diffusion.Schedule("linear"), n=40)
    assert list(acc) == ["t 0-249", "t 250-499", "t 500-749", "t 750-999"]
    assert all(0 <= v <= 1 for v in acc.values())


# ----------------------------------------------------------------------------- classes and prompts

def test_class_prompts_are_balanced_and_read_back_by_the_caption_parser():
    classes, prompts = data.pair_prompts(90, seed=4)
    assert torch.equal(torch.bincount(classes, minlength=30), torch.full((30,), 3))
    assert torch.equal(guidance.classes_from_prompts(prompts), classes)
    assert data.pair_caption(data.pair_id(2, 4)) == "a blue triangle"


def test_prompts_a_class_model_cannot_draw_are_named():
    for bad in ("a red circle above a blue square", "a circle"):
        with pytest.raises(ValueError, match="one object of a given shape and colour"):
            guidance.classes_from_prompts([bad])
    with pytest.raises(ValueError, match="out of range"):
        data.pair_caption(30)
    for bad in (None, "a red circle", []):
        with pytest.raises(ValueError, match="list of one-object prompts"):
            guidance.classes_from_prompts(bad)


def test_guidance_sweep_scores_each_scale_with_the_oracle():
    def exact_renders(classes, scale):    # a perfect "generator": real renders of the class captions
        return data.render(data.scenes_from_prompts([data.pair_caption(c) for c in classes.tolist()], seed=1))
    rows = recipe.guidance_sweep(exact_renders, [0.0, 2.0], n=60)
    assert [r["scale"] for r in rows] == [0.0, 2.0]
    assert all(r["caption_accuracy"] > 0.95 and "diversity_per_prompt" in r for r in rows)


# ----------------------------------------------------------------------------- exercise checks

from minidalle2.course.checks import CheckFailed  # noqa: E402
from minidalle2.course.checks import diffusion as checks  # noqa: E402


def _grad_of(select):
    def fn(classifier, x_t, t, y):
        x = x_t.detach().requires_grad_(True)
        return torch.autograd.grad(select(classifier(x, t))[torch.arange(len(y)), y].sum(), x)[0]
    return fn


def test_checks_pass_the_library_versions():
    checks.q_sample(lambda x0, t, noise, abar: diffusion.q_sample(diffusion.Schedule("linear"), x0, t, noise))
    checks.ddpm_mean(lambda x_t, eps, t, betas: diffusion.ddpm_step(
        diffusion.Schedule("linear"), eps, t, x_t, clip_x0=False, noise=torch.zeros_like(x_t))[0])
    checks.log_prob_gradient(guidance.class_log_prob_gradient)
    checks.guided_eps(lambda eps, grad, abar, s: eps - s * math.sqrt(1 - abar) * grad)
    checks.smoothed_gradient(lambda grad_fn, x, std, noise: sum(grad_fn(x + std * n) for n in noise) / len(noise))
    def library_cfg(c, u, w):   # a "network" that answers c with a class and u without one
        k = lambda x: len(x) // len(c)
        net = lambda x, t, cond: torch.where(cond[:, None, None, None] >= 0, c.repeat(k(x), 1, 1, 1), u.repeat(k(x), 1, 1, 1))
        return diffusion.guided_prediction(net, c, 5, torch.zeros(len(c), dtype=torch.long), w)
    checks.cfg_combine(library_cfg)
    checks.drop_labels(lambda labels, p, g: diffusion.drop_condition(labels, p, g))


@pytest.mark.parametrize("check, wrong, match", [
    (checks.q_sample, lambda x0, t, n, ab: ab[t].reshape(-1, 1, 1, 1) * x0 + (1 - ab[t].reshape(-1, 1, 1, 1)) * n,
     "square roots"),
    (checks.ddpm_mean, lambda x, e, t, b: x - b[t] / (1 - torch.cumprod(1 - b, 0)[t]).sqrt() * e, "1 / sqrt"),
    (checks.log_prob_gradient, _grad_of(lambda logits: logits), "not of the log-probability"),
    (checks.log_prob_gradient, _grad_of(lambda logits: logits.softmax(-1)), "gradient of the probability"),
    (checks.guided_eps, lambda e, g, ab, s: e + s * math.sqrt(1 - ab) * g, "the sign"),
    (checks.smoothed_gradient, lambda g, x, std, noise: g(x), "plain gradient at x_t"),
    (checks.smoothed_gradient, lambda g, x, std, noise: sum(g(x + std * n) for n in noise), "do not sum"),
    (checks.smoothed_gradient, lambda g, x, std, noise: g(x + std * noise.mean(0)), "not the perturbations"),
    (checks.cfg_combine, lambda c, u, w: c + w * (c - u), "convention"),
    (checks.drop_labels, lambda labels, p, g: labels.masked_fill_(torch.rand(len(labels), generator=g) < p, -1),
     "in place"),
    (checks.drop_labels, lambda labels, p, g: torch.where(torch.rand(len(labels), generator=g) < 0.5, -1, labels),
     "about 20%"),
])
def test_checks_name_common_mistakes(check, wrong, match):
    with pytest.raises(CheckFailed, match=match):
        check(wrong)


def test_time_to_quality_scores_a_fresh_model_every_k_steps():
    rows = recipe.time_to_quality("cfg", "smoke", steps=10, every=5, images=30)
    assert [r["step"] for r in rows] == [5, 10]
    assert all(set(r) == {"step", "minutes", "validity", "fid", "coverage", "caption_accuracy", "guidance"} for r in rows)
    assert rows[0]["guidance"] == recipe.CFG_SCALE
    assert rows[0]["minutes"] < rows[1]["minutes"]
    with pytest.raises(ValueError, match="recipe must be"):
        recipe.time_to_quality("gan", "smoke")


def test_the_classifier_guidance_curve_guides_a_fresh_ddpm_with_the_zoo_classifier(monkeypatch, tmp_path):
    from minidalle2.lab import zoo
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    calls = []
    real = guidance.classifier_guided_generate
    monkeypatch.setattr(recipe, "classifier_guided_generate",
                        lambda model, clf, classes, scale, **kw: calls.append(
                            (type(clf).__name__, scale, kw["smoothing"], len(classes))) or real(model, clf, classes, scale, **kw))
    rows = recipe.time_to_quality("classifier_guidance", "smoke", steps=10, every=10, images=12)
    assert calls == [("NoisyClassifier", recipe.CLASSIFIER_SCALE, recipe.CLASSIFIER_SMOOTHING, 12)]
    assert [r["step"] for r in rows] == [10] and 0 <= rows[0]["caption_accuracy"] <= 1
    assert rows[0]["guidance"] == recipe.CLASSIFIER_SCALE
    assert (tmp_path / "classifier_guidance" / "smoke" / "model.safetensors").exists()   # the zoo's classifier
