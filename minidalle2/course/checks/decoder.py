"""Checks of chapter 13 (the unCLIP decoder and its upsampler): classifier-free guidance with two conditions (which
of them the unconditional pass nulls), the upsampler's conditioning corruption (a Gaussian blur of each image's own
width, then noise of each image's own level), and the student's guidance put to work on the trained decoder."""

import math

import torch
import torch.nn.functional as F

from ... import diffusion, prior
from ...decoder import Decoder
from ...diffusion_model import SAMPLE_ETA, SAMPLE_STEPS
from ...upsampler import gaussian_blur
from .core import CheckFailed, call, expect_close, expect_shape, passed

# ----------------------------------------------------------------------------- CFG with two conditions

EMBED, TEXT = "image_embed", "text"
_D, _W, _R = 8, 12, 8             # the check's decoder: embedding width, text width, image size


def randomize_zero_layers(model, seed=0, std=0.2):
    """Give the layers a U-Net starts at zero (its head, each block's last conv) random weights, in place: an
    untrained U-Net predicts exactly 0 for every input, and every way of combining zeros looks right."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_decoder(use_text=True, seed=0):
    """A small Decoder (8x8 images, attention at 4x4) with random weights everywhere, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Decoder(embed_dim=_D, text_width=_W, resolution=_R, widths=(8, 16), patch_size=1,
                        attention_levels=(1,), use_text=use_text)
    return randomize_zero_layers(model, seed).eval()


def _inputs(use_text=True, seed=1):
    """x_t (3, 3, 8, 8), t (3,) and the conditions {"image_embed": unit rows, "text": prior.text_condition(...)}
    for captions of 5, 3 and 2 real tokens (NaN at padding, as in a real batch)."""
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 5
    x_t = torch.randn(B, 3, _R, _R, generator=g)
    t = torch.tensor([900, 500, 100])
    conds = {EMBED: F.normalize(torch.randn(B, _D, generator=g), dim=-1)}
    if use_text:
        states = torch.randn(B, L, _W, generator=g)
        mask = torch.arange(L)[None] < torch.tensor([5, 3, 2])[:, None]
        pooled = F.normalize(torch.randn(B, _D, generator=g), dim=-1)
        conds[TEXT] = prior.text_condition(states, mask, pooled)
    return x_t, t, conds


def _same(a, b):
    """Equal values, NaN where the other has NaN (a text condition holds NaN at its padding)."""
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) \
        and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


class _Watched:
    """The model handed to the student's function: forwards every call to the real network, after checking that
    each condition is there and that no condition was 'nulled' with zeros."""

    def __init__(self, model, conds):
        self.model, self.names = model, set(conds)

    def __call__(self, x_t, t, **conds):
        missing = sorted(self.names - set(conds))
        if missing:
            raise CheckFailed(f"cfg_prediction called the model without {missing}: the network takes every condition "
                              "in every pass; to null one, pass its null in its place (diffusion.null_condition), "
                              "do not leave it out")
        unknown = sorted(set(conds) - self.names)
        if unknown:
            raise CheckFailed(f"cfg_prediction called the model with conditions {unknown} it was not given")
        for name, c in conds.items():
            if isinstance(c, torch.Tensor) and c.is_floating_point() and c.flatten(1).eq(0).all(1).any():
                raise CheckFailed(f"cfg_prediction replaced {name!r} by zeros: 'no condition' is a row of NaN "
                                  "(diffusion.null_condition), which the network swaps for its learned null; a row "
                                  "of zeros is an input like any other (and no CLIP embedding has length 0)")
        return self.model(x_t, t, **conds)


def _nulled(conds, names):
    return {k: diffusion.null_condition(v) if k in names else v for k, v in conds.items()}


