"""Chapter 04 (VAE): the maths of the two key formulas, the likelihood, the objective, the recipe."""
import math

import pytest
import torch

from minidalle2 import recipes, vae
from minidalle2.recipes import vae as vae_recipes
from minidalle2.course.checks import CheckFailed
from minidalle2.course.checks import vae as checks
from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.data import ShapesDataset
from minidalle2.lab.train import TrainConfig
from minidalle2.lab.train import train

TINY = dict(latent_dim=4, widths=(8, 8, 8))


def tiny(**kw):
    torch.manual_seed(0)
    return vae.VAE(**{**TINY, **kw})


@pytest.fixture(scope="module")
def images():
    return ShapesDataset(64, "train", seed=0).get_batch(torch.arange(64))["image"]


# ----------------------------------------------------------------------------- formulas

def test_reparameterize_mean_std_and_gradients():
    mu, logvar = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, -2.0])
    n = 200_000
    z = vae.reparameterize(mu.expand(n, 3), logvar.expand(n, 3), torch.Generator().manual_seed(0))
    sigma = torch.exp(logvar / 2)
    assert ((z.mean(0) - mu).abs() < 5 * sigma / math.sqrt(n)).all()
    assert torch.allclose(z.std(0), sigma, rtol=0.01)
    mu_g, logvar_g = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    g = torch.Generator().manual_seed(1)
    vae.reparameterize(mu_g, logvar_g, g).sum().backward()
    eps = torch.randn(3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mu_g.grad, torch.ones(3))
    assert torch.allclose(logvar_g.grad, 0.5 * sigma * eps)   # dz/dlogvar = sigma eps / 2


def test_gaussian_kl_matches_torch_and_monte_carlo():
    mu, logvar = torch.tensor([0.0, 1.5, -0.7]), torch.tensor([0.0, -1.0, 0.8])
    kl = vae.gaussian_kl(mu, logvar)
    q, p = torch.distributions.Normal(mu, torch.exp(logvar / 2)), torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p), atol=1e-6)
    assert kl[0] == 0   # N(0, 1) against itself
    z = q.sample(torch.Size([200_000]))
    log_ratio = q.log_prob(z) - p.log_prob(z)                 # KL = E_q[log q(z) - log p(z)]
    se = log_ratio.std(0) / math.sqrt(len(z))
    assert ((log_ratio.mean(0) - kl).abs() < 5 * se + 1e-4).all()


def test_discretized_logistic_is_a_distribution_over_256_levels():
    levels = torch.arange(256) / 127.5 - 1                    # the grid of 8-bit pixels in [-1, 1]
    for mean, log_scale in [(0.0, -3.0), (0.93, -6.5), (-1.0, -1.0), (0.3, 1.0), (1.2, -4.0)]:
        logp = vae.discretized_logistic_log_prob(levels, torch.full((256,), mean), torch.full((256,), log_scale))
        assert torch.isfinite(logp).all() and (logp <= 1e-6).all()
        assert math.isclose(logp.exp().sum().item(), 1.0, abs_tol=2e-4), (mean, log_scale)
    # an interior bin is the CDF difference
    x, m, s = torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([-2.0])
    cdf = lambda v: torch.sigmoid((v - m) / s.exp())
    assert torch.allclose(vae.discretized_logistic_log_prob(x, m, s).exp(), cdf(x + 1 / 255) - cdf(x - 1 / 255))


# ----------------------------------------------------------------------------- model and objective

def test_shapes_sampling_and_config_round_trip(tmp_path, images):
    model = tiny(scale="channel").eval()
    mu, logvar = model.encode(images[:5])
    assert mu.shape == logvar.shape == (5, 4)
    mean, log_scale = model.decode(mu)
    assert mean.shape == log_scale.shape == (5, 3, 32, 32)
    s = model.sample(6, seed=3)
    assert s.shape == (6, 3, 32, 32) and s.min() >= -1 and s.max() <= 1
    assert torch.equal(s, model.sample(6, seed=3)) and not torch.equal(s, model.sample(6, seed=4))
    save_model(model, tmp_path / "m", "vae")
    again = load_model(tmp_path / "m", vae.VAE, "vae").eval()
    assert torch.equal(again.sample(6, seed=3), s)


def test_bad_inputs_get_clear_errors(images):
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode(images[:2, :, :16, :16])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode(images[:2, :1])
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        model.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="positive"):
        model.sample(0)
    with pytest.raises(ValueError, match="scale"):
        vae.VAE(scale="global")
    with pytest.raises(ValueError, match="shape"):
        vae.traverse(model, torch.zeros(3), [0], [0.0, 1.0])


