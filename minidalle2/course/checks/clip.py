"""Checks of chapter 07 (CLIP): the symmetric contrastive loss and zero-shot classification."""

import math

import torch
import torch.nn.functional as F

from ... import clip
from .core import CheckFailed, call, expect_close, expect_shape, passed


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g), dim=-1)   # pairs roughly aligned
    return img, txt


def contrastive_loss(fn):
    """fn(image_features, text_features, logit_scale) -> the symmetric InfoNCE loss (a scalar), with
    unit-length features (N, D) and logit_scale = 1 / tau (already exponentiated)."""
    name = "contrastive_loss"
    img, txt = _features()
    scale = 14.0
    loss = call(fn, img, txt, scale, name=name)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CheckFailed(f"{name}: expected a scalar tensor (one loss), got "
                          f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
                          " - average the cross-entropies over the batch")
    labels = torch.arange(len(img))
    logits = scale * img @ txt.T
    i2t, t2i = F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    expected = 0.5 * (i2t + t2i)
    wrong = [(i2t, "only one direction (image -> text): add the text -> image term, CE of logits.T, and average"),
             (t2i, "only one direction (text -> image): add the image -> text term, CE of logits, and average"),
             (i2t + t2i, "the sum of the two directions: average them (multiply by 1/2)"),
             (0.5 * (F.cross_entropy(img @ txt.T, labels) + F.cross_entropy(txt @ img.T, labels)),
              "the temperature is missing: multiply the cosines by logit_scale"),
             (0.5 * (F.cross_entropy(logits / 0.07, labels) + F.cross_entropy(logits.T / 0.07, labels)),
              "logit_scale is already 1 / tau: do not divide by 0.07 again"),
             (0.5 * (F.cross_entropy(logits / scale ** 2, labels) + F.cross_entropy(logits.T / scale ** 2, labels)),
              "you divided by logit_scale: it multiplies the cosines (logits = logit_scale * cos)")]
    for value, hint in wrong:
        if math.isclose(loss.item(), value.item(), rel_tol=1e-5):
            raise CheckFailed(f"{name}: wrong value {loss.item():.4f} - {hint}")
    expect_close(loss.reshape(()), expected, f"{name}(image_features, text_features, logit_scale)",
                 hint="0.5 * (CE(logits, arange(N)) + CE(logits.T, arange(N))), logits = logit_scale * img @ txt.T")
    # the labels are the diagonal: a batch of perfect pairs with a large scale costs ~0
    eye = torch.eye(5)
    perfect = call(fn, eye, eye, 100.0, name=name)
    expect_close(perfect.reshape(()), torch.tensor(0.0), f"{name} on 5 perfect, orthogonal pairs at scale 100",
                 atol=1e-4, hint="the target of row i is column i (torch.arange(N))")
    # gradients reach both towers and the temperature
    a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    out = call(fn, a, b, s, name=name)
    if not out.requires_grad:
        raise CheckFailed(f"{name}: the loss does not depend on its inputs through autograd "
                          "(did you use .detach(), .item() or numpy?)")
    out.backward()
    a2, b2 = img.clone().requires_grad_(), txt.clone().requires_grad_()
    s2 = torch.tensor(scale, requires_grad=True)
    clip.contrastive_loss(a2, b2, s2).backward()
    expect_close(a.grad, a2.grad, f"{name}: gradient w.r.t. the image features")
    expect_close(b.grad, b2.grad, f"{name}: gradient w.r.t. the text features")
    expect_close(s.grad, s2.grad, f"{name}: gradient w.r.t. logit_scale")
    return passed(name, "value, both directions averaged, the temperature, and gradients to both towers and tau")


def zero_shot_classify(fn):
    """fn(image_features (N, D), class_features (K, P, D), logit_scale) -> predicted class per image (N,) long:
    score_k = logsumexp_p(logit_scale * <v, t_kp>), the log of the summed probabilities of class k's prompts."""
    name = "zero_shot_classify"
    g = torch.Generator().manual_seed(1)
    k, p, d, n, scale = 5, 6, 8, 64, 10.0
    classes = F.normalize(torch.randn(k, p, d, generator=g), dim=-1)
    images = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    pred = call(fn, images, classes, scale, name=name)
    if isinstance(pred, torch.Tensor) and pred.shape in ((k,), (p,), (n, k), (n, p)):
        raise CheckFailed(f"{name}: wrong shape {tuple(pred.shape)}: return one class index per IMAGE, shape ({n},): "
                          "reduce over the prompts (dim 2 of the (N, K, P) scores), then argmax over classes")
    expect_shape(pred, (n,), f"{name}(image_features, class_features, logit_scale)")
    if pred.is_floating_point():
        raise CheckFailed(f"{name}: return class indices (argmax), not scores; got dtype {pred.dtype}")
    pred = pred.cpu()
    expected = clip.zero_shot_classify(images, classes, scale)
    sims = torch.einsum("nd,kpd->nkp", images, classes)
    wrong = [(clip.zero_shot_classify(images, classes), "you averaged the prompt embeddings: score each prompt, "
              "then combine the SCORES with logsumexp over the prompts"),
             ((scale * sims).max(2).values.argmax(1), "you took the best prompt of each class (max); sum the "
              "probabilities of all its prompts instead: torch.logsumexp over dim 2"),
             ((scale * sims).mean(2).argmax(1), "you averaged the logits over prompts; the probabilities add up, "
              "so use torch.logsumexp over the prompts"),
             (torch.logsumexp(sims, 2).argmax(1), "logit_scale is missing: the probabilities are "
              "softmax(logit_scale * cos), so multiply the cosines by logit_scale before logsumexp"),
             (torch.logsumexp(scale * sims, 2).argmin(1), "you picked the least likely class (argmin); use argmax")]
    for value, hint in wrong:
        if torch.equal(pred, value) and not torch.equal(value, expected):
            raise CheckFailed(f"{name}: wrong predictions - {hint}")
    if not torch.equal(pred, expected):
        bad = int((pred != expected).sum())
        raise CheckFailed(f"{name}: {bad} of {n} predictions differ from the reference; score_k = "
                          "logsumexp over prompts p of logit_scale * <v, t_kp>, then argmax over classes k")
    return passed(name, f"{n} predictions: logit_scale, logsumexp over {p} prompts, argmax over {k} classes")