def cfg_prediction(fn):
    """fn(model, x_t, t, conds, w, null) -> pred_u + w (pred_c - pred_u), pred_c = model(x_t, t, **conds) and pred_u the
    same call with the conditions named in `null` replaced by diffusion.null_condition (diffusion.guided_prediction)."""
    name = "cfg_prediction"
    both = (EMBED, TEXT)
    cases = [(True, 3.0, both, "both conditions nulled (the paper's)"),
             (True, 2.0, (EMBED,), "the embedding nulled, the caption kept"),
             (True, 4.0, (TEXT,), "the caption nulled, the embedding kept"),
             (True, 0.0, both, "w = 0"),
             (True, 1.0, (TEXT,), "w = 1"),
             (False, 2.5, (EMBED,), "a decoder without a text pathway (its only condition nulled)")]
    models = {True: tiny_decoder(True), False: tiny_decoder(False, seed=1)}
    for use_text, w, null, about in cases:
        model = models[use_text]
        x_t, t, conds = _inputs(use_text)
        originals = {k: v.clone() for k, v in conds.items()}
        what = f"{name}(model, x_t {tuple(x_t.shape)}, t, conds {sorted(conds)}, w={w:g}, null={null}), {about}"
        given = dict(conds)
        out = call(fn, _Watched(model, conds), x_t.clone(), t.clone(), given, w, null, name=name)
        if set(given) != set(originals) or any(not _same(given[k], originals[k]) for k in originals) \
                or any(not _same(conds[k], originals[k]) for k in originals):
            raise CheckFailed(f"{name}: do not modify `conds` (or its tensors) in place: build a new dict for the "
                              "unconditional pass, e.g. {k: ... for k, v in conds.items()}")
        expect_shape(out, x_t.shape, what)
        with torch.no_grad():
            pred_c = model(x_t, t, **conds)
            pred = {frozenset(n): model(x_t, t, **_nulled(conds, n)) for n in ((EMBED,), (TEXT,), both)
                    if all(k in conds for k in n)}
            want = diffusion.guided_prediction(model, x_t, t, conds, w, null)
        out = out.detach().float()
        if torch.allclose(out, want, atol=1e-4, rtol=1e-4):
            continue
        pred_u = pred[frozenset(null)]
        mistakes = []
        if w != 1:
            mistakes.append((pred_c, "you returned the conditional prediction: w is not used"))
        if w != 0:
            mistakes.append((pred_u, "you returned the unconditional prediction: w is not used"))
        mistakes += [
            (pred_c + w * (pred_c - pred_u), "that is the (1 + w) convention (Ho & Salimans); here w = 1 is the "
                                             "plain conditional prediction and w = 0 the unconditional one, as in "
                                             "chapter 11"),
            (pred_c - w * (pred_c - pred_u), "the sign is wrong: guidance starts from the unconditional prediction and "
                                             "moves along (and beyond) the direction towards the conditional one"),
            (w * pred_c, "the unconditional prediction is missing: guidance extrapolates from it"),
        ]
        others = [n for n in pred if n != frozenset(null)]
        for n in others:
            u = pred[n]
            hint = (f"you nulled {sorted(n)}, but null = {null}: "
                    + ("every condition not named in null keeps its value in the unconditional pass"
                       if n > frozenset(null) else "null every condition it names, and only those"))
            mistakes.append((u + w * (pred_c - u), hint))
        for wrong, hint in mistakes:
            if torch.allclose(out, wrong, atol=1e-4, rtol=1e-4) and not torch.allclose(wrong, want, atol=1e-4):
                raise CheckFailed(f"{what}: {hint}")
        expect_close(out, want, what, atol=1e-4, rtol=1e-4,
                     hint="two passes of the model, one with conds as given and one with the conditions named in "
                          "null replaced by their null; then extrapolate from the second through the first by w")
    passed(name, "matches diffusion.guided_prediction for w = 0, 1, 2-4 and for every choice of null: both "
                 "conditions, the embedding alone, the caption alone, and a decoder without captions")


# ----------------------------------------------------------------------------- the upsampler's corruption

