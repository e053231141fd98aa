"""
Diffusion (DDPM, Ho et al. 2020; DDIM, Song et al. 2021): the process and the samplers, not the network.

    schedule = Schedule("cosine", T=1000)
    x_t = q_sample(schedule, x0, t, noise)                       # forward: add noise to data
    loss, logs = diffusion_loss(model, {"image": x0}, schedule)  # train model(x_t, t) to predict the noise
    images = sample(model, schedule, (16, 3, 32, 32), steps=50)  # reverse: noise -> data (DDIM)

As in diffusers, the network and the sampler are separate: the network is any callable
model(x_t, t, **conditions) -> prediction (t a LongTensor (B,)), everything else lives here.

Timesteps are 0 .. T-1 (the paper's 1 .. T); t = -1 stands for the clean data (alpha-bar = 1).
The forward process has a closed form at every t:

    q(x_t | x_0) = N( sqrt(abar_t) x_0, (1 - abar_t) I ),   abar_t = prod_{s <= t} (1 - beta_s)

The network predicts one of three equivalent things (given x_t, each fixes the other two):
eps (the noise, DDPM), x0 (the clean image) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans &
Ho 2022, well-behaved at both ends of the schedule).

Conditioning and classifier-free guidance (Ho & Salimans 2022): a condition is a tensor with one row per
image -- class ids (B,), vectors (B, D) such as CLIP embeddings, token states (B, L, D) -- passed to the
network as a keyword input, model(x_t, t, cond=...). A network may take several (unCLIP's decoder: a CLIP
embedding and a caption); `cond` is then a dict of them, {"cond": ..., "context": ...}. The null row
(null_condition: -1 for integer ids, NaN for floats) means "no condition": during training
diffusion_loss replaces a random share of each droppable condition's rows by it, each condition
independently with its own probability, so one network learns the conditional and the unconditional
model; the network must map the null to a learned "null" embedding (as unet.UNet does). At sampling
time, guidance=w combines the two predictions as

    pred = pred_u + w (pred_c - pred_u)      w = 0: unconditional, w = 1: conditional, w > 1: guided

where pred_u nulls the conditions named in `null` (default: all of them) and keeps the others, e.g. the
low-resolution image an upsampler is conditioned on. (Given x_t, eps, x0 and v are affine in each other,
so guiding any of the three is the same thing.)
"""

import math

import torch
from tqdm.auto import tqdm

from .data import check_seed

NULL_CLASS = -1                           # the class id that means "unconditional"
PREDICTIONS = ("eps", "x0", "v")
MIN_SNR_GAMMA = 5.0                       # Hang et al. 2023


# ----------------------------------------------------------------------------- noise schedules

