"""Checks of chapter 04 (VAE): the reparameterisation trick and the analytic Gaussian KL."""

import math

import torch

from ... import vae
from .core import CheckFailed, call, expect_close, expect_shape, passed


def _inputs(seed=0, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g)
    logvar = torch.randn(shape, generator=g) * 0.8 - 0.3   # sigma^2 from ~0.2 to ~3: mistakes show
    return mu, logvar


def reparameterize(fn):
    """fn(mu, logvar) -> z = mu + exp(logvar / 2) * eps with eps ~ N(0, I) (torch.randn_like is fine)."""
    name = "reparameterize"
    mu, logvar = _inputs()
    # 1. same global seed -> the same eps as the reference draws, so values can be compared exactly
    torch.manual_seed(123)
    z = call(fn, mu, logvar, name=name)
    expect_shape(z, mu.shape, f"{name}(mu, logvar)")
    torch.manual_seed(123)
    eps = torch.randn_like(mu)
    expected = mu + torch.exp(0.5 * logvar) * eps
    wrong = [(mu + torch.exp(logvar) * eps, "you used sigma = exp(logvar); logvar is log(sigma^2), so sigma = exp(logvar / 2)"),
             (mu + logvar * eps, "you multiplied eps by logvar itself; the standard deviation is exp(logvar / 2)"),
             (mu + torch.exp(0.5 * logvar), "eps is missing: z = mu + sigma * eps"),
             (mu, "z is mu itself: the noise sigma * eps is missing")]
    for value, hint in wrong:
        if torch.allclose(z.detach(), value, atol=1e-5):
            raise CheckFailed(f"{name}: wrong values - {hint}")
    # 2. statistics: whatever noise call you used, z must have mean mu and std exp(logvar / 2)
    n = 20000
    samples = call(fn, mu[:1].expand(n, -1), logvar[:1].expand(n, -1), name=name).detach()
    want_std = torch.exp(0.5 * logvar[0])
    if ((samples.mean(0) - mu[0]).abs() > 5 * want_std / math.sqrt(n)).any():
        raise CheckFailed(f"{name}: the mean of {n} samples is {samples.mean(0)[:3].tolist()}..., expected "
                          f"mu = {mu[0, :3].tolist()}...; is eps drawn from N(0, 1) (torch.randn_like, not rand_like)?")
    std = samples.std(0)
    if ((std / want_std - 1).abs() > 0.05).any():
        hint = (" - looks like sigma = exp(logvar) instead of exp(logvar / 2)"
                if torch.allclose(std, torch.exp(logvar[0]), rtol=0.05) else "")
        raise CheckFailed(f"{name}: the std of {n} samples is {std[:3].tolist()}..., expected "
                          f"exp(logvar / 2) = {want_std[:3].tolist()}...{hint}")
    if not torch.allclose(z.detach(), expected, atol=1e-5):
        print(f"({name}: your eps is not torch.randn_like(mu) drawn first, but the statistics are right)")
    # 3. gradients reach both mu and logvar: that is the whole point of the trick
    mu_g, logvar_g = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    torch.manual_seed(123)
    z = call(fn, mu_g, logvar_g, name=name)
    if not z.requires_grad:
        raise CheckFailed(f"{name}: z does not depend on mu and logvar through autograd "
                          "(did you use .detach(), .item() or torch.no_grad()?)")
    z.sum().backward()
    if mu_g.grad is None or logvar_g.grad is None:
        raise CheckFailed(f"{name}: no gradient reaches {'mu' if mu_g.grad is None else 'logvar'}")
    torch.manual_seed(123)
    eps = torch.randn_like(mu)
    expect_close(mu_g.grad, torch.ones_like(mu), f"{name}: d sum(z) / d mu", hint="dz/dmu must be 1")
    if torch.allclose(z.detach(), expected, atol=1e-5):
        expect_close(logvar_g.grad, 0.5 * torch.exp(0.5 * logvar) * eps, f"{name}: d sum(z) / d logvar",
                     hint="dz/dlogvar = 0.5 * exp(logvar / 2) * eps")
    return passed(name, "shape, mean and std over 20,000 draws, and gradients to mu and logvar")


