"""
Presets: how much compute a run may spend. The single place that defines them.

    smoke   seconds per notebook on a 2-core CPU; proves the plumbing; what CI runs
    cpu     a laptop without a GPU; each training run <= ~10 minutes on 2 cores
    full    one GPU, minutes; best quality; the recipe for shipped checkpoints

TrainConfig holds the knobs of the one training loop (train.py). TRAINING is the table of
per-recipe budgets, one row per recipe and one column per preset; chapters add rows here so
all budgets can be compared side by side.
"""

import dataclasses
import math
import os
from dataclasses import dataclass

PRESETS = ("smoke", "cpu", "full")
PRESET_ENV = "MINIDALLE2_PRESET"


def check_preset(name) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return name


def default_preset() -> str:
    """The preset named by $MINIDALLE2_PRESET, else 'cpu'."""
    name = os.environ.get(PRESET_ENV, "cpu")
    try:
        return check_preset(name)
    except ValueError as e:
        raise ValueError(f"${PRESET_ENV}: {e}") from None


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


# chapters 09 and 11: the diffusion U-Net (ddpm.NET: 2.9M parameters at cpu, patch 2) on one-object scenes, with
# v-prediction and min-SNR weighting (ddpm.PROCESS). cpu: 2,800 steps of 64 at ~0.2 s per step on 2 idle cores, at a
# constant lr after warm-up (a cosine decay to zero over 3,000 steps measured 19.8% valid / 79.7% caption accuracy).
# Measured (python -m minidalle2 evaluate NAME --preset cpu --n 1000, DDIM-50 with eta = 1, cosine schedule): cfg
# 575 s, 92.7% caption accuracy at w = 2 (the bar is 90%); ddpm (its own row below, batch 32) 577 s, 69.8% valid
# samples, FID 17 (floor 4.4). (The constant-lr vs cosine-decay comparison above was made with the linear schedule.)
DIFFUSION = {
    "smoke": dict(steps=20, batch_size=32, lr=1e-3, warmup_steps=5, log_every=5),
    "cpu": dict(steps=2800, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="constant", grad_clip=1.0,
                ema_decay=0.998, ema_warmup=True, bf16=True, log_every=50),
    "full": dict(steps=30000, batch_size=128, lr=2e-4, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
                 ema_decay=0.9995, ema_warmup=True, bf16=True, log_every=200),
}