def _blur(images, sigma, radius=None, pad="reflect", axes="xy", normalize=True, width=lambda s: 2 * s ** 2):
    """A Gaussian blur like upsampler.gaussian_blur, with the knobs a wrong answer turns (for the hints)."""
    B, C, H, W = images.shape
    r = radius if radius is not None else max(1, math.ceil(3 * float(sigma.max())))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    s = sigma.float().clamp(min=1e-3)[:, None]
    k = torch.exp(-x[None] ** 2 / width(s))
    k = torch.where(sigma[:, None] > 0, k, (x == 0).float()[None])
    if normalize:
        k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(C, 0)
    h = images.reshape(1, B * C, H, W).float()
    h = F.pad(h, (r, r, r, r), mode=pad) if pad != "zeros" else F.pad(h, (r, r, r, r))
    h = F.conv2d(h, k[:, None, None, :], groups=B * C) if "x" in axes else h[..., :, r:-r]
    h = F.conv2d(h, k[:, None, :, None], groups=B * C) if "y" in axes else h[..., r:-r, :]
    return h.reshape(B, C, H, W)


def _corruption_cases():
    g = torch.Generator().manual_seed(13)
    def images(B, C, H):
        return torch.rand(B, C, H, H, generator=g) * 2 - 1       # texture up to the borders: padding shows there
    cases = []
    for what, B, C, H, sigma, level in [
            ("the blur alone (every level 0)", 4, 3, 16, [0.4, 0.0, 0.7, 1.0], [0.0] * 4),
            ("the noise alone (every sigma 0)", 4, 3, 16, [0.0] * 4, [0.1, 0.0, 0.2, 0.3]),
            ("blur and noise", 5, 3, 20, [0.5, 0.0, 1.0, 0.8, 0.4], [0.3, 0.05, 0.0, 0.2, 0.1]),
            ("a wider blur", 2, 3, 24, [1.6, 0.3], [0.1, 0.25])]:
        low = images(B, C, H)
        noise = torch.randn(B, C, H, H, generator=g)
        cases.append((what, low, torch.tensor(sigma), torch.tensor(level), noise))
    return cases