class Schedule:
    """betas and every quantity derived from them, for t = 0 .. T-1, as float64 CPU tensors.

    linear: beta_t from 1e-4 to 0.02 in T steps (DDPM; made for T = 1000, far from pure noise at small T).
    cosine: abar_t = f(t + 1) / f(0), f(u) = cos^2( (u/T + s) / (1 + s) * pi/2 ), s = 0.008 (Nichol &
            Dhariwal 2021, with our 0-based t); beta_t = min(1 - f(t+1) / f(t), 0.999): no infinite last step.
    """

    def __init__(self, name="linear", T=1000):
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"Schedule: T (the number of diffusion steps) must be an int >= 2, got {T!r}")
        if name == "linear":
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif name == "cosine":
            f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(T)], dtype=torch.float64)
        else:
            raise ValueError(f"Schedule: unknown schedule {name!r}; choose 'linear' or 'cosine'")
        self.name, self.T = name, T
        self.betas = betas
        self.alphas = 1 - betas                                            # alpha_t = 1 - beta_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)                # abar_t = prod_{s<=t} alpha_s
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # the posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t I)
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1 - abar_prev) / (1 - abar)     # beta~_t = beta_t (1-abar_{t-1}) / (1-abar_t)
        # beta~_0 = 0: its log is clipped to log beta~_1 (as in Nichol & Dhariwal's code)
        self.posterior_log_variance_clipped = torch.cat([self.posterior_variance[1:2],
                                                         self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1 - abar)            # for x_0
        self.posterior_mean_coef2 = (1 - abar_prev) * self.alphas.sqrt() / (1 - abar)  # for x_t

    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t): decreasing in t."""
        abar = self.alphas_cumprod[_check_t(self, t)]
        return abar / (1 - abar)

    def abar(self, t):
        """abar_t as a float, with abar_{-1} = 1 (the clean data)."""
        return 1.0 if t == -1 else float(self.alphas_cumprod[t])

    def __repr__(self):
        return f"Schedule({self.name!r}, T={self.T})"


def _check_t(schedule, t, batch=None):
    """t (an int or integer tensor) as a LongTensor (N,) on the CPU; a clear error for a bad value."""
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"timesteps must be integers in [0, {schedule.T - 1}], got dtype {t.dtype}")
    t = t.cpu().long().reshape(-1)
    if batch is not None and len(t) not in (1, batch):
        raise ValueError(f"got {len(t)} timesteps for a batch of {batch}")
    if len(t) and (t.min() < 0 or t.max() >= schedule.T):
        raise ValueError(f"timestep out of range: got values in [{int(t.min())}, {int(t.max())}], "
                         f"the schedule has t = 0 .. {schedule.T - 1}")
    return t


def _at(values, t, x):
    """values[t] for checked timesteps t (N,), shaped (N, 1, 1, ...) to broadcast against x (B, ...)."""
    return values[t].to(x.dtype).to(x.device).reshape(-1, *[1] * (x.ndim - 1))


# ----------------------------------------------------------------------------- forward process, targets

def q_sample(schedule, x0, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for timesteps t (B,) or one int."""
    if not isinstance(noise, torch.Tensor) or noise.shape != x0.shape:
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"q_sample: noise must have the shape of x0 {tuple(x0.shape)} (one draw per value), got {got}")
    t = _check_t(schedule, t, len(x0))
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (what the network outputs), got {prediction!r}")


def training_target(schedule, x0, noise, t, prediction="eps"):
    """What the network should output at x_t = q_sample(x0, t, noise): eps, x0, or v."""
    _check_prediction(prediction)
    t = _check_t(schedule, t, len(x0))
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    a, s = _at(schedule.sqrt_alphas_cumprod, t, x0), _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
    return a * noise - s * x0                                  # v = sqrt(abar) eps - sqrt(1-abar) x0


def predict_x0_eps(schedule, x_t, t, pred, prediction="eps"):
    """The (x0, eps) pair implied by a network output of any parameterisation, at x_t."""
    _check_prediction(prediction)
    t = _check_t(schedule, t, len(x_t))
    a, s = _at(schedule.sqrt_alphas_cumprod, t, x_t), _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    if prediction == "eps":
        return (x_t - s * pred) / a, pred                      # x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)
    if prediction == "x0":
        return pred, (x_t - a * pred) / s                      # eps = (x_t - sqrt(abar) x0) / sqrt(1-abar)
    return a * x_t - s * pred, s * x_t + a * pred              # x0 = a x_t - s v,  eps = s x_t + a v