# recipe -> preset -> TrainConfig kwargs. Rows are budgets: say in a comment what they buy.
TRAINING = {
    # the evaluation oracle. cpu: 1,500 steps reach 100% attribute accuracy on fresh renders
    # (~5-7 min on 2 cores); full is twice that and is what minidalle2/weights/oracle ships.
    "oracle": {
        "smoke": dict(steps=30, batch_size=64, lr=2e-3, warmup_steps=5, lr_schedule="cosine"),
        "cpu": dict(steps=1500, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=100,
                    lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=50),
        "full": dict(steps=3000, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=100,
                     lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=50),
    },
    # chapters 01-04 (placeholders until each chapter measures its budget)
    # chapter 01 GAN (G 64/128/256, D 32/64/128 with spectral norm; simultaneous update, EMA of G).
    # cpu: 2,500 steps = 559 s at load ~4-5 on 2 cores (OMP_NUM_THREADS=1). It does NOT reach the bar
    # yet: validity 0.082, coverage 0.17 (5 of 30 pairs), FID 90 (floor 4.4) at n=1000: mode collapse
    # to a few colours. Quality oscillates: a 1,500-step run had raw validity 0.24 at step 1,000, 0 at 1,500.
    "gan": {
        "smoke": dict(steps=20, batch_size=32, lr=2e-4, betas=(0.0, 0.99), ema_decay=0.9, log_every=5),
        "cpu": dict(steps=2500, batch_size=64, lr=2e-4, betas=(0.0, 0.99), ema_decay=0.995, bf16=True, log_every=50),
        "full": dict(steps=10000, batch_size=128, lr=2e-4, betas=(0.0, 0.99), ema_decay=0.999, bf16=True, log_every=100),
    },
    # chapter 01's "bad setting" (gan.UNSTABLE: no spectral norm, saturating loss) at a too-high lr;
    # a shorter budget than "gan": it only has to show the failure, measured by the oracle
    "gan_unstable": {
        "smoke": dict(steps=10, batch_size=32, lr=2e-3, betas=(0.0, 0.99), ema_decay=0.9, log_every=5),
        "cpu": dict(steps=400, batch_size=64, lr=2e-3, betas=(0.0, 0.99), ema_decay=0.995, bf16=True, log_every=25),
        "full": dict(steps=3000, batch_size=128, lr=2e-3, betas=(0.0, 0.99), ema_decay=0.999, bf16=True, log_every=100),
    },
    # chapters 02-03: a 0.45M-param conv auto-encoder (widths 16/32/64, 64-number latent) on 50k images.
    # cpu: 6,000 steps of 64 (~8 epochs, ~10 min on 2 idle cores: 3,000 steps took 292 s). Measured on
    # 1,000 held-out images: 3,000 steps give 37.6 dB and 92.6% oracle caption accuracy, 6,000 give
    # 41.9 dB and 99.6% (the bar is 98%): the small shapes' corners need the extra steps
    "autoencoder": {
        "smoke": dict(steps=20, batch_size=32, lr=3e-3, log_every=5),
        "cpu": dict(steps=6000, batch_size=64, lr=3e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0,
                    bf16=True, log_every=100),
        "full": dict(steps=20000, batch_size=128, lr=2e-3, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
                     bf16=True, log_every=200),
    },
    # the same network and budget, trained on corrupted inputs (noise sigma ~ U(0, 0.5) or patch masking).
    # cpu, measured at sigma = 0.3 on 1,000 held-out images: 3,000 steps give +17.1 dB and 59.6% caption
    # accuracy, 6,000 give +20.9 dB (37.3 dB) and 87.6%: short of the 95% bar (small shapes: shape 94.4%)
    "denoising_autoencoder": {
        "smoke": dict(steps=20, batch_size=32, lr=3e-3, log_every=5),
        "cpu": dict(steps=6000, batch_size=64, lr=3e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0,
                    bf16=True, log_every=100),
        "full": dict(steps=20000, batch_size=128, lr=2e-3, warmup_steps=500, lr_schedule="cosine", grad_clip=1.0,
                     bf16=True, log_every=200),
    },
    # chapter 02's bottleneck sweep (latent 4 / 16 / 64) and chapter 03's noise-level-input comparison:
    # short budgets so the notebooks stay within ~15 minutes at cpu
    "autoencoder_sweep": {
        "smoke": dict(steps=10, batch_size=32, lr=2e-3, log_every=5),
        "cpu": dict(steps=600, batch_size=64, lr=3e-3, warmup_steps=50, lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=50),
        "full": dict(steps=3000, batch_size=128, lr=2e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=100),
    },
    "denoising_autoencoder_sweep": {
        "smoke": dict(steps=10, batch_size=32, lr=2e-3, log_every=5),
        "cpu": dict(steps=600, batch_size=64, lr=3e-3, warmup_steps=50, lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=50),
        "full": dict(steps=3000, batch_size=128, lr=2e-3, warmup_steps=100, lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=100),
    },
    # chapter 04: the VAE (model sizes and KL warm-up length per preset: vae.MODEL)
    "vae": {
        "smoke": dict(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, grad_clip=1.0, log_every=5),
        # cpu: 5,000 steps of 64 (KL warm-up over the first 800): 200 steps take 21 s on 2 idle cores, so ~9 min.
        # Measured (1,000 test images): 2,500 steps gave 29.8 dB / 22.5% reconstruction caption accuracy and
        # 0.443 bits/dim; 5,000 steps with the decoder's log-scale started at -4 gave 31.7 dB / 38.6% and 0.392
        "cpu": dict(steps=5000, batch_size=64, lr=3e-3, warmup_steps=50, lr_schedule="cosine", grad_clip=1.0,
                    ema_decay=0.995, bf16=True, log_every=50),
        "full": dict(steps=10000, batch_size=128, lr=2e-3, warmup_steps=200, lr_schedule="cosine", grad_clip=1.0,
                     ema_decay=0.999, bf16=True, log_every=100),
    },
    # chapter 04's posterior-collapse demo (the mean-vs-sum reduction bug): collapse shows within 150 steps
    "vae_collapse_demo": {
        "smoke": dict(steps=10, batch_size=16, lr=2e-3, grad_clip=1.0, log_every=5),
        "cpu": dict(steps=150, batch_size=64, lr=2e-3, warmup_steps=20, grad_clip=1.0, bf16=True, log_every=25),
        "full": dict(steps=300, batch_size=64, lr=2e-3, warmup_steps=20, grad_clip=1.0, bf16=True, log_every=25),
    },
    # chapter 07: CLIP (model sizes per preset: clip.MODEL). AdamW betas (0.9, 0.98) and decay 0.1 as CLIP;
    # decay skips gains, biases and the temperature (train.make_optimizer). cpu: 500 steps of 256 = 403 s
    # (one thread, load ~2-5 on 2 cores): R@1 0.77 both ways (ceiling 0.78), zero-shot shape 0.945, colour 1.0
    "clip": {
        "smoke": dict(steps=20, batch_size=64, lr=2e-3, betas=(0.9, 0.98), warmup_steps=5, log_every=5),
        "cpu": dict(steps=500, batch_size=256, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=50,
                    lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=25),
        "full": dict(steps=5000, batch_size=512, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=250,
                     lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=100),
    },
    # chapter 09: the unconditional model learns more per minute from more, smaller steps. Valid share (oracle, 200-300
    # samples) against training minutes, same seed: batch 64 0.14 / 0.42 / 0.55 at 5.3 / 8.0 / 9.0 min (1,600 / 2,400 /
    # 2,800 steps); batch 32 0.25 / 0.52 / 0.71 at 5.4 / 8.1 / 10.9 min (2,800 / 4,200 / 5,600 steps, ~0.117 s each).
    # (Those were linear-schedule runs.) With the cosine schedule, 4,800 steps took 606 s and 622 s in two
    # byte-identical runs, over the 10-minute bar, so the budget is 4,500 steps (0.685 valid at 4,400 in that run).
    "ddpm": {**DIFFUSION, "cpu": {**DIFFUSION["cpu"], "steps": 4500, "batch_size": 32}},
    "cfg": DIFFUSION,          # chapter 11: the same network with a class table (it meets its bar at batch 64)
    # chapter 10: the noise-aware classifier (guidance.CLASSIFIER_NET: the U-Net's down path + a linear head).
    # cpu: a step costs ~1/6 of a diffusion step; 3,000 steps with a mean-pooled head left it at 17% accuracy
    # for t < 250, so the head reads the whole map. Accuracy by t quartile / guided caption accuracy (s = 8, 400
    # samples): 8,000 steps (310 s) 0.845 / 0.348 / 0.059 / 0.038 -> 0.21; 15,000 steps (488-560 s on 2 idle cores)
    # 0.909 / 0.399 / 0.073 / 0.035 -> 0.32
    "noisy_classifier": {
        "smoke": dict(steps=20, batch_size=32, lr=2e-3, warmup_steps=5, log_every=5),
        "cpu": dict(steps=15000, batch_size=64, lr=2e-3, weight_decay=0.01, warmup_steps=100, lr_schedule="cosine",
                    grad_clip=1.0, bf16=True, log_every=50),
        "full": dict(steps=10000, batch_size=128, lr=1e-3, weight_decay=0.01, warmup_steps=200, lr_schedule="cosine",
                     grad_clip=1.0, bf16=True, log_every=100),
    },
    # a tiny row for the tests of train.py and zoo.py
    "toy": {
        "smoke": dict(steps=20, batch_size=16, lr=1e-2, log_every=5),
        "cpu": dict(steps=50, batch_size=16, lr=1e-2, log_every=5),
        "full": dict(steps=100, batch_size=32, lr=1e-2, log_every=10),
    },
}


def train_config(recipe: str, preset: str | None = None, **overrides) -> TrainConfig:
    """The TrainConfig of `recipe` at `preset` (default: default_preset()), with overrides."""
    preset = check_preset(preset) if preset is not None else default_preset()
    if recipe not in TRAINING:
        raise ValueError(f"no training budget for recipe {recipe!r} in presets.TRAINING; "
                         f"known: {', '.join(sorted(TRAINING))}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {unknown}; valid: {', '.join(sorted(fields))}")
    return TrainConfig(**{**TRAINING[recipe][preset], **overrides})