def corrupt_low_res(fn):
    """fn(low (B, C, H, W), sigma (B,), level (B,), noise (B, C, H, W)) -> gaussian_blur(low, sigma) + level * noise:
    each image blurred by a Gaussian of its own width (sigma 0: unchanged; taps at -r..r, r = max(1, ceil(3 max
    sigma)), reflect padding, normalised), then noised with the given noise at its own level."""
    name = "corrupt_low_res"
    for what, low, sigma, level, noise in _corruption_cases():
        B, _, H, W = low.shape
        label = (f"{name}(low {tuple(low.shape)}, sigma {[round(v, 3) for v in sigma.tolist()]}, "
                 f"level {[round(v, 3) for v in level.tolist()]}, noise): {what}")
        inputs = [low.clone(), sigma.clone(), level.clone(), noise.clone()]
        out = call(fn, *inputs, name=name)
        if any(not torch.equal(a, b) for a, b in zip(inputs, (low, sigma, level, noise))):
            raise CheckFailed(f"{name}: do not modify its inputs in place (low + ... makes a new tensor; low += ... "
                              "does not)")
        expect_shape(out, low.shape, label)
        if not out.is_floating_point():
            raise CheckFailed(f"{label}: expected float images, got {out.dtype}")
        out = out.detach().float()
        blurred = gaussian_blur(low, sigma)
        want = blurred + level.view(-1, 1, 1, 1) * noise
        if torch.allclose(out, want, atol=1e-4):
            continue
        if not torch.isfinite(out).all():
            rows = [b for b in range(B) if not torch.isfinite(out[b]).all()]
            zero = [b for b in rows if sigma[b] == 0]
            raise CheckFailed(f"{label}: images {rows} contain NaN or inf"
                              + (" -- their sigma is 0: an image with sigma 0 is left as it is (clamp sigma to a "
                                 "tiny positive value, or skip its blur) instead of dividing by 0" if zero else ""))
        level4 = level.view(-1, 1, 1, 1)
        r = max(1, math.ceil(3 * float(sigma.max())))
        mistakes = [
            (low + level4 * noise, "the images are not blurred"),
            (blurred, "the noise is missing: add level * noise after the blur"),
            (_blur(low + level4 * noise, sigma), "you blurred the noise too: blur first, then add level * noise (the "
                                                  "net is told the level of the noise it sees, so it must not be "
                                                  "smoothed away)"),
            (blurred + noise, "scale the noise by each image's level"),
            (blurred + level4 ** 2 * noise, "level is the noise's standard deviation, not its variance: multiply "
                                            "the noise by level itself"),
            (blurred + level4.sqrt() * noise, "level is the noise's standard deviation: multiply the noise by "
                                              "level itself, not its square root"),
            (blurred + level.mean() * noise, "each image has its own level: level[b] scales the noise of image b"),
            (blurred + level[0] * noise, "each image has its own level: level[b] scales the noise of image b"),
            (_blur(low, sigma, normalize=False) + level4 * noise, "normalise the kernel so that its taps sum to 1 "
                                                                  "(else the blur changes the brightness)"),
            (_blur(low, sigma, width=lambda s: s ** 2) + level4 * noise, "the Gaussian's exponent is -x^2 / (2 "
                                                                         "sigma^2): a factor 2 is missing"),
            (_blur(low, sigma, width=lambda s: 2 * s) + level4 * noise, "the Gaussian's exponent is -x^2 / (2 "
                                                                        "sigma^2): sigma is a width, square it"),
            (_blur(low, sigma, pad="zeros") + level4 * noise, "the borders are darkened: pad with mode='reflect' "
                                                              "(F.pad(..., mode='reflect')), not with zeros"),
            (_blur(low, sigma, pad="replicate") + level4 * noise, "the border pixels differ: pad with mode='reflect', "
                                                                  "not 'replicate'"),
            (_blur(low, sigma, axes="x") + level4 * noise, "you blurred along the rows only: a 2-D Gaussian is a "
                                                           "1-D one along x, then one along y"),
            (_blur(low, sigma, axes="y") + level4 * noise, "you blurred along the columns only: a 2-D Gaussian is "
                                                           "a 1-D one along x, then one along y"),
            (gaussian_blur(low, torch.full_like(sigma, float(sigma.max()))) + level4 * noise,
             "every image got the widest blur: image b is blurred with its own sigma[b]"),
            (gaussian_blur(low, sigma[:1].expand(B).contiguous()) + level4 * noise,
             "every image got the first image's blur: image b is blurred with its own sigma[b]"),
        ]
        if r > 3:
            mistakes.append((_blur(low, sigma, radius=3) + level4 * noise,
                             f"the kernel is too short: it must reach 3 sigma, here {r} pixels on each side (r = "
                             "ceil(3 * sigma.max())), not a fixed 3"))
        mistakes += [(_blur(low, sigma, radius=max(1, math.ceil(k * float(sigma.max())))) + level4 * noise,
                      f"the kernel is too short: taps from -r to r with r = max(1, ceil(3 * sigma.max())), not "
                      f"{k:g} sigma") for k in (1, 2, 2.5)]
        for wrong, hint in mistakes:
            if wrong.shape == out.shape and torch.allclose(out, wrong.float(), atol=1e-4) \
                    and not torch.allclose(wrong.float(), want, atol=1e-4):
                raise CheckFailed(f"{label}: {hint}")
        residual = (out - blurred) / level4.clamp(min=1e-8)
        noisy = level > 0
        if noisy.sum() >= 2 and torch.allclose(out[~noisy], want[~noisy], atol=1e-4) \
                and 0.7 < residual[noisy].std().item() < 1.3 and not torch.allclose(residual[noisy], noise[noisy],
                                                                                      atol=1e-2):
            raise CheckFailed(f"{label}: use the `noise` given (do not draw your own), so that the answer can be "
                              "checked and the caller decides the randomness")
        inner = (slice(None), slice(None), slice(r, H - r), slice(r, W - r))
        if torch.allclose(out[inner], want[inner], atol=1e-4):
            raise CheckFailed(f"{label}: right inside, wrong within {r} pixels of the border: pad each image by the "
                              "kernel's radius with mode='reflect' before convolving")
        expect_close(out, want, label, atol=1e-4,
                     hint="per image b: a 1-D kernel exp(-x^2 / (2 sigma_b^2)) at x = -r..r, normalised, applied "
                          "along x and then y on the reflect-padded image; then + level_b * noise_b")
    passed(name, "per-image Gaussian blur (sigma 0 to 1.6, reflect padding) then per-image noise, as "
                 "upsampler.gaussian_blur and Upsampler.corrupt make them")