def test_loss_is_the_negative_elbo_with_matching_reductions(images):
    model = tiny()
    x = images[:8]
    torch.manual_seed(5)
    loss, logs = vae.vae_loss(model.eval(), {"image": x})      # eval: no warm-up step counted, beta = 1
    torch.manual_seed(5)
    mu, logvar = model.encode(x)
    z = vae.reparameterize(mu, logvar)
    log_px_z = vae.discretized_logistic_log_prob(x, *model.decode(z))
    expected = vae.negative_elbo(log_px_z, vae.gaussian_kl(mu, logvar), beta=1.0)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert math.isclose(logs["bits_per_dim"], expected.item() / (3072 * math.log(2)), rel_tol=1e-4)


def test_kl_warmup_ramps_and_resumes(tmp_path, images):
    model = tiny(kl_warmup_steps=10)
    assert model.beta == 0.0
    dataset = ShapesDataset(64, "train", seed=0)
    config = TrainConfig(steps=6, batch_size=8, lr=1e-3, checkpoint_every=3)
    result = train(model, vae.vae_loss, dataset, config, run_dir=tmp_path / "a", progress=False)
    assert [h["beta"] for h in result.history] == pytest.approx([0.1 * s for s in range(1, 7)])
    # stop at 3, resume to 6: the same weights and the same ramp as one straight run
    half = train(tiny(kl_warmup_steps=10), vae.vae_loss, dataset, config.replace(steps=3),
                 run_dir=tmp_path / "b", progress=False)
    resumed = train(tiny(kl_warmup_steps=10), vae.vae_loss, dataset, config, run_dir=tmp_path / "b", progress=False)
    assert half.step == 3 and resumed.model.train_step.item() == 6
    for a, b in zip(result.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    model.eval()
    before = model.train_step.item()
    vae.vae_loss(model, {"image": images[:4]})                 # evaluation does not advance the ramp
    assert model.train_step.item() == before


def test_overfits_one_batch_and_elbo_below_importance_estimate(images):
    model = tiny(latent_dim=8)
    x = images[:8]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(step)
        loss, _ = vae.vae_loss(model.train(), {"image": x})
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    elbo = -vae.evaluate(model, x, seed=0)["elbo_bits_per_dim"]
    log_px = vae.bits_per_dim(vae.importance_log_likelihood(model, x, k=32).mean(), 3072).item()
    assert log_px >= elbo - 1e-3      # log p(x) >= ELBO, and IWAE with k samples sits in between


def test_evaluate_reports_consistent_numbers(images):
    model = tiny().eval()
    out = vae.evaluate(model, images[:20], batch_size=8)
    assert out["elbo_bits_per_dim"] == pytest.approx(out["nll_bits_per_dim"] + out["kl_bits_per_dim"])
    assert sum(out["kl_per_dim"]) == pytest.approx(out["kl_nats"], rel=1e-4)
    assert 0 <= out["active_units"] <= 4 and len(out["activity"]) == 4


# ----------------------------------------------------------------------------- exercise checks

def test_checks_pass_the_reference():
    checks.reparameterize(lambda mu, logvar: vae.reparameterize(mu, logvar))
    checks.gaussian_kl(vae.gaussian_kl)
    checks.negative_elbo(vae.negative_elbo)


@pytest.mark.parametrize("wrong, match", [
    (lambda mu, logvar: mu + torch.exp(logvar) * torch.randn_like(mu), "exp\\(logvar / 2\\)"),
    (lambda mu, logvar: mu + logvar * torch.randn_like(mu), "logvar itself"),
    (lambda mu, logvar: mu + torch.exp(logvar / 2) * torch.rand_like(mu), "N\\(0, 1\\)"),
    (lambda mu, logvar: (mu + torch.exp(logvar / 2) * torch.randn_like(mu)).detach(), "autograd"),
])
def test_reparameterize_check_catches_mistakes(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        checks.reparameterize(wrong)


@pytest.mark.parametrize("wrong, match", [
    (lambda mu, logvar: (mu ** 2 + logvar.exp() - 1 - logvar), "0.5"),
    (lambda mu, logvar: 0.5 * (mu ** 2 + logvar.exp() ** 2 - 1 - 2 * logvar), "exp\\(logvar\\)"),
    (lambda mu, logvar: 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(), "sum over all"),
    (lambda mu, logvar: 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).mean(), "mean over all"),
    (lambda mu, logvar: 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).detach(), "autograd"),
])
def test_kl_check_catches_mistakes(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        checks.gaussian_kl(wrong)


@pytest.mark.parametrize("wrong, match", [
    (lambda lp, kl, beta: -lp.mean() + beta * kl.sum(1).mean(), "MEAN over pixels"),
    (lambda lp, kl, beta: (-lp.flatten(1).sum(1) + beta * kl.sum(1)).sum(), "over the batch"),
    (lambda lp, kl, beta: (-lp.flatten(1).sum(1) + kl.sum(1)).mean(), "beta"),
])
def test_negative_elbo_check_catches_mistakes(wrong, match):
    with pytest.raises(CheckFailed, match=match):
        checks.negative_elbo(wrong)


# ----------------------------------------------------------------------------- the recipe

def test_recipe_round_trip_at_smoke(tmp_path):
    recipe = recipes.get("vae")
    assert recipe.sample is not None and not recipe.conditional
    model = recipes.load("vae", "smoke", cache=tmp_path, progress=False)
    again = recipes.load("vae", "smoke", cache=tmp_path, progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    images = recipe.sample(model, None, 5, 0)
    assert images.shape == (5, 3, 32, 32) and torch.equal(images, recipe.sample(again, None, 5, 0))
    numbers = vae_recipes.report(model, n=40, preset="smoke")
    for key in ("psnr", "recon_caption_accuracy", "recon_validity", "elbo_bits_per_dim", "active_units"):
        assert key in numbers


# ----------------------------------------------------------------------------- the learned prior

def _two_clusters(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(n // 4, 2, generator=g) * 0.1 + torch.tensor([3.0, 0.0])       # weight 1/4
    second = torch.randn(3 * n // 4, 2, generator=g) * 0.3 + torch.tensor([-2.0, 1.0])  # weight 3/4
    return torch.cat([first, second])


def test_mixture_prior_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    log_w = torch.log_softmax(torch.randn(5, generator=g), 0)
    means, variances = torch.randn(5, 3, generator=g), torch.rand(5, 3, generator=g) + 0.1
    prior = vae.MixturePrior(log_w, means, variances)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=log_w),
        torch.distributions.Independent(torch.distributions.Normal(means, variances.sqrt()), 1))
    z = torch.randn(50, 3, generator=g) * 2
    assert torch.allclose(prior.log_prob(z), reference.log_prob(z), atol=1e-4)


def test_mixture_prior_em_recovers_two_clusters_and_samples_like_them():
    prior = vae.MixturePrior.fit(_two_clusters(), k=2, iters=30)
    order = prior.means[:, 0].argsort(descending=True)           # the cluster at x = 3 first
    assert torch.allclose(prior.means[order], torch.tensor([[3.0, 0.0], [-2.0, 1.0]]), atol=0.05)
    assert torch.allclose(prior.log_weights.exp()[order], torch.tensor([0.25, 0.75]), atol=0.02)
    assert torch.allclose(prior.variances[order].sqrt(), torch.tensor([[0.1, 0.1], [0.3, 0.3]]), atol=0.03)
    z = prior.sample(4000, seed=1)
    assert z.shape == (4000, 2) and torch.equal(z, prior.sample(4000, seed=1))
    assert abs((z[:, 0] > 0.5).float().mean().item() - 0.25) < 0.03
    # EM never lowers the likelihood it maximises
    data = _two_clusters()
    one, many = vae.MixturePrior.fit(data, k=2, iters=1), vae.MixturePrior.fit(data, k=2, iters=30)
    assert many.log_prob(data).mean() >= one.log_prob(data).mean()


def test_mixture_prior_bad_input_is_named():
    with pytest.raises(ValueError, match="k must be between 1 and the number of codes"):
        vae.MixturePrior.fit(torch.randn(10, 2), k=20)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        vae.MixturePrior.fit(torch.randn(10))
    prior = vae.MixturePrior.fit(torch.randn(100, 4), k=3)
    with pytest.raises(ValueError, match="MixturePrior"):
        prior.log_prob(torch.randn(5, 3))


def test_sample_with_prior_decodes_codes_from_the_fitted_mixture():
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=4, widths=(8, 16), log_scale_init=-4.0).eval()
    images = torch.rand(64, 3, 32, 32) * 2 - 1
    prior = vae.fit_mixture_prior(model, images, k=4)
    assert prior.means.shape == (4, 4)
    out = vae.sample_with_prior(model, prior, 10, seed=3)
    assert out.shape == (10, 3, 32, 32) and out.abs().max() <= 1
    assert torch.equal(out, vae.sample_with_prior(model, prior, 10, seed=3))
    # the log-scale start: every pixel's scale begins near exp(-4)
    assert model.decode(torch.zeros(2, 4))[1].mean().item() == pytest.approx(-4.0, abs=0.5)
