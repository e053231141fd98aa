"""Checks of chapters 09-11: the forward process, the DDPM reverse mean, classifier guidance and CFG."""

import math

import torch

from ... import diffusion, guidance
from .core import CheckFailed, call, expect_close, expect_shape, passed

SCHEDULE = diffusion.Schedule("linear", 1000)


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, torch.randn(n, 3, 8, 8, generator=g)


def _expect_values(out, want, mistakes, name, what, hint="", compare=lambda x: x):
    """Name a known mistake if `out` equals one (compare(out) vs each candidate), else expect out ~ want."""
    for candidate, why in mistakes:
        got = compare(out)
        if got.shape == candidate.shape and torch.allclose(got, candidate, atol=1e-5):
            raise CheckFailed(f"{name}: wrong values in {what} - {why}")
    expect_close(out, want, what, atol=1e-4, hint=hint)


def q_sample(fn):
    """fn(x0, t, noise, alphas_cumprod) -> x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, for t (B,)."""
    name = "q_sample"
    x0, noise = _images()
    t = torch.tensor([0, 10, 500, 999])
    abar = SCHEDULE.alphas_cumprod.float()
    what = f"{name}(x0, t, noise, alphas_cumprod)"
    out = call(fn, x0, t, noise, abar, name=name)
    expect_shape(out, x0.shape, what)
    a = abar[t].reshape(-1, 1, 1, 1)
    _expect_values(out, diffusion.q_sample(SCHEDULE, x0, t, noise), [
        (a * x0 + (1 - a) * noise, "the coefficients are square roots: sqrt(abar_t) and sqrt(1 - abar_t)"),
        (a.sqrt() * noise + (1 - a).sqrt() * x0, "x0 and the noise are swapped: the signal gets sqrt(abar_t)"),
        (x0 + (1 - a).sqrt() * noise, "the signal must shrink too: multiply x0 by sqrt(abar_t), so the variance stays 1"),
    ], name, what, hint="index alphas_cumprod at each image's t and reshape to (B, 1, 1, 1) to broadcast")
    passed(name, "x_t matches the closed form at t = 0, 10, 500 and 999 (shape and values)")


def ddpm_mean(fn):
    """fn(x_t, eps, t, betas) -> mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), for one int t."""
    name = "ddpm_mean"
    x_t, eps = _images(seed=1)
    betas = SCHEDULE.betas.float()
    for t in (999, 300, 1):
        what = f"{name}(x_t, eps, t={t}, betas)"
        out = call(fn, x_t, eps, t, betas, name=name)
        expect_shape(out, x_t.shape, what)
        want = diffusion.ddpm_step(SCHEDULE, eps.double(), t, x_t.double(), prediction="eps", clip_x0=False,
                                   noise=torch.zeros_like(x_t).double())[0].float()
        beta, alpha = betas[t], 1 - betas[t]
        abar = torch.cumprod(1 - betas, 0)[t]
        _expect_values(out, want, [
            ((x_t - beta / (1 - abar).sqrt() * eps) / alpha, "divide by sqrt(alpha_t), not alpha_t"),
            (x_t - beta / (1 - abar).sqrt() * eps, "the 1 / sqrt(alpha_t) factor is missing"),
            ((x_t - beta / (1 - alpha).sqrt() * eps) / alpha.sqrt(),
             "the noise coefficient uses 1 - alpha-bar_t (the cumulative product), not 1 - alpha_t"),
            ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt(), "that is the predicted x0, not the mean of x_{t-1}"),
        ], name, what, hint="mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t), alpha_bar = cumprod(1 - beta)")
    passed(name, "the reverse-step mean matches diffusion.ddpm_step (noise off) at t = 999, 300 and 1")


class _LinearClassifier(torch.nn.Module):
    num_classes = 5

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 3 * 8 * 8, generator=torch.Generator().manual_seed(5)) * 0.1)

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T


def log_prob_gradient(fn):
    """fn(classifier, x_t, t, y) -> grad_{x_t} log softmax(classifier(x_t, t))[y], one per image, (B, C, H, W)."""
    name = "log_prob_gradient"
    what = f"{name}(classifier, x_t, t, y)"
    clf = _LinearClassifier()
    x_t, _ = _images(seed=2)
    t, y = torch.tensor([5, 50, 500, 900]), torch.tensor([0, 4, 2, 2])
    out = call(fn, clf, x_t, t, y, name=name)
    expect_shape(out, x_t.shape, what)
    w = clf.weight.detach()
    probs = torch.softmax(x_t.flatten(1) @ w.T, -1)
    _expect_values(out, guidance.class_log_prob_gradient(clf, x_t, t, y), [
        (w[y], "that is the gradient of the logit, not of the log-probability: take log_softmax first"),
        (probs[torch.arange(4), y, None] * (w[y] - probs @ w),
         "that is the gradient of the probability; guidance uses the log-probability"),
    ], name, what, compare=lambda g: g.reshape(4, -1),
        hint="x = x_t.detach().requires_grad_(); pick log_softmax(logits)[range(B), y], sum, autograd.grad")
    passed(name, "matches the library's gradient (W_y - E_p[W] for this linear classifier)")