# ----------------------------------------------------------------------------- the student's guidance, sampling

def cfg_decoding(fn, model, clip, embeds, score, guidance, steps=SAMPLE_STEPS, seed=0):
    """The student's cfg_prediction put to work: DDIM (the library's sampler, eta = SAMPLE_ETA) decodes the CLIP
    image embeddings `embeds` (B, D) with the trained decoder `model`, each step's prediction being fn(...) with both
    conditions nulled at scale `guidance`; Decoder.decode (the library) decodes the same embeddings with the same noise.
    score(images) -> a number (e.g. the oracle's caption accuracy) is reported for both."""
    name = "cfg_prediction on the trained decoder"
    conds = model.conditions(clip, embeds)
    device = next(model.parameters()).device
    conds = {k: v.to(device) for k, v in conds.items()}
    null = tuple(n for n in (EMBED, TEXT) if n in conds)
    net = model.diffusion
    was_training = net.training
    net.eval()
    try:
        B = len(embeds)
        g = torch.Generator().manual_seed(seed)
        x_t = torch.randn(B, *net.sample_shape, generator=g).to(device)
        t = torch.full((B,), net.schedule.T * 3 // 5, device=device)
        with torch.no_grad():
            got = call(fn, _Watched(net, conds), x_t, t, dict(conds), guidance, null, name="cfg_prediction")
            want = diffusion.guided_prediction(net, x_t, t, conds, guidance, null)
        expect_shape(got, want.shape, f"cfg_prediction(decoder, x_t {tuple(x_t.shape)}, t, conds, w={guidance:g}, "
                                      f"null={null})")
        if not torch.allclose(got.detach().float(), want, atol=1e-3, rtol=1e-3):
            raise CheckFailed(f"{name}: on the trained decoder at t = {int(t[0])} your cfg_prediction differs from "
                              "diffusion.guided_prediction; make the check of the exercise above pass first")

        def guided(x, t, **c):     # the network the sampler sees: your guidance around the decoder
            return fn(net, x, t, c, guidance, null)

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type in ("cpu", "cuda")):
            mine = diffusion.sample(guided, net.schedule, (B, *net.sample_shape), steps, "ddim", SAMPLE_ETA, conds,
                                    None, seed, clip_x0=True, prediction=net.prediction, device=device)
        mine = mine.float().clamp(-1, 1)
    finally:
        net.train(was_training)
    library = model.decode(clip, embeds, guidance=guidance, steps=steps, seed=seed)
    gap = (mine.cpu() - library.cpu()).abs().mean().item()
    mine_score, library_score = float(score(mine.cpu())), float(score(library.cpu()))
    passed(name, f"{B} real test embeddings decoded at w = {guidance:g}, DDIM-{steps} with the same noise: "
                 f"caption accuracy {mine_score:.3f} with your guidance, {library_score:.3f} with Decoder.decode "
                 f"(mean |pixel difference| {gap:.3f}, bfloat16 rounding)")