def gaussian_kl(fn):
    """fn(mu, logvar) -> KL(N(mu, sigma^2) || N(0, 1)) per dimension, same shape as mu."""
    name = "gaussian_kl"
    mu, logvar = _inputs(1)
    kl = call(fn, mu, logvar, name=name)
    expected = vae.gaussian_kl(mu, logvar)
    if isinstance(kl, torch.Tensor) and kl.numel() == 1:
        total, mean = expected.sum().item(), expected.mean().item()
        what = ("the sum over all dimensions" if math.isclose(kl.item(), total, rel_tol=1e-4) else
                "the mean over all dimensions" if math.isclose(kl.item(), mean, rel_tol=1e-4) else "one number")
        raise CheckFailed(f"{name}: returned {what}; return the KL of every dimension, shape {tuple(mu.shape)}: "
                          "the loss does the reduction (sum over latent dimensions, mean over the batch)")
    if isinstance(kl, torch.Tensor) and kl.shape == mu.shape[:1]:
        raise CheckFailed(f"{name}: returned one KL per row, shape {tuple(kl.shape)}; return it per dimension, "
                          f"shape {tuple(mu.shape)} (the loss sums the dimensions itself)")
    expect_shape(kl, mu.shape, f"{name}(mu, logvar)")
    got = kl.detach()
    sigma2 = logvar.exp()
    hints = [(2 * expected, "missing the factor 0.5"),
             (0.5 * (mu ** 2 + sigma2 - 1 - sigma2.log() * 2), "log sigma^2 is logvar itself, not 2 * logvar"),
             (0.5 * (mu ** 2 + logvar.exp() ** 2 - 1 - 2 * logvar), "you used sigma = exp(logvar) (then sigma^2 "
              "= exp(2 logvar)); logvar is already log(sigma^2)"),
             (0.5 * (mu ** 2 + sigma2 - 1 + logvar), "the sign of the log sigma^2 term: it is - log sigma^2"),
             (0.5 * (mu ** 2 + sigma2 - logvar), "the -1 is missing (KL must be 0 when mu = 0 and sigma = 1)"),
             (0.5 * (mu + sigma2 - 1 - logvar), "mu must be squared")]
    for wrong, hint in hints:
        if torch.allclose(got, wrong, atol=1e-5) and not torch.allclose(got, expected, atol=1e-5):
            raise CheckFailed(f"{name}: wrong values - {hint}")
    expect_close(got, expected, f"{name}(mu, logvar)", hint="KL = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)")
    zero = call(fn, torch.zeros(2, 3), torch.zeros(2, 3), name=name)
    expect_close(zero, torch.zeros(2, 3), f"{name}(0, 0) (N(0, 1) against itself)")
    # gradients: d/dmu = mu, d/dlogvar = 0.5 (exp(logvar) - 1)
    mu_g, logvar_g = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    out = call(fn, mu_g, logvar_g, name=name)
    if not out.requires_grad:
        raise CheckFailed(f"{name}: the KL does not depend on mu and logvar through autograd "
                          "(did you use .detach(), .item(), numpy or math.exp?)")
    out.sum().backward()
    expect_close(mu_g.grad, mu, f"{name}: gradient w.r.t. mu", hint="d KL / d mu = mu")
    expect_close(logvar_g.grad, 0.5 * (sigma2 - 1), f"{name}: gradient w.r.t. logvar",
                 hint="d KL / d logvar = 0.5 * (exp(logvar) - 1)")
    return passed(name, "per-dimension values, KL(N(0,1) || N(0,1)) = 0, gradients to mu and logvar")


def negative_elbo(fn):
    """fn(log_px_z, kl, beta) -> the loss: mean over the batch of [ -sum log p(x|z) + beta * sum KL ],
    with log_px_z per pixel (B, C, H, W) and kl per latent dimension (B, latent_dim)."""
    name = "negative_elbo"
    g = torch.Generator().manual_seed(2)
    log_px_z = -torch.rand(5, 3, 8, 8, generator=g) * 2        # log-probabilities are <= 0
    kl = torch.rand(5, 4, generator=g) * 3                     # KLs are >= 0
    beta = 0.7
    loss = call(fn, log_px_z, kl, beta, name=name)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CheckFailed(f"{name}: expected a scalar tensor (one loss), got "
                          f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    nll_b, kl_b = -log_px_z.flatten(1).sum(1), kl.sum(1)          # per image, summed over dimensions
    expected = (nll_b + beta * kl_b).mean()
    wrong = [(-log_px_z.mean() + beta * kl_b.mean(), "the reconstruction term is a MEAN over pixels but the KL a sum "
              "over latents: that shrinks the likelihood 192x here (3072x on 32x32 images) and the KL wins. "
              "Sum both over their dimensions per image, then average over the batch"),
             (-log_px_z.mean() + beta * kl.mean(), "both terms are means over their dimensions: the ELBO sums them "
              "(a mean reweights the KL by pixels / latents)"),
             ((nll_b + beta * kl_b).sum(), "summed over the batch: average over the batch instead"),
             ((-nll_b + beta * kl_b).mean(), "the sign of the reconstruction term: the loss is -log p(x|z)"),
             ((nll_b - beta * kl_b).mean(), "the sign of the KL: the loss ADDS beta * KL"),
             ((nll_b + kl_b).mean(), "beta is missing: multiply the KL by beta")]
    for value, hint in wrong:
        if math.isclose(loss.item(), value.item(), rel_tol=1e-5) and not math.isclose(value.item(), expected.item()):
            raise CheckFailed(f"{name}: wrong value {loss.item():.4f} - {hint}")
    expect_close(loss.reshape(()), expected, f"{name}(log_px_z, kl, beta)",
                 hint="mean over images of ( -sum of log_px_z + beta * sum of kl )")
    return passed(name, "value and reduction (sum per image, mean over the batch), with beta")