def guided_eps(fn):
    """fn(eps, grad, alpha_bar_t, scale) -> eps - scale * sqrt(1 - alpha_bar_t) * grad (classifier guidance)."""
    name = "guided_eps"
    eps, grad = _images(seed=3)
    for abar, scale in ((0.9, 2.0), (0.01, 5.0)):
        what = f"{name}(eps, grad, alpha_bar_t={abar}, scale={scale})"
        out = call(fn, eps, grad, abar, scale, name=name)
        expect_shape(out, eps.shape, what)
        _expect_values(out, eps - scale * math.sqrt(1 - abar) * grad, [
            (eps + scale * math.sqrt(1 - abar) * grad, "the sign: eps points away from the data, so subtract the gradient"),
            (eps - scale * grad, "scale the gradient by sqrt(1 - alpha_bar_t): the score is -eps / sqrt(1 - alpha_bar_t)"),
            (eps - scale * (1 - abar) * grad, "the factor is sqrt(1 - alpha_bar_t), not 1 - alpha_bar_t"),
        ], name, what)
    passed(name, "eps' = eps - s sqrt(1 - alpha_bar_t) grad log p(y | x_t), at two noise levels")


def smoothed_gradient(fn):
    """fn(grad_fn, x_t, noise_std, noise) -> the mean over k of grad_fn(x_t + noise_std * noise[k])."""
    name = "smoothed_gradient"
    what = f"{name}(grad_fn, x_t, noise_std, noise)"
    x_t, _ = _images(seed=6)
    noise = torch.randn((3, *x_t.shape), generator=torch.Generator().manual_seed(7))
    noise_std = torch.tensor([0.1, 0.5, 1.0, 2.0]).reshape(-1, 1, 1, 1)
    grad_fn = lambda x: torch.tanh(3 * x)               # any nonlinear gradient field tells the mistakes apart
    out = call(fn, grad_fn, x_t, noise_std, noise, name=name)
    expect_shape(out, x_t.shape, what)
    per_copy = torch.stack([grad_fn(x_t + noise_std * n) for n in noise])
    _expect_values(out, per_copy.mean(0), [
        (grad_fn(x_t), "that is the plain gradient at x_t: evaluate it at the perturbed copies x_t + noise_std * noise[k]"),
        (per_copy.sum(0), "average the gradients (divide by the number of copies), do not sum them"),
        (torch.stack([grad_fn(x_t + n) for n in noise]).mean(0), "scale each perturbation by noise_std"),
        (grad_fn(x_t + noise_std * noise.mean(0)), "average the gradients, not the perturbations"),
    ], name, what)
    passed(name, "the mean gradient over perturbed copies: the gradient of the Gaussian-smoothed classifier")


def cfg_combine(fn):
    """fn(eps_cond, eps_uncond, w) -> eps_uncond + w (eps_cond - eps_uncond)."""
    name = "cfg_combine"
    cond, uncond = _images(seed=4)
    for w in (4.0, 0.0, 1.0):
        what = f"{name}(eps_cond, eps_uncond, w={w})"
        out = call(fn, cond, uncond, w, name=name)
        expect_shape(out, cond.shape, what)
        _expect_values(out, uncond + w * (cond - uncond), [
            (cond + w * (cond - uncond), "that is the (1 + w) convention of Ho & Salimans; here w = 1 is plain conditional"),
            (w * cond, "guidance extrapolates away from the unconditional prediction: eps_u + w (eps_c - eps_u)"),
        ] if w == 4.0 else [], name, what, hint="w = 0 gives eps_uncond, w = 1 gives eps_cond")
    passed(name, "w = 0 is unconditional, w = 1 conditional, w = 4 extrapolates")


def drop_labels(fn):
    """fn(labels, p_uncond, generator) -> labels with each entry replaced by -1 with probability p_uncond."""
    name = "drop_labels"
    labels = torch.arange(30).repeat(200)
    out = call(fn, labels, 0.2, torch.Generator().manual_seed(0), name=name)
    expect_shape(out, labels.shape, f"{name}(labels, 0.2, generator)")
    if not isinstance(out, torch.Tensor) or out.dtype != torch.long:
        raise CheckFailed(f"{name}: return a LongTensor of class ids (-1 for 'no class')")
    kept = out != -1
    if not torch.equal(out[kept], labels[kept]):
        raise CheckFailed(f"{name}: labels that are not dropped must stay as they were")
    share = 1 - kept.float().mean().item()
    if not 0.17 < share < 0.23:
        raise CheckFailed(f"{name}: {share:.1%} of 6,000 labels were dropped; expected about 20% for p_uncond = 0.2")
    if torch.equal(call(fn, labels, 0.0, torch.Generator().manual_seed(0), name=name), labels) is False:
        raise CheckFailed(f"{name}: p_uncond = 0 must keep every label")
    if (labels == -1).any():
        raise CheckFailed(f"{name}: do not modify the input tensor in place")
    passed(name, f"drops {share:.1%} of labels at p = 0.2, keeps the rest, keeps all at p = 0")
