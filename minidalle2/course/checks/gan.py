"""Checks for chapter 01 (GAN): the discriminator loss and the non-saturating generator loss.

    from minidalle2.checks import gan as checks
    checks.discriminator_loss(discriminator_loss)     # your (real_logits, fake_logits) -> scalar
    checks.generator_loss(generator_loss)             # your (fake_logits) -> scalar
"""

import torch
import torch.nn.functional as F

from ... import gan
from .core import CheckFailed, call, expect_close, expect_scalar, passed


STABILITY_HINT = ("log(sigmoid(l)) underflows to log(0) = -inf for confident logits; use F.softplus "
                  "(or F.binary_cross_entropy_with_logits), which works on the logits directly")


def _stable(out, expected, what):
    expect_scalar(out, what)
    if not torch.isfinite(out.detach()).all():
        raise CheckFailed(f"{what}: got {out.item()} (not finite). Hint: {STABILITY_HINT}")
    expect_close(out.reshape(()), expected, what, hint=STABILITY_HINT)


def _logits(seed, n=16, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=g)


def discriminator_loss(fn):
    """fn(real_logits, fake_logits) must be E softplus(-l_real) + E softplus(l_fake), with gradients,
    and stay finite for confident logits (|l| = 100)."""
    name = "discriminator_loss"
    real, fake = _logits(1), _logits(2)
    out = expect_scalar(call(fn, real.clone(), fake.clone(), name=name), f"{name}(real_logits, fake_logits)")
    expected = gan.discriminator_loss(real, fake)
    hints = [(F.softplus(real).mean() + F.softplus(-fake).mean(),
              "real and fake are swapped: D should call real images real (-log D(x)) and fakes fake (-log(1 - D(G(z))))"),
             (F.softplus(-real).sum() + F.softplus(fake).sum(), "use the mean over the batch, not the sum"),
             (F.softplus(-real).mean(), "the fake term -log(1 - D(G(z))) is missing"),
             (F.softplus(fake).mean(), "the real term -log D(x) is missing"),
             (-(F.softplus(-real).mean() + F.softplus(fake).mean()), "the sign is flipped: return a loss to minimise")]
    for wrong, hint in hints:
        if torch.isclose(out.detach().float().reshape(()), wrong.float(), atol=1e-5, rtol=1e-4):
            raise CheckFailed(f"{name}: wrong value {out.item():.5g} (expected {expected.item():.5g}). Hint: {hint}")
    expect_close(out.reshape(()), expected, f"{name} on random logits",
                 hint="L_D = mean(softplus(-real_logits)) + mean(softplus(fake_logits))")

    real, fake = real.clone().requires_grad_(), fake.clone().requires_grad_()
    call(fn, real, fake, name=name).sum().backward()
    if real.grad is None or fake.grad is None:
        raise CheckFailed(f"{name}: no gradient reaches the logits; do not detach them or go through .item()/numpy")
    r0, f0 = _logits(1).requires_grad_(), _logits(2).requires_grad_()
    gan.discriminator_loss(r0, f0).backward()
    expect_close(real.grad, r0.grad, f"{name}: gradient w.r.t. real_logits")
    expect_close(fake.grad, f0.grad, f"{name}: gradient w.r.t. fake_logits")

    confident = torch.tensor([100.0, -100.0])  # D very sure, once right and once wrong
    out = call(fn, confident, confident.clone(), name=name)
    _stable(out, gan.discriminator_loss(confident, confident), f"{name} at logits +-100")
    return passed(name, "value, gradients and numerical stability at |logit| = 100 match the reference")


def generator_loss(fn):
    """fn(fake_logits) must be the non-saturating loss E softplus(-l_fake) = E -log D(G(z))."""
    name = "generator_loss"
    fake = _logits(3)
    out = expect_scalar(call(fn, fake.clone(), name=name), f"{name}(fake_logits)")
    expected = gan.generator_loss(fake, "nonsaturating")
    hints = [(-F.softplus(fake).mean(), "this is the saturating loss log(1 - D(G(z))): same optimum, but its "
                                        "gradient vanishes when D confidently rejects the fakes. Minimise -log D(G(z))"),
             (F.softplus(fake).mean(), "this is D's loss on fakes: G wants D to call its images real, -log D(G(z))"),
             (F.softplus(-fake).sum(), "use the mean over the batch, not the sum"),
             (-fake.mean(), "this is the hinge generator loss; here we want the non-saturating -log D(G(z))")]
    for wrong, hint in hints:
        if torch.isclose(out.detach().float().reshape(()), wrong.float(), atol=1e-5, rtol=1e-4):
            raise CheckFailed(f"{name}: wrong value {out.item():.5g} (expected {expected.item():.5g}). Hint: {hint}")
    expect_close(out.reshape(()), expected, f"{name} on random logits", hint="L_G = mean(softplus(-fake_logits))")

    # early in training D rejects fakes with confidence: the gradient must still be strong there
    rejected = torch.full((4,), -8.0, requires_grad=True)
    call(fn, rejected, name=name).backward()
    if rejected.grad is None:
        raise CheckFailed(f"{name}: no gradient reaches the logits; do not detach them")
    expect_close(rejected.grad, torch.full((4,), -1 / 4 * torch.sigmoid(torch.tensor(8.0)).item()),
                 f"{name}: gradient at logit -8 (D sure the fakes are fake)")
    out = call(fn, torch.tensor([-100.0, 100.0]), name=name)
    _stable(out, gan.generator_loss(torch.tensor([-100.0, 100.0])), f"{name} at logits +-100")
    return passed(name, "value, the strong gradient where D rejects fakes, and stability at |logit| = 100")
