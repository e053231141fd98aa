"""Checks of chapter 14 (the whole unCLIP pipeline): spherical interpolation between unit vectors (slerp), one DDIM
inversion step, the text-diff embeddings (slerp from an image's embedding towards the normalised difference of two
captions' text embeddings), and the student's text diffs put to work on the trained pipeline."""

import math

import torch
import torch.nn.functional as F

from ...diffusion import Schedule, timesteps
from ...unclip import slerp as _slerp, text_diff_direction
from .core import CheckFailed, call, expect_close, expect_shape, passed


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _close(a, b, atol=1e-4):
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.isfinite(a).all() \
        and torch.allclose(a.detach().float(), b.float(), atol=atol, rtol=1e-4)


def _lerp(a, b, s):
    s = torch.as_tensor(s, dtype=torch.float32)
    s = s.view(-1, *[1] * a.ndim) if s.ndim == 1 else s
    return (1 - s) * a + s * b


def _angles_from_a(a, path):
    """The angle between a and each point of a path (K, B, D), as a fraction of the angle from a to the path's end."""
    cos = lambda u, v: (F.normalize(u, dim=-1) * F.normalize(v, dim=-1)).sum(-1).clamp(-1, 1)
    return torch.arccos(cos(a[None], path)) / torch.arccos(cos(a, path[-1]))[None].clamp(min=1e-8)


# ----------------------------------------------------------------------------- slerp

def slerp(fn):
    """fn(a, b, s) -> unclip.slerp(a, b, s): a, b unit vectors (..., D); s a number (-> (..., D)) or a 1-D tensor of K
    fractions (-> (K, ..., D)); the great circle from a (s = 0) to b (s = 1), equal angles for equal steps of s, every
    point unit length, no NaN when a and b are (nearly) parallel."""
    name = "slerp"
    a, b = _unit(4, 16, seed=1), _unit(4, 16, seed=2)
    ss = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])

    def run(a, b, s):
        inputs = (a.clone(), b.clone(), s.clone() if isinstance(s, torch.Tensor) else s)
        try:
            out = call(fn, *inputs, name=name)
        except CheckFailed as e:
            if isinstance(s, torch.Tensor) and s.ndim == 1:
                raise CheckFailed(f"{e} (with s a 1-D tensor of {len(s)} fractions and a of shape {tuple(a.shape)}: "
                                  "reshape s to (K, 1, ..., 1), one 1 per axis of a, so that it broadcasts)") from None
            raise
        if not torch.equal(inputs[0], a) or not torch.equal(inputs[1], b) or (
                isinstance(s, torch.Tensor) and not torch.equal(inputs[2], s)):
            raise CheckFailed(f"{name}: do not modify a, b or s in place (build new tensors)")
        if isinstance(out, torch.Tensor):
            out = out.detach().float()
        return out

    # 1. one number s: the ends, a point between; 2. a batch of fractions: (K, B, D)
    for s in (0.0, 1.0, 0.3, ss):
        shown = f"{s:g}" if isinstance(s, float) else f"torch.tensor({[round(v, 2) for v in s.tolist()]})"
        what = f"{name}(a (4, 16), b (4, 16), s={shown})"
        out = run(a, b, s)
        want = _slerp(a, b, s)
        if isinstance(out, torch.Tensor) and want.ndim == 3 and tuple(out.shape) == (len(a), len(ss), 16):
            raise CheckFailed(f"{what}: the fractions' axis comes first: expected (K, ..., D) = "
                              f"{tuple(want.shape)}, got {tuple(out.shape)}")
        expect_shape(out, want.shape, what + (" (K fractions first, then a's shape)" if want.ndim == 3 else ""))
        if _close(out, want):
            continue
        if not torch.isfinite(out).all():
            raise CheckFailed(f"{what}: contains NaN or inf")
        if isinstance(s, float) and s in (0.0, 1.0) and _close(out, b if s == 0.0 else a):
            raise CheckFailed(f"{what}: s = 0 must give a and s = 1 must give b; your path runs from b to a")
        norms = out.norm(dim=-1)
        if _close(out, _lerp(a, b, s)):
            raise CheckFailed(f"{what}: that is a straight line (lerp) between a and b: its inner points are shorter "
                              f"than 1 (norms down to {norms.min().item():.3f}), inside the sphere, where no CLIP "
                              "embedding lies; slerp follows the great circle")
        if _close(out, F.normalize(_lerp(a, b, s), dim=-1)):
            turned = torch.arccos((a * out).sum(-1).clamp(-1, 1)) / torch.arccos((a * b).sum(-1).clamp(-1, 1))
            at = 0.3 if isinstance(s, float) else 0.25
            frac = turned.mean().item() if isinstance(s, float) else turned[1].mean().item()
            raise CheckFailed(f"{what}: that is a lerp, then normalised: unit length and the right ends, but not "
                              f"equal-angle: at s = {at:g} your point has turned {frac:.3f} of the angle from a to "
                              f"b, not {at:g} (the normalised chord bunches its points near the middle); slerp moves "
                              "along the arc at constant speed")
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise CheckFailed(f"{what}: the points are not unit length (norms from {norms.min().item():.3f} to "
                              f"{norms.max().item():.3f}): slerp between unit vectors stays on the sphere")
        expect_close(out, want, what, atol=1e-4,
                     hint="s = 0 gives a, s = 1 gives b" if isinstance(s, float) and s in (0.0, 1.0) else
                     "with cos(omega) = <a, b>, each fraction s gives (sin((1 - s) omega) a + sin(s omega) b) / "
                     "sin(omega); a 1-D s of K fractions: reshape it to (K, 1, ..., 1) so that it broadcasts")

    # 3. nearly parallel and exactly parallel ends: no plane for the arc, and no NaN
    for what_pair, bb in (("b = a (parallel)", a.clone()),
                          ("b = a rotated by ~1e-4 rad (nearly parallel)",
                           F.normalize(a + 1e-4 * _unit(4, 16, seed=3), dim=-1))):
        what = f"{name}(a, {what_pair}, s=torch.tensor([0, 0.3, 1]))"
        out = run(a, bb, torch.tensor([0.0, 0.3, 1.0]))
        expect_shape(out, (3, *a.shape), what)
        if not torch.isfinite(out).all():
            raise CheckFailed(f"{what}: NaN or inf: when a and b are (nearly) parallel, sin(omega) is ~0 (and "
                              "<a, b> may round to slightly above 1, where arccos is NaN): clamp the cosine to "
                              "[-1, 1], and where sin(omega) is tiny use the straight line (1 - s) a + s b, which "
                              "is the arc there")
        expect_close(out, _slerp(a, bb, torch.tensor([0.0, 0.3, 1.0])), what, atol=1e-4,
                     hint="(nearly) parallel ends: the path stays at a")

    # 4. any leading shape: one pair of vectors (D,)
    what = f"{name}(a (16,), b (16,), s=torch.tensor([0.5]))"
    out = run(a[0], b[0], torch.tensor([0.5]))
    expect_close(out, _slerp(a[0], b[0], torch.tensor([0.5])), what, atol=1e-4,
                 hint="a and b may have any leading shape (..., D): take the dot product over the last axis only")
    passed(name, "the ends, unit length, equal angles for equal steps of s, a batch of fractions (K, ..., D), "
                 "and (nearly) parallel ends without NaN")


