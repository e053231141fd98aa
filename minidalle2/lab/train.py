"""
The one training loop every chapter uses.

    result = train(model, loss_fn, dataset, TrainConfig(steps=1000, batch_size=64, lr=1e-3), run_dir="runs/vae")
    result.ema_model    # the module to sample from: the EMA copy if config.ema_decay is set

loss_fn(model, batch) returns a scalar loss, or (loss, {"name": float}) to log more numbers.
Compared with a bare `loss.backward(); opt.step()` loop, it adds:

- determinism: the batch order and every random draw of step s are pure functions of
  (seed, s), so the same seed gives bit-identical weights on CPU, and resuming from a
  checkpoint continues exactly as if the run had never stopped (no RNG state to carry around);
- AdamW without decay on biases, norm gains and scalars; linear warm-up, then a constant or
  cosine LR; gradient clipping; an EMA copy of the weights (samples better than the last step);
- bf16 autocast (about 2x faster on CPU); a progress bar;
- checkpoints in run_dir every N steps and at the end; a NaN/inf loss stops the run with
  DivergenceError before anything bad is written, so the last good checkpoint survives;
- DDP: run the same script under `torchrun --nproc_per_node K` and each process takes a
  strided 1/K of every global batch; gradients are averaged, so the result matches one process.
"""

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from .checkpoint import (checkpoint_exists, load_checkpoint, load_state_dict_strict, model_config,
                         save_checkpoint, save_model)


