"""
A denoising network together with the diffusion process it was trained for (chapters 09-14).

    net = UNet(widths=[32, 64, 128], patch_size=2, num_classes=30)
    model = DiffusionModel(net, (3, 32, 32), schedule="cosine", prediction="v", conditions={"cond": 0.15})
    loss, logs = model.loss({"image": x0, "cond": labels})     # train.train(model, ddpm_loss, ...)
    images = model.generate(16, cond=labels, guidance=2.0)     # DDIM-50 with eta = 1 (SAMPLE_STEPS, SAMPLE_ETA)

The network and the sampler (diffusion.py) stay separate, as in diffusers: the network is any module
net(x_t, t, **conditions) -> prediction shaped like x_t -- the U-Net over images, a transformer over
CLIP embeddings (unCLIP's prior: sample_shape (D,)), a U-Net that also reads a low-resolution image
(the upsampler). This class only keeps what a checkpoint must remember to sample correctly -- the
schedule, the prediction type (eps, x0 or v), the loss weighting, and the network's condition inputs
with the share of training rows in which each is dropped for classifier-free guidance -- in `config`,
saved beside the weights. A model trained to predict v and sampled as if it predicted eps gives noise,
so these are never left for the caller to remember.
"""

import inspect
import time

import torch
from torch import nn

from . import data
from .diffusion import PREDICTIONS, Schedule, as_conditions, ddim_invert, diffusion_loss, sample

WEIGHTINGS = (None, "min_snr")

# The sampler every chapter uses unless told otherwise: DDIM-50 with eta = 1 (fresh noise at each step, as in DDPM).
# The noise lets later steps correct an imperfect model's earlier mistakes at the same cost per step (notebook 09).
SAMPLE_STEPS = 50
SAMPLE_ETA = 1.0