# ----------------------------------------------------------------------------- one DDIM inversion step

def _step(x_s, eps, abar_s, abar_t):
    x0 = (x_s - math.sqrt(1 - abar_s) * eps) / math.sqrt(abar_s)
    return math.sqrt(abar_t) * x0 + math.sqrt(1 - abar_t) * eps


def _gaussian_eps(schedule, var):
    """The exact noise predictor of data ~ N(0, var I): eps*(x_t, t) = sqrt(1 - abar_t) x_t / (abar_t var + 1 -
    abar_t)."""
    def eps(x, t):
        a = schedule.abar(t)
        return math.sqrt(1 - a) * x / (a * var + 1 - a)
    return eps


def ddim_invert_step(fn):
    """fn(x_s, eps, abar_s, abar_t) -> x_t: the noise's estimate eps read at level s, x0_hat = (x_s - sqrt(1 - abar_s)
    eps) / sqrt(abar_s), then x_t = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps (diffusion.ddim_invert's update); and
    run along a whole path with the exact predictor of Gaussian data, it must land where the ODE says."""
    name = "ddim_invert_step"
    g = torch.Generator().manual_seed(14)
    x_s, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for abar_s, abar_t, about in ((1.0, 0.98, "the first step, from the clean image (abar_s = 1)"),
                                  (0.9, 0.6, "a middle step"), (0.3, 0.02, "a step into the noise")):
        what = f"{name}(x_s (4, 3, 8, 8), eps, abar_s={abar_s:g}, abar_t={abar_t:g}), {about}"
        given = (x_s.clone(), eps.clone())
        out = call(fn, *given, abar_s, abar_t, name=name)
        if not torch.equal(given[0], x_s) or not torch.equal(given[1], eps):
            raise CheckFailed(f"{name}: do not modify x_s or eps in place")
        expect_shape(out, x_s.shape, what)
        out = out.detach().float()
        again = call(fn, x_s.clone(), eps.clone(), abar_s, abar_t, name=name)
        if not _close(torch.as_tensor(again).detach().float(), out, atol=1e-6):
            raise CheckFailed(f"{what}: two calls with the same inputs gave different results: use the eps given (the "
                              "model's estimate of the noise); inversion is deterministic and draws no noise")
        want = _step(x_s, eps, abar_s, abar_t)
        if _close(out, want):
            continue
        x0_hat = (x_s - math.sqrt(1 - abar_s) * eps) / math.sqrt(abar_s)
        mistakes = [
            (_step(x_s, eps, abar_t, abar_s), "that is a DDIM sampling step, from level t back to the cleaner s: "
                                              "inversion runs the other way, from s (cleaner) to t (noisier)"),
            (math.sqrt(abar_t / abar_s) * x_s, "the noise term is missing: x_t = sqrt(abar_t) x0_hat + "
                                               "sqrt(1 - abar_t) eps, with x0_hat the clean estimate at level s"),
            (abar_t * x0_hat + (1 - abar_t) * eps, "abar_t is the signal's share of the variance: scale x0_hat by "
                                                   "its square root, and eps by sqrt(1 - abar_t)"),
            (math.sqrt(abar_t) * (x_s - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_s) + math.sqrt(1 - abar_t) * eps,
             "x0_hat removes the noise of level s from x_s: (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s), with "
             "abar_s, not abar_t"),
            (math.sqrt(abar_t) * x_s + math.sqrt(1 - abar_t) * eps, "x_s is not the clean image (except at the "
                                                                    "first step): estimate x0_hat from x_s and eps "
                                                                    "first"),
        ]
        for wrong, hint in mistakes:
            if _close(out, wrong) and not _close(wrong, want):
                raise CheckFailed(f"{what}: {hint}")
        expect_close(out, want, what, atol=1e-4,
                     hint="x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s); x_t = sqrt(abar_t) x0_hat + "
                          "sqrt(1 - abar_t) eps")

    # along a whole path: Gaussian data, whose probability-flow ODE is linear, so x_T = x0 / sqrt(var) exactly
    schedule, var, steps = Schedule("cosine", 1000), 0.25, 100
    model = _gaussian_eps(schedule, var)
    x0 = torch.randn(64, 8, generator=g) * math.sqrt(var)
    x, abar_s = x0.clone(), 1.0
    for t in reversed(timesteps(schedule, steps)):
        abar_t = schedule.abar(t)
        x = call(fn, x, model(x, t), abar_s, abar_t, name=name)
        abar_s = abar_t
    err = (x.detach().float() - x0 / math.sqrt(var)).abs().max().item()
    if not err < 0.1:
        raise CheckFailed(f"{name}: run along {steps} steps with the exact noise predictor of Gaussian data, your "
                          f"steps land {err:.3g} away from x0 / sqrt(var), where the ODE ends")
    passed(name, f"one step at three levels, and {steps} steps with the exact predictor of N(0, {var:g}) data "
                 f"land on the ODE's end x0 / sqrt(var) (largest error {err:.3f})")


