"""
Chapters 10-11: steering a diffusion model towards a class -- classifier guidance and classifier-free guidance.

Classifier guidance (Dhariwal & Nichol 2021). Bayes: log p(x_t | y) = log p(x_t) + log p(y | x_t) + const,
so the score of the class-conditional model is the unconditional score plus the gradient of a classifier
that reads noisy images. The score is -eps / sqrt(1 - abar_t), hence the guided noise prediction

    eps' = eps - s sqrt(1 - abar_t) grad_{x_t} log p_phi(y | x_t, t)        (s: the guidance scale)

We use this one rule for both samplers: it is the paper's DDIM rule (its Algorithm 2), and for DDPM it
moves the reverse mean by s (beta_t / sqrt(alpha_t)) grad log p, which is the paper's Algorithm 1 shift
s Sigma grad log p with Sigma = beta_t, up to the factor 1/sqrt(alpha_t) ~ 1. The classifier is
NoisyClassifier, trained on (x_t, t) pairs with noisy_classifier_loss.

A classifier's raw input gradient is partly adversarial: followed at a large scale, it makes images the
classifier itself reads as the requested class far more often than the oracle does (notebook 10 section 6
measures the gap). Averaging the gradient over Gaussian perturbations of x_t (randomized smoothing, Cohen
et al. 2019) is the gradient of a smoother classifier, which only changes where the picture does;
`smoothing` > 0 turns it on.

Classifier-free guidance (Ho & Salimans 2022): one network, trained with the class replaced by a learned
"null" class 15% of the time, predicts both eps_c = eps(x_t, y) and eps_u = eps(x_t, null), and

    eps' = eps_u + w (eps_c - eps_u)        w = 0: unconditional, w = 1: conditional, w > 1: guided

(diffusion.guided_prediction; the convention of Ho & Salimans' 1 + w is our w). Both trade diversity
for fidelity; recipes/diffusion.py's `sweep` measures the trade with the oracle, never with the guiding classifier.
"""

import torch
import torch.nn.functional as F

from . import data
from .diffusion_model import SAMPLE_STEPS, class_batch
from .diffusion import check_scale, predict_x0_eps, q_sample, training_target

# ----------------------------------------------------------------------------- classifier guidance


def class_log_prob_gradient(classifier, x_t, t, y):
    """grad_{x_t} log p(y | x_t, t), one gradient per image (the images do not interact)."""
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x, t).float(), dim=-1)
        chosen = log_probs[torch.arange(len(y)), y.to(log_probs.device)].sum()
        return torch.autograd.grad(chosen, x)[0]


def smoothed_class_log_prob_gradient(classifier, x_t, t, y, noise_std, samples, generator=None):
    """Randomized smoothing: the gradient of E_delta[log p(y | x_t + noise_std delta, t)], delta ~ N(0, I),
    estimated as the mean of `samples` gradients at perturbed copies of x_t (one classifier call for all)."""
    noise = torch.randn((samples, *x_t.shape), generator=generator).to(x_t)
    perturbed = (x_t + noise_std * noise).flatten(0, 1)                     # (samples * B, C, H, W)
    grads = class_log_prob_gradient(classifier, perturbed, t.repeat(samples), y.to(t.device).repeat(samples))
    return grads.view(samples, *x_t.shape).mean(0)


def classifier_guidance(classifier, schedule, classes, scale, prediction="eps", smoothing=0.0, smoothing_samples=4,
                        seed=0):
    """A guidance callable for diffusion.sample: turns the network's prediction into the guided one,
    eps' = eps - s sqrt(1 - abar_t) grad log p(y | x_t), in the network's own units (eps, x0 or v).
    smoothing = rho > 0: the gradient is averaged over `smoothing_samples` copies of x_t perturbed by
    noise of std rho sqrt(1 - abar_t), i.e. rho times the noise already in x_t (drawn from `seed`)."""
    check_scale(scale, "classifier guidance scale")
    check_scale(smoothing, "smoothing")
    if isinstance(smoothing_samples, bool) or not isinstance(smoothing_samples, int) or smoothing_samples < 1:
        raise ValueError(f"smoothing_samples must be an int >= 1, got {smoothing_samples!r}")
    _check_same_noise(classifier, schedule)
    classes = _check_classes(classes, classifier.num_classes)
    generator = torch.Generator().manual_seed(data.check_seed(seed))

    def guide(x_t, t, pred):
        if scale == 0:
            return pred
        if len(x_t) != len(classes):
            raise ValueError(f"classifier guidance was given {len(classes)} classes for a batch of {len(x_t)}")
        _, eps = predict_x0_eps(schedule, x_t, t, pred, prediction)
        abar = schedule.alphas_cumprod[t.cpu()].to(x_t).reshape(-1, 1, 1, 1)
        sigma = (1 - abar).sqrt()
        if smoothing:
            grad = smoothed_class_log_prob_gradient(classifier, x_t, t, classes, smoothing * sigma, smoothing_samples,
                                                    generator)
        else:
            grad = class_log_prob_gradient(classifier, x_t, t, classes)
        eps = eps - scale * sigma * grad
        x0 = (x_t - sigma * eps) / abar.sqrt()                      # the x0 this eps implies at x_t
        return training_target(schedule, x0, eps, t, prediction)

    return guide