class DiffusionModel(nn.Module):
    """model(x_t, t, **conditions) -> prediction; .loss(batch); .generate(n, cond, guidance, ...).

    net: the denoiser; sample_shape: one sample's shape, (C, H, W) or (D,); conditions: {name: p_drop} for each
    condition input of the net (a keyword argument, and the batch entry of the same name), with the share of
    training rows in which it is replaced by its null (0: never dropped, e.g. an upsampler's low-res image);
    data_key: the batch entry holding the clean samples x0."""

    def __init__(self, net: nn.Module, sample_shape, schedule="linear", T=1000, prediction="eps", weighting=None,
                 conditions=None, data_key="image"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be a torch.nn.Module (the denoising network), got {type(net).__name__}")
        if not (isinstance(sample_shape, (tuple, list)) and sample_shape
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sample_shape)):
            raise ValueError(f"sample_shape must be the shape of one sample, e.g. (3, 32, 32) or (64,), got {sample_shape!r}")
        conditions = dict(conditions or {})
        for name, p in conditions.items():
            if not isinstance(name, str) or isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"conditions maps each condition input's name to its drop probability in [0, 1), "
                                 f"got {name!r}: {p!r}")
        inputs = inspect.signature(net.forward).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in inputs.values()):
            missing = [name for name in conditions if name not in inputs]
            if missing:
                raise ValueError(f"conditions names {missing}, but the network takes no such input "
                                 f"(its inputs: {', '.join(inputs)})")
        null = getattr(net, "null_condition", None)
        if "cond" in conditions and callable(null) and null(1) is None:
            raise ValueError("conditions names 'cond', but the network has none (give it num_classes or cond_dim)")
        net_T = getattr(net, "config", {}).get("num_timesteps")
        if net_T is not None and net_T != T:
            raise ValueError(f"the network embeds t in [0, {net_T}) but the process has T = {T}: build it with "
                             f"num_timesteps={T}")
        self.net = net
        self.sample_shape = tuple(sample_shape)
        self.schedule = Schedule(schedule, T)
        self.prediction, self.weighting, self.conditions, self.data_key = prediction, weighting, conditions, data_key
        self.config = dict(net=getattr(net, "config", None), network=type(net).__name__,
                           sample_shape=list(self.sample_shape), schedule=schedule, T=T, prediction=prediction,
                           weighting=weighting, conditions=conditions, data_key=data_key)

    @classmethod
    def factory(cls, net_class):
        """For checkpoint.load_model: config -> a DiffusionModel around net_class(**config["net"])."""
        def from_config(net, network=None, **process):
            if not isinstance(net, dict):
                raise ValueError(f"this checkpoint has no network config to rebuild a {net_class.__name__} from")
            if network is not None and network != net_class.__name__:
                raise ValueError(f"this checkpoint's network is a {network}, not a {net_class.__name__}")
            return cls(net_class(**net), **process)
        return from_config

    @property
    def conditional(self):
        return bool(self.conditions)

    def forward(self, x_t, t, cond=None, **conditions):
        if cond is not None:
            conditions["cond"] = cond
        return self.net(x_t, t, **conditions)

    def loss(self, batch, generator=None):
        """diffusion.diffusion_loss with this model's prediction, weighting and condition dropout."""
        return diffusion_loss(self, batch, self.schedule, self.prediction, self.weighting, image_key=self.data_key,
                              generator=generator, conditions=self.conditions)

    @torch.no_grad()
    def generate(self, n, cond=None, guidance=None, steps=SAMPLE_STEPS, method="ddim", eta=None, seed=0,
                 bf16=True, progress=False, batch_size=500, null=None, clip_x0=None, x_T=None):
        """n samples (images clamped to [-1, 1]): diffusion.sample with this model's schedule and prediction type,
        in batches of `batch_size`, under bfloat16 autocast (the sampler's arithmetic stays float32).
        cond: a tensor (the condition named "cond") or a dict of named conditions, n rows each; a conditional
        model given none samples its unconditional model. guidance: a CFG scale (nulling `null`, default: the
        conditions this model drops in training) or a callable. eta=None is SAMPLE_ETA for DDIM.
        clip_x0=None clips the predicted x0 to [-1, 1] for images (C, H, W) only: vectors have no such range.
        x_T: (n, *sample_shape) starting noise instead of the seed's draw (e.g. invert()'s)."""
        if eta is None:
            eta = SAMPLE_ETA if method == "ddim" else 0.0
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of samples, got {n!r}")
        seed = data.check_seed(seed)
        is_image = len(self.sample_shape) == 3
        clip_x0 = is_image if clip_x0 is None else clip_x0
        conds = self._complete(as_conditions(cond), n)
        if x_T is not None and (not isinstance(x_T, torch.Tensor) or tuple(x_T.shape) != (n, *self.sample_shape)):
            got = tuple(x_T.shape) if isinstance(x_T, torch.Tensor) else type(x_T).__name__
            raise ValueError(f"x_T must be the starting noise of the {n} samples, {(n, *self.sample_shape)}, got {got}")
        if null is None and isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
            null = tuple(name for name, p in self.conditions.items() if p > 0)   # what training taught it to do without
            if not null and guidance != 1:
                raise ValueError("this model never drops a condition in training, so it has no unconditional "
                                 "prediction to guide with: use guidance=None (or give `null` explicitly)")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = []
        for start in range(0, n, batch_size):
            part = {k: v[start:start + batch_size] for k, v in conds.items()}
            size = min(batch_size, n - start)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type in ("cpu", "cuda")):
                out.append(sample(self, self.schedule, (size, *self.sample_shape), steps, method, eta, part, guidance,
                                  seed + start, clip_x0=clip_x0, prediction=self.prediction, progress=progress,
                                  null=null, x_T=None if x_T is None else x_T[start:start + size]).float())
        self.train(was_training)
        out = torch.cat(out)
        return out.clamp(-1, 1) if is_image else out

    @torch.no_grad()
    def invert(self, x0, cond=None, guidance=None, steps=SAMPLE_STEPS, null=None, bf16=True, progress=False):
        """The starting noise x_T from which generate(..., x_T=x_T, eta=0, same cond, guidance, steps) returns to
        x0 (diffusion.ddim_invert), e.g. a real image's noise for its variations."""
        if not isinstance(x0, torch.Tensor) or tuple(x0.shape[1:]) != self.sample_shape or len(x0) < 1:
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(f"invert expects samples (B, {', '.join(map(str, self.sample_shape))}), got {got}")
        conds = self._complete(as_conditions(cond), len(x0))
        if null is None and isinstance(guidance, (int, float)) and not isinstance(guidance, bool):
            null = tuple(name for name, p in self.conditions.items() if p > 0)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type in ("cpu", "cuda")):
            x_T = ddim_invert(self, self.schedule, x0.float().to(device), steps, conds,
                              None if guidance in (None, 1) else guidance, self.prediction, null=null,
                              progress=progress)
        self.train(was_training)
        return x_T.float()

    def _complete(self, conds, n):
        """conds checked against this model's conditions; a conditional model given none: its unconditional model."""
        unknown = sorted(set(conds) - set(self.conditions))
        if unknown and not self.conditional:
            raise ValueError("this model is unconditional: leave cond=None")
        if unknown:
            raise ValueError(f"this model's conditions are {sorted(self.conditions)}, got {unknown}")
        if self.conditional and not conds:
            conds = self._null_conditions(n)   # no condition given: sample the unconditional model
        missing = sorted(set(self.conditions) - set(conds))
        if missing:
            raise ValueError(f"this model also needs the condition(s) {missing} (it takes {sorted(self.conditions)})")
        return conds

    def _null_conditions(self, n):
        make = getattr(self.net, "null_condition", None)
        if make is None or set(self.conditions) != {"cond"}:
            raise ValueError(f"this model is conditional ({', '.join(sorted(self.conditions))}): give cond")
        return {"cond": make(n)}


def ddpm_loss(model, batch):
    """The loss for train.train: the model's own (prediction, weighting, dropout)."""
    return model.loss(batch)


# ----------------------------------------------------------------------------- Shapes classes

def class_batch(batch):
    """Add batch["cond"] = the class (shape x colour, 0..29) of each one-object Shapes scene."""
    first = batch["objects"][:, 0]
    return {**batch, "cond": data.pair_id(first[:, 0], first[:, 1])}


def class_conditional_loss(model, batch):
    """The loss of a model conditioned on the Shapes class (chapter 11): ddpm_loss on class_batch(batch)."""
    return model.loss(class_batch(batch))


def timed_generate(model, n=64, **kwargs):
    """(images, seconds): the sampling time the chapter bars are about (DDIM-50 of 64 images by default)."""
    start = time.perf_counter()
    images = model.generate(n, **kwargs)
    return images, time.perf_counter() - start