@dataclass
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"       # "constant" or "cosine" (to zero), after the warm-up
    grad_clip: float | None = None      # max global grad norm; None = no clipping
    ema_decay: float | None = None      # e.g. 0.999; None = no EMA copy
    ema_warmup: bool = False            # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (train.ema_warmup_fn)
    bf16: bool = False                  # bfloat16 autocast (CPU and CUDA): ~2x faster on CPU
    betas: tuple = (0.9, 0.999)
    seed: int = 0
    device: str = "auto"                # "auto" = cuda, else mps, else cpu
    log_every: int = 10
    checkpoint_every: int | None = None  # steps; a checkpoint is also written at the end

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(f"TrainConfig: {what}")
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)
        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        need(is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an int >= 1, got {self.batch_size!r}")
        need(is_num(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(is_num(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(is_int(self.warmup_steps) and 0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be an int in [0, steps={self.steps}], got {self.warmup_steps!r}")
        need(self.lr_schedule in ("constant", "cosine"),
             f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        need(self.grad_clip is None or (is_num(self.grad_clip) and self.grad_clip > 0),
             f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        need(self.ema_decay is None or (is_num(self.ema_decay) and 0 < self.ema_decay < 1),
             f"ema_decay must be None or in (0, 1), got {self.ema_decay!r}")
        need(isinstance(self.bf16, bool), f"bf16 must be True or False, got {self.bf16!r}")
        need(isinstance(self.ema_warmup, bool), f"ema_warmup must be True or False, got {self.ema_warmup!r}")
        self.betas = tuple(self.betas)  # JSON gives lists back; keep one canonical form
        need(len(self.betas) == 2 and all(is_num(b) and 0 <= b < 1 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas!r}")
        need(is_int(self.seed), f"seed must be an int, got {self.seed!r}")
        need(isinstance(self.device, str), f"device must be a string, got {self.device!r}")
        # only the syntax: a config saved on a GPU machine must still load (and resume on "auto") without one
        index = self.device.partition("cuda:")[2]
        need(self.device in ("auto", "cpu", "cuda", "mps")
             or self.device == f"cuda:{index}" and index.isascii() and index.isdigit(),
             f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}")
        need(is_int(self.log_every) and self.log_every >= 1,
             f"log_every must be an int >= 1, got {self.log_every!r}")
        need(self.checkpoint_every is None or (is_int(self.checkpoint_every) and self.checkpoint_every >= 1),
             f"checkpoint_every must be None or an int >= 1, got {self.checkpoint_every!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        if not self.ema_warmup:  # left out when off, so caches of recipes older than the option stay valid
            del d["ema_warmup"]
        return d

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


CHECKPOINT_SECONDS = 60   # a run with a run_dir saves its state at least this often (one process)


class DivergenceError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the weights of that step were not kept."""

    def __init__(self, message, step, checkpoint):
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    model: nn.Module          # the trained weights (last step)
    ema_model: nn.Module      # the module to sample from: the EMA copy if any, else `model`
    history: list = field(default_factory=list)  # one dict per step: step, loss, lr, grad_norm, seconds, ...
    seconds: float = 0.0      # training time, summed over resumed segments
    step: int = 0
    run_dir: Path | None = None


# -----------------------------------------------------------------------------
# small helpers, each usable on its own

def pick_device(name="auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def machine_description() -> str:
    """One line naming the machine a time was measured on (CPU model, cores, torch, device)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = pick_device()
    if device.type == "cuda":
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__} on {device}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    # torch.manual_seed, minus its lazy CUDA seeding on machines without CUDA (~1 ms a call)
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def derive_seed(*parts) -> int:
    """A seed that is a pure function of `parts`, e.g. (seed, "step", 12, rank)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def lr_factor(step: int, config: TrainConfig) -> float:
    """LR multiplier at 0-based `step`: linear warm-up to 1, then constant or cosine to 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps  # never 0: a step at lr=0 would be wasted
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch)))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of global batch `step`: consecutive slices of a per-epoch permutation."""
    epoch, k = divmod(step, n // batch_size)  # the ragged end of each epoch is skipped
    return epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]


def get_batch(dataset, indices: torch.Tensor):
    if hasattr(dataset, "get_batch"):  # in-memory datasets slice whole tensors at once
        return dataset.get_batch(indices)
    return default_collate([dataset[i] for i in indices.tolist()])


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def ema_warmup_fn(decay):
    """EMA with a warm-up (as diffusers' EMAModel): after n updates the decay is min(decay, (1 + n) / (10 + n)),
    so a short run's average is not dominated by the random initial weights (0.998^500 = 37% of them)."""
    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        d = min(decay, (1 + int(num_averaged)) / (10 + int(num_averaged)))
        if not ema_params[0].is_floating_point():             # integer buffers (ids, counts) are state: copied
            torch._foreach_copy_(ema_params, params)
            return
        torch._foreach_lerp_(ema_params, params, 1 - d)       # ema = d ema + (1 - d) param
    return update


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    # decay weight matrices and kernels only; decaying biases, norm gains or a temperature
    # just pulls them towards 0 for no regularisation benefit
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


_SHOW_PROGRESS = True


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Default for train(progress=None) inside the block (zoo uses it to silence recipes)."""
    global _SHOW_PROGRESS
    old, _SHOW_PROGRESS = _SHOW_PROGRESS, enabled
    try:
        yield
    finally:
        _SHOW_PROGRESS = old


# -----------------------------------------------------------------------------
# run state: everything needed to continue a run exactly

def _save_run_state(path, model, ema, optimizer, scheduler, step, history, seconds, config, kind):
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()  # tensors go to safetensors, the rest (ints, floats) to JSON
    opt_rest = {"param_groups": opt["param_groups"], "state": {}}
    for i, state in opt["state"].items():
        opt_rest["state"][str(i)] = {k: v for k, v in state.items() if not torch.is_tensor(v)}
        tensors.update({f"optim.{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    save_checkpoint(path, tensors, {"kind": "train_state", "model_kind": kind, "step": step,
                                    "seconds": seconds, "config": config.to_dict(), "optimizer": opt_rest,
                                    "scheduler": scheduler.state_dict(), "history": history})


def _load_run_state(path, model, ema, optimizer, scheduler, config):
    tensors, meta = load_checkpoint(path, expected_kind="train_state")
    old = TrainConfig(**meta["config"]).to_dict()
    # steps may grow (train longer); log/checkpoint cadence and device do not change the maths
    changed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in config.to_dict().items()
               if k not in ("steps", "log_every", "checkpoint_every", "device") and old[k] != v]
    if changed:
        raise ValueError(f"{path} is a run with another config ({'; '.join(changed)}); "
                         "pass resume=False or use a new run_dir")
    def part(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    load_state_dict_strict(model, part("model."), path)
    if ema is not None:
        load_state_dict_strict(ema, part("ema."), path)
    state = {int(i): dict(s) for i, s in meta["optimizer"]["state"].items()}
    for key, t in part("optim.").items():
        i, name = key.split(".", 1)
        state[int(i)][name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta["step"], meta["history"], meta["seconds"]


def _divergence(step, loss, grad_norm, checkpoint, checkpoint_step):
    where = (f"the last good checkpoint is {checkpoint}.safetensors (step {checkpoint_step})"
             if checkpoint else "no checkpoint was written")
    return DivergenceError(f"training diverged at step {step}: loss={loss}, grad_norm={grad_norm}; {where}",
                           step, checkpoint)


def setup_distributed(device: torch.device):
    """Under torchrun (WORLD_SIZE > 1), join the process group (nccl on CUDA, gloo on CPU) unless joined.
    Returns this process's device and whether this call created the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _LossModule(nn.Module):
    """Makes loss_fn the forward of one module, so DDP syncs gradients whatever loss_fn calls."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


# -----------------------------------------------------------------------------

def train(model, loss_fn, dataset, config: TrainConfig, *, run_dir=None, kind="model", resume=True,
          on_log=None, progress=None, snapshot=None, checkpoint_seconds=CHECKPOINT_SECONDS) -> TrainResult:
    """Train `model` on loss_fn(model, batch) -> loss or (loss, metrics) with the knobs of `config`.

    With a run_dir the training state is saved there every config.checkpoint_every steps and, in a single
    process, also every `checkpoint_seconds` of wall time (None: never), so a killed run loses at most
    that much; the next call with the same run_dir resumes it exactly.

    on_log(entry) is called every config.log_every steps. snapshot = (every, fn): fn(step, seconds,
    sample_model) is called every `every` steps with the model one would sample from (the EMA copy if
    any), for time-to-quality curves; the numbers it returns (a dict, or None) join that step's history
    entry as eval_<name>, and the time it takes is not counted as training time."""
    n = len(dataset)
    if n == 0:
        raise ValueError("train: the dataset is empty")
    if config.batch_size > n:
        raise ValueError(f"train: batch_size {config.batch_size} is larger than the dataset ({n} examples)")
    if run_dir is not None or hasattr(model, "config"):
        model_config(model)  # fail now, not at the first checkpoint
    device, created_group = setup_distributed(pick_device(config.device))
    try:
        return _train(model, loss_fn, dataset, config, device, run_dir, kind, resume, on_log,
                      _SHOW_PROGRESS if progress is None else progress, snapshot, checkpoint_seconds)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(model, loss_fn, dataset, config, device, run_dir, kind, resume, on_log, progress, snapshot,
           checkpoint_seconds):
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if config.batch_size % world:
        raise ValueError(f"train: batch_size {config.batch_size} does not split over {world} processes")
    model.to(device).train()
    ema = None
    if config.ema_decay is not None:
        average = ema_warmup_fn(config.ema_decay) if config.ema_warmup else get_ema_multi_avg_fn(config.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    forward = functools.partial(loss_fn, model)
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            _LossModule(model, loss_fn), device_ids=[device.index] if device.type == "cuda" else None)
        forward = ddp  # DDP broadcasts rank 0's weights here, so all ranks start equal

    run_dir = Path(run_dir) if run_dir is not None else None
    state_path = run_dir / "state" if run_dir is not None else None
    step, history, seconds = 0, [], 0.0
    if resume and state_path is not None and checkpoint_exists(state_path):
        step, history, seconds = _load_run_state(state_path, model, ema, optimizer, scheduler, config)
        if step > config.steps:
            raise ValueError(f"{state_path} is already at step {step}, past steps={config.steps}")
    saved_step = step if step > 0 else None

    def save_state():
        if rank == 0:
            _save_run_state(state_path, model, ema, optimizer, scheduler, step, history, seconds,
                            config, kind)
        if world > 1:
            dist.barrier()  # nobody runs ahead of (or exits before) a checkpoint being written

    use_bf16 = device.type in ("cpu", "cuda") and config.bf16
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=config.steps, initial=step, desc=kind, disable=not progress or rank != 0,
               dynamic_ncols=True)
    t0 = time.perf_counter() - seconds
    last_save = time.perf_counter()
    try:  # close the bar even when a step raises
        while step < config.steps:
            seed_everything(derive_seed(config.seed, "step", step, rank))  # this step's dropout, noise...
            indices = batch_indices(len(dataset), config.batch_size, config.seed, step)
            batch = to_device(get_batch(dataset, indices[rank::world]), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = forward(batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            if not (torch.is_tensor(loss) and loss.numel() == 1):
                raise TypeError(f"loss_fn must return a scalar tensor or (loss, metrics), not {out!r:.80}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                grad_norm = nn.utils.clip_grad_norm_(params, config.grad_clip)
            else:
                grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            loss_value = loss.detach().float().reshape(())
            if world > 1:  # log the global-batch loss, and let all ranks agree on divergence
                dist.all_reduce(loss_value)
                loss_value /= world
            loss_value, grad_norm = loss_value.item(), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise _divergence(step + 1, loss_value, grad_norm,
                                  state_path if saved_step else None, saved_step)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            seconds = time.perf_counter() - t0
            entry = {**{k: float(v.detach() if torch.is_tensor(v) else v) for k, v in metrics.items()},
                     "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "seconds": seconds}
            history.append(entry)
            bar.update(1)
            if rank == 0 and (step % config.log_every == 0 or step == config.steps):
                bar.set_postfix(loss=f"{loss_value:.4g}")
                if on_log is not None:
                    on_log(entry)
            if snapshot is not None and rank == 0 and step % snapshot[0] == 0:
                started = time.perf_counter()
                measured = snapshot[1](step, seconds, ema.module if ema is not None else model)
                if measured:   # kept in the history beside the loss, e.g. eval_validity at this step
                    entry.update({f"eval_{k}": float(v) for k, v in measured.items()})
                model.train()
                t0 += time.perf_counter() - started      # snapshot time is not training time
            due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
            # by the clock only in one process: every DDP rank must reach the same checkpoint at the same step
            due = due or (world == 1 and checkpoint_seconds is not None
                          and time.perf_counter() - last_save >= checkpoint_seconds)
            if state_path is not None and due and step < config.steps:
                save_state()
                saved_step, last_save = step, time.perf_counter()
    finally:
        bar.close()

    sample_model = ema.module if ema is not None else model
    if state_path is not None:
        if saved_step != step:
            save_state()
        if rank == 0:
            save_model(sample_model, run_dir / "model", kind,
                       {"step": step, "ema": ema is not None, "train_config": config.to_dict()})
        if world > 1:
            dist.barrier()
    model.eval()
    sample_model.eval()
    return TrainResult(model=model, ema_model=sample_model, history=history, seconds=seconds, step=step,
                       run_dir=run_dir)