# ----------------------------------------------------------------------------- the text-diff embeddings

def _reference_edit(z, t_from, t_to, thetas):
    return _slerp(z, text_diff_direction(t_from, t_to), thetas)


def text_diff_embeddings(fn):
    """fn(z_image (B, D), t_from (B, D), t_to (B, D), thetas (K,)) -> (K, B, D): slerp(z_i, normalize(t_to - t_from),
    theta) for each theta (the paper's text diff, unclip.UnCLIP.text_diff's embeddings)."""
    name = "text_diff_embeddings"
    B, D = 6, 16
    z, t_from, t_to = _unit(B, D, seed=4), _unit(B, D, seed=5), _unit(B, D, seed=6)
    t_to = F.normalize(t_from + 0.6 * t_to, dim=-1)            # two captions' embeddings are close, as CLIP's are
    for thetas in (torch.tensor([0.0, 0.1, 0.25, 0.5]), torch.tensor([0.3])):
        K = len(thetas)
        what = (f"{name}(z_image ({B}, {D}), t_from ({B}, {D}), t_to ({B}, {D}), "
                f"thetas={[round(v, 2) for v in thetas.tolist()]})")
        given = (z.clone(), t_from.clone(), t_to.clone(), thetas.clone())
        out = call(fn, *given, name=name)
        if any(not torch.equal(x, y) for x, y in zip(given, (z, t_from, t_to, thetas))):
            raise CheckFailed(f"{name}: do not modify its inputs in place")
        if isinstance(out, torch.Tensor) and tuple(out.shape) == (B, K, D) and K != B:
            raise CheckFailed(f"{what}: expected (K, B, D) = {(K, B, D)}, one row of edits per theta; you returned "
                              "(B, K, D)")
        expect_shape(out, (K, B, D), what)
        out = out.detach().float()
        want = _reference_edit(z, t_from, t_to, thetas)
        if _close(out, want):
            continue
        if not torch.isfinite(out).all():
            raise CheckFailed(f"{what}: contains NaN or inf")
        diff = t_to - t_from
        direction = F.normalize(diff, dim=-1)
        mistakes = [
            (_slerp(z, diff, thetas), "the direction t_to - t_from is not normalised: the paper's text diff is the "
                                      "unit vector of the difference (CLIP's two captions are close, so their "
                                      "difference is short)"),
            (_slerp(z, F.normalize(t_from - t_to, dim=-1), thetas),
             "the sign is wrong: the edit moves towards the target caption, along t_to - t_from"),
            (_slerp(z, F.normalize(diff, dim=0), thetas), "normalise each row's difference (over the last axis, "
                                                          "dim=-1), not across the batch"),
            (F.normalize(_lerp(z, direction, thetas), dim=-1),
             "that is a lerp, then normalised: not equal-angle; move along the great circle (slerp) from z_image "
             "towards the direction"),
            (_lerp(z, direction, thetas), "that is a straight line (lerp): its points leave the sphere; move along "
                                          "the great circle (slerp) from z_image towards the direction"),
            (_slerp(z, t_to, thetas), "that interpolates towards the target caption's embedding itself: the text "
                                      "diff moves towards the normalised *difference* of the two captions' "
                                      "embeddings"),
            (_slerp(direction, z, thetas), "theta = 0 must give the image's own embedding: slerp from z_image "
                                           "towards the direction, not the other way"),
        ]
        for wrong, hint in mistakes:
            if _close(out, wrong) and not _close(wrong, want):
                raise CheckFailed(f"{what}: {hint}")
        norms = out.norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise CheckFailed(f"{what}: the edited embeddings are not unit length (norms from "
                              f"{norms.min().item():.3f} to {norms.max().item():.3f}): CLIP image embeddings are "
                              "unit vectors, and the decoder was trained on those")
        expect_close(out, want, what, atol=1e-4,
                     hint="the direction: normalize(t_to - t_from) per row; then your slerp from z_image towards "
                          "it at the fractions thetas")
    passed(name, "the unit direction t_to - t_from per image, slerp from the image's embedding towards it, "
                 "(K, B, D) for one theta and for several")