def _check_same_noise(classifier, schedule):
    """A classifier trained on one schedule's x_t misreads another's: at t = 500 cosine noise leaves ~11x the
    signal-to-noise ratio of linear noise, at t = 750 ~50x. Checked where the classifier records its schedule."""
    config = getattr(classifier, "config", {})
    trained_on = (config.get("schedule"), config.get("num_timesteps"))
    if trained_on[0] is not None and trained_on != (schedule.name, schedule.T):
        raise ValueError(f"the classifier was trained on x_t of the {trained_on[0]!r} schedule with "
                         f"T = {trained_on[1]}, but was given the {schedule.name!r} schedule with T = {schedule.T}; "
                         "use the diffusion model's own schedule, with a classifier trained on it "
                         "(noisy_classifier_loss with model.schedule)")


def _check_classes(classes, num_classes):
    classes = torch.as_tensor(classes)
    if classes.ndim != 1 or classes.is_floating_point():
        raise ValueError(f"classes must be a 1-D tensor of integer class ids, got {tuple(classes.shape)} {classes.dtype}")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class id out of range: got values in [{int(classes.min())}, {int(classes.max())}], "
                         f"classes are 0 .. {num_classes - 1}")
    return classes.long()


# the smoothing noise's generator must not start where the sampler's (seeded seed + start) does: x_T itself
SMOOTHING_SEED_OFFSET = 1_000_003


@torch.no_grad()
def classifier_guided_generate(model, classifier, classes, scale, smoothing=0.0, smoothing_samples=4,
                               steps=SAMPLE_STEPS, eta=None, seed=0, batch_size=500, progress=False):
    """Images of `classes` from the unconditional `model`, guided by the noisy `classifier` at `scale`
    (with randomized smoothing of its gradient when smoothing > 0: see classifier_guidance)."""
    classes = _check_classes(classes, classifier.num_classes)
    data.check_seed(seed)
    model_device, classifier_device = next(model.parameters()).device, next(classifier.parameters()).device
    if model_device != classifier_device:
        raise ValueError(f"the diffusion model is on {model_device} but the classifier on {classifier_device}: "
                         "move both to the same device (classifier.to(device))")
    classifier.eval()
    out = []
    for start in range(0, len(classes), batch_size):
        part = classes[start:start + batch_size]
        guide = classifier_guidance(classifier, model.schedule, part, scale, model.prediction, smoothing,
                                    smoothing_samples, seed=SMOOTHING_SEED_OFFSET + seed + start)
        out.append(model.generate(len(part), guidance=guide, steps=steps, eta=eta, seed=seed + start,
                                  progress=progress))
    return torch.cat(out)


def noisy_classifier_loss(classifier, batch, schedule):
    """Cross-entropy of the class (shape x colour) from x_t at a random t: the classifier guidance needs."""
    _check_same_noise(classifier, schedule)
    x0 = batch["image"]
    y = class_batch(batch)["cond"].to(x0.device)
    t = torch.randint(0, schedule.T, (len(x0),))
    x_t = q_sample(schedule, x0, t, torch.randn_like(x0))
    logits = classifier(x_t, t.to(x0.device)).float()
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(-1) == y).float().mean()}


@torch.no_grad()
def accuracy_by_timestep(classifier, schedule, n=1000, bins=4, seed=0):
    """The noisy classifier's accuracy on n test images per range of t (quartiles by default):
    {"t 0-249": ..., ...}. Near t = T the image is gone, so chance (1/30) is all it can do."""
    _check_same_noise(classifier, schedule)
    was_training, device = classifier.training, next(classifier.parameters()).device
    classifier.eval()
    test = data.ShapesDataset(n, "test", seed=seed, num_objects=1)
    batch = test.get_batch(torch.arange(n))
    y = class_batch(batch)["cond"]
    g = torch.Generator().manual_seed(data.check_seed(seed))
    out, edges = {}, [round(i * schedule.T / bins) for i in range(bins + 1)]
    for lo, hi in zip(edges, edges[1:]):
        t = torch.randint(lo, hi, (n,), generator=g)
        x_t = q_sample(schedule, batch["image"], t, torch.randn(batch["image"].shape, generator=g))
        logits = torch.cat([classifier(x_t[i:i + 500].to(device), t[i:i + 500].to(device)) for i in range(0, n, 500)])
        out[f"t {lo}-{hi - 1}"] = (logits.argmax(-1).cpu() == y).float().mean().item()
    classifier.train(was_training)
    return out


# ----------------------------------------------------------------------------- prompts

def classes_from_prompts(prompts):
    """Class ids of one-object prompts that name a shape and a colour ('a red circle'); a clear error otherwise."""
    if prompts is None or isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"give a list of one-object prompts such as ['a red circle'], got {prompts!r}")
    ids = []
    for p in prompts:
        parsed = data.parse_caption(p) if isinstance(p, str) else p
        if len(parsed.objects) != 1 or parsed.objects[0].color is None:
            raise ValueError(f"a class-conditional model draws one object of a given shape and colour; "
                             f"the prompt {str(p)!r} does not name exactly that (try 'a red circle')")
        ids.append(data.pair_id(parsed.objects[0].shape, parsed.objects[0].color))
    return torch.tensor(ids, dtype=torch.long)