def min_snr_weight(schedule, t, prediction="eps", gamma=MIN_SNR_GAMMA):
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) on the x0 error, written for each
    target: eps -> min(SNR, g) / SNR, x0 -> min(SNR, g), v -> min(SNR, g) / (SNR + 1)."""
    _check_prediction(prediction)
    snr = schedule.snr(t)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction].float()


# ----------------------------------------------------------------------------- training

def null_condition(cond):
    """"No condition" shaped like cond: NULL_CLASS (-1) ids for class ids (B,), NaN rows for float rows
    (vectors (B, D) such as CLIP embeddings, token states (B, L, D)); a NaN row is the -1 of floats, so the
    network swaps in a learned null."""
    ok = isinstance(cond, torch.Tensor) and not cond.is_complex() and (
        (cond.ndim == 1 and not cond.is_floating_point() and cond.dtype != torch.bool)
        or (cond.ndim >= 2 and cond.is_floating_point()))
    if not ok:
        raise ValueError("a droppable condition is class ids (B,) (an integer tensor) or float rows (B, D) or "
                         "(B, L, D) (vectors, token states), got "
                         f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}"
                         f"{' ' + str(cond.dtype) if isinstance(cond, torch.Tensor) else ''}")
    return torch.full_like(cond, float("nan") if cond.is_floating_point() else NULL_CLASS)


def drop_condition(cond, p_uncond, generator=None):
    """cond with a random share p_uncond of its rows replaced by null_condition (CFG training)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be a probability in [0, 1], got {p_uncond!r}")
    null = null_condition(cond)
    drop = torch.rand(len(cond), generator=generator).to(cond.device) < p_uncond
    return torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), null, cond)


def as_conditions(cond):
    """The network's condition inputs as a dict {keyword: tensor}: None -> {}, a tensor -> {"cond": tensor}."""
    if cond is None:
        return {}
    if isinstance(cond, torch.Tensor):
        return {"cond": cond}
    if isinstance(cond, dict) and all(isinstance(k, str) for k in cond):
        return {k: v for k, v in cond.items() if v is not None}
    raise ValueError(f"cond must be None, a tensor, or a dict of named condition tensors, got {type(cond).__name__}")


def _check_rows(conds, batch, who):
    for name, c in conds.items():
        if not isinstance(c, torch.Tensor) or c.ndim == 0 or len(c) != batch:
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            what = "cond" if name == "cond" else f"cond[{name!r}]"
            raise ValueError(f"{who}: {what} must be a tensor of {batch} conditions (one row per sample) for a "
                             f"batch of {batch}, got {got}")