# ----------------------------------------------------------------------------- the student's text diffs, decoded

def text_diff_edit(fn, pipe, images, sources, targets, thetas, score, max_gap=0.05):
    """The student's text_diff_embeddings put to work: for test `images` (B, 3, R, R), one source and one target caption
    each, the student's embeddings (K, B, D) are decoded from each image's DDIM-inverted noise
    (pipe.decode_embeddings(..., x_T=pipe.invert(images))), and pipe.text_diff edits the same images with the same
    captions and thetas. score(edited (B, K, 3, R, R)) -> K numbers (e.g. the oracle's success rate of the edit per
    theta) is reported for both; the two must agree up to numerical noise (mean |pixel difference| < max_gap)."""
    name = "text_diff_embeddings on the trained pipeline"
    thetas = torch.as_tensor(thetas, dtype=torch.float32)
    K, B = len(thetas), len(images)
    with torch.no_grad():
        z = pipe.encode_image(images)
        t_from = pipe.clip.encode_text(list(sources)).float().cpu()
        t_to = pipe.clip.encode_text(list(targets)).float().cpu()
        mine = call(fn, z.clone(), t_from.clone(), t_to.clone(), thetas.clone(), name="text_diff_embeddings")
        expect_shape(mine, (K, B, z.shape[1]), f"text_diff_embeddings on the pipeline's embeddings (K = {K}, B = {B})")
        if not _close(mine.detach().float(), _reference_edit(z, t_from, t_to, thetas)):
            raise CheckFailed(f"{name}: on the pipeline's CLIP embeddings your text_diff_embeddings differs from the "
                              "library's; make the check of the exercise above pass first")
        x_T = pipe.invert(images)
        edited = pipe.decode_embeddings(mine.detach().float().flatten(0, 1), x_T=x_T.repeat(K, 1, 1, 1),
                                        upsample=False)
        edited = edited.view(K, B, *edited.shape[1:]).transpose(0, 1)
        library = pipe.text_diff(images, list(sources), list(targets), thetas, upsample=False)
    gap = (edited - library).abs().mean().item()
    if not gap < max_gap:
        raise CheckFailed(f"{name}: your embeddings match the library's, yet their decodings differ from "
                          f"pipe.text_diff by {gap:.3f} on average (pixels in [-1, 1]): decode them from the images' "
                          "inverted noise, pipe.invert(images), repeated for each theta")
    mine_scores, library_scores = [float(v) for v in score(edited)], [float(v) for v in score(library)]
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)
    passed(name, f"{B} test images edited at theta = {fmt(thetas.tolist())} from their inverted noise: success "
                 f"{fmt(mine_scores)} with your embeddings, {fmt(library_scores)} with pipe.text_diff (mean |pixel "
                 f"difference| {gap:.4f})")