def diffusion_loss(model, batch, schedule, prediction="eps", weighting=None, cond_key=None, p_uncond=0.0,
                   image_key="image", generator=None, conditions=None):
    """The denoising loss: t ~ U{0..T-1}, eps ~ N(0, I), x_t = q_sample(x0, t, eps), and
    loss = mean_b[ w_b * mean_pixels (model(x_t, t, **conds) - target)^2 ], w = 1 or min-SNR-5.

    For train.train: loss_fn = functools.partial(diffusion_loss, schedule=schedule, prediction="v").
    conditions = {name: p_drop}: the network's condition inputs, read from the batch entries of the same name,
    each replaced by its null in a random share p_drop of the rows (independently). cond_key / p_uncond is the
    one-condition shorthand: the batch entry cond_key, passed as cond=. None of either: an unconditional model.
    Random draws use `generator` (CPU) if given, else torch's global RNG (which train.train seeds)."""
    if weighting not in (None, "min_snr"):
        raise ValueError(f"weighting must be None or 'min_snr', got {weighting!r}")
    _check_prediction(prediction)
    if cond_key is not None and conditions:
        raise ValueError("diffusion_loss: give cond_key (one condition) or conditions (several), not both")
    sources = {"cond": (cond_key, p_uncond)} if cond_key is not None else \
        {name: (name, p) for name, p in (conditions or {}).items()}
    x0 = batch[image_key]
    t = torch.randint(0, schedule.T, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    conds = {}
    for name, (key, p_drop) in sources.items():
        if key not in batch:
            what = "cond_key" if cond_key is not None else "the condition"
            raise ValueError(f"diffusion_loss: {what} {key!r} is not in the batch (keys: {sorted(batch)})")
        conds[name] = drop_condition(batch[key], p_drop, generator) if p_drop > 0 else batch[key]
    pred = _call(model, x_t, t.to(x0.device), conds).float()
    target = training_target(schedule, x0, noise, t, prediction).float()
    mse = (pred - target).pow(2).flatten(1).mean(1)                          # (B,)
    weights = min_snr_weight(schedule, t, prediction).to(mse.device) if weighting == "min_snr" else 1.0
    loss = (weights * mse).mean()
    return loss, {"mse": mse.mean().detach()}


def _call(model, x, t, conds):
    """model(x, t, **conds) with a clear error if its output does not have the shape of x."""
    out = model(x, t, **conds)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return a prediction shaped like x_t {tuple(x.shape)}, got {got}")
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- one reverse step

def _check_step(schedule, t, t_prev):
    if not (isinstance(t, int) and 0 <= t < schedule.T):
        raise ValueError(f"timestep out of range: t must be an int in [0, {schedule.T - 1}], got {t!r}")
    if not (isinstance(t_prev, int) and -1 <= t_prev < t):
        raise ValueError(f"t_prev must be an int in [-1, t) = [-1, {t}) (-1: the clean data), got {t_prev!r}")


def _x0_eps(schedule, pred, t, x_t, prediction, clip_x0):
    x0, eps = predict_x0_eps(schedule, x_t, t, pred, prediction)
    if clip_x0:   # the data lives in [-1, 1]; eps is recomputed so that (x0, eps) still explain x_t
        x0 = x0.clamp(-1, 1)
        eps = (x_t - math.sqrt(schedule.abar(t)) * x0) / math.sqrt(1 - schedule.abar(t))
    return x0, eps


def ddpm_step(schedule, pred, t, x_t, t_prev=None, prediction="eps", variance="fixed_small", clip_x0=True,
              noise=None):
    """Ancestral step x_t -> x_{t_prev} (t_prev = t - 1 unless striding): sample the posterior
    q(x_{t_prev} | x_t, x0_hat) with x0_hat predicted (and clipped). With a = abar_t / abar_prev, b = 1 - a:

        mean = sqrt(abar_prev) b / (1 - abar_t) x0_hat + sqrt(a) (1 - abar_prev) / (1 - abar_t) x_t
        var  = b (1 - abar_prev) / (1 - abar_t)  ("fixed_small", beta~_t)   or   b  ("fixed_large", beta_t)

    No noise is added on the last step (t_prev = -1). Returns (x_{t_prev}, x0_hat)."""
    t_prev = t - 1 if t_prev is None else t_prev
    _check_step(schedule, t, t_prev)
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' (beta~_t) or 'fixed_large' (beta_t), got {variance!r}")
    abar, abar_prev = schedule.abar(t), schedule.abar(t_prev)
    alpha = abar / abar_prev
    beta = 1 - alpha
    x0, _ = _x0_eps(schedule, pred, t, x_t, prediction, clip_x0)
    mean = math.sqrt(abar_prev) * beta / (1 - abar) * x0 + math.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x_t
    if t_prev < 0:
        return mean, x0
    var = beta * (1 - abar_prev) / (1 - abar) if variance == "fixed_small" else beta
    noise = torch.randn_like(x_t) if noise is None else noise
    return mean + math.sqrt(var) * noise, x0


def ddim_step(schedule, pred, t, x_t, t_prev, prediction="eps", eta=0.0, clip_x0=True, noise=None):
    """DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12): keep the predicted noise direction,

        x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
        sigma  = eta sqrt( (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev) )

    eta = 0: deterministic; eta = 1: the DDPM posterior variance. Returns (x_{t_prev}, x0_hat)."""
    _check_step(schedule, t, t_prev)
    check_scale(eta, "eta")
    abar, abar_prev = schedule.abar(t), schedule.abar(t_prev)
    x0, eps = _x0_eps(schedule, pred, t, x_t, prediction, clip_x0)
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * (torch.randn_like(x_t) if noise is None else noise)
    return x_prev, x0


def check_scale(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# ----------------------------------------------------------------------------- the sampling loop

def timesteps(schedule, steps, spacing="trailing"):
    """The descending timesteps a `steps`-step sampler visits, exactly as diffusers' set_timesteps:

        trailing: round(T - i T/steps) - 1, i = 0 .. steps-1   e.g. T=1000, 50 steps: 999, 979, ..., 19
        leading:  i (T // steps), reversed                     e.g. T=1000, 50 steps: 980, 960, ..., 0

    "trailing" (the default) starts at t = T-1, where x_T ~ N(0, I) really is the noise the model saw
    in training (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed")."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= schedule.T:
        raise ValueError(f"steps must be an int in [1, T = {schedule.T}], got {steps!r}")
    if spacing == "trailing":
        return [round(schedule.T - i * (schedule.T / steps)) - 1 for i in range(steps)]
    if spacing == "leading":
        return [i * (schedule.T // steps) for i in reversed(range(steps))]
    raise ValueError(f"spacing must be 'trailing' or 'leading', got {spacing!r}")


def guided_prediction(model, x_t, t, cond=None, guidance=None, null=None):
    """The network's prediction at (x_t, t) given `cond` (None, a tensor passed as cond=, or a dict of named
    conditions), with guidance: None; a callable guidance(x_t, t, prediction) -> prediction (e.g. classifier
    guidance; it runs under no_grad, use torch.enable_grad() inside); or a CFG scale w: pred_u + w (pred_c - pred_u),
    where pred_u replaces the conditions named in `null` (default: all) by null_condition."""
    t = torch.full((len(x_t),), t, dtype=torch.long, device=x_t.device) if isinstance(t, int) else t
    conds = as_conditions(cond)
    if guidance is None or callable(guidance):
        pred = _call(model, x_t, t, conds)
        return pred if guidance is None else guidance(x_t, t, pred)
    check_scale(guidance, "guidance scale")
    if not conds:
        raise ValueError("classifier-free guidance (a guidance scale) needs cond: class ids (B,), vectors (B, D), ...")
    if guidance == 1:                            # purely conditional: one call, nothing nulled
        return _call(model, x_t, t, conds)
    null = tuple(conds) if null is None else tuple(null)
    unknown = [name for name in null if name not in conds]
    if not null or unknown:
        raise ValueError("classifier-free guidance nulls only conditions it was given: "
                         f"got {sorted(conds)}, asked to null {list(null) or 'none'}")
    nulled = {k: null_condition(v) if k in null else v for k, v in conds.items()}
    if guidance == 0:                            # purely unconditional: one call
        return _call(model, x_t, t, nulled)
    both = _call(model, torch.cat([x_t, x_t]), torch.cat([t, t]),
                 {k: torch.cat([conds[k], nulled[k]]) for k in conds})
    pred_c, pred_u = both.chunk(2)
    return pred_u + guidance * (pred_c - pred_u)


def _check_shape(shape):
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"shape must be a tuple of positive ints (B, C, H, W) (or (B, D)), got {shape!r}")
    return tuple(shape)


@torch.no_grad()
def sample(model, schedule, shape, steps=50, method="ddim", eta=0.0, cond=None, guidance=None, seed=0,
           clip_x0=True, progress=False, prediction="eps", variance="fixed_small", spacing="trailing",
           device=None, null=None, x_T=None):
    """Draw samples of `shape` by running the reverse process over `steps` timesteps (see timesteps()).

    method "ddim" (eta = 0: deterministic) or "ddpm" (ancestral, `variance` fixed_small / fixed_large).
    cond: the network's condition(s), one row per sample (a tensor passed as cond=, or a dict of named tensors);
    guidance: None, a CFG scale w >= 0 (nulls the conditions named in `null`, default all), or a callable
    (see guided_prediction). Samples of shape (B, C, H, W) are images; (B, D) vectors work the same way. All noise comes from one CPU generator seeded with `seed`, so the
    result does not depend on the global RNG, and the noise is the same on every device. x_T: the starting noise
    (`shape`) instead of a draw, e.g. ddim_invert's, or one noise held fixed along an interpolation."""
    shape = _check_shape(shape)
    if method not in ("ddim", "ddpm"):
        raise ValueError(f"method must be 'ddim' or 'ddpm', got {method!r}")
    check_scale(eta, "eta")
    if method == "ddpm" and eta != 0:
        raise ValueError("eta is a DDIM parameter; method='ddpm' is eta = 1 already (leave eta at 0)")
    _check_prediction(prediction)
    ts = timesteps(schedule, steps, spacing)
    if device is None:
        param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    conds = as_conditions(cond)
    _check_rows(conds, shape[0], "sample")
    conds = {k: v.to(device) for k, v in conds.items()}
    g = torch.Generator().manual_seed(check_seed(seed))
    x = torch.randn(shape, generator=g).to(device)                  # x_T ~ N(0, I)
    if x_T is not None:   # drawn anyway, so that the later noise of a stochastic sampler is the same either way
        if not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != shape or not x_T.is_floating_point():
            got = f"{tuple(x_T.shape)}" if isinstance(x_T, torch.Tensor) else type(x_T).__name__
            raise ValueError(f"x_T must be a float tensor of the sample shape {shape}, got {got}")
        if not torch.isfinite(x_T).all():
            raise ValueError("x_T (the starting noise) has NaN or infinite values")
        x = x_T.float().to(device)
    stochastic = method == "ddpm" or eta > 0
    for i, t in enumerate(tqdm(ts, desc=method, disable=not progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        pred = guided_prediction(model, x, t, conds, guidance, null)
        noise = torch.randn(shape, generator=g).to(device) if stochastic else None
        if method == "ddim":
            x, _ = ddim_step(schedule, pred, t, x, t_prev, prediction, eta, clip_x0, noise)
        else:
            x, _ = ddpm_step(schedule, pred, t, x, t_prev, prediction, variance, clip_x0, noise)
    return x


@torch.no_grad()
def ddim_invert(model, schedule, x0, steps=50, cond=None, guidance=None, prediction="eps", spacing="trailing",
                null=None, progress=False):
    """The starting noise x_T from which DDIM with eta = 0 (same steps, cond, guidance) returns to x0: run the
    deterministic ODE forwards. Visiting the sampler's timesteps upwards, from level s (abar_s = 1 at the clean
    start) to t:

        pred   = model(x_s, t)              the unknown prediction at x_t, read at x_s instead (small steps: close)
        eps    = eps from pred, as if x_s were at level t
        x0_hat = (x_s - sqrt(1 - abar_s) eps) / sqrt(abar_s)
        x_t    = sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps

    the DDIM update (ddim_step) solved for the other end. Nothing is clipped: clipping x0 would not invert.
    Mokady et al. 2023 and the unCLIP paper (section 3.1) use it to find an image's latent for its variations."""
    x = x0.float()
    ts = list(reversed(timesteps(schedule, steps, spacing)))
    conds = as_conditions(cond)
    _check_rows(conds, len(x), "ddim_invert")
    device = x.device
    conds = {k: v.to(device) for k, v in conds.items()}
    abar_s = 1.0
    for t in tqdm(ts, desc="ddim inversion", disable=not progress):
        pred = guided_prediction(model, x, t, conds, guidance, null)
        tt = torch.full((len(x),), t, dtype=torch.long, device=device)
        _, eps = predict_x0_eps(schedule, x, tt, pred, prediction)
        x0_hat = (x - math.sqrt(1 - abar_s) * eps) / math.sqrt(abar_s)
        abar_t = schedule.abar(t)
        x = math.sqrt(abar_t) * x0_hat + math.sqrt(1 - abar_t) * eps
        abar_s = abar_t
    return x
