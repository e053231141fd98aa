"""The evaluation oracle's recipe (the model is lab/oracle.py): cpu reaches 100% attribute accuracy on fresh
renders; full is what minidalle2/weights/oracle ships (`python -m minidalle2 train oracle --preset full --export ...`)."""

import torch

from .. import data
from ..lab import oracle
from ..lab.train import train
from ..lab.zoo import Recipe


def fit(model, job):
    """Train on scenes rendered per batch (junk included), then scale the features so real images have unit RMS."""
    result = train(model, oracle.oracle_loss, job.dataset(), job.train_config(), run_dir=job.run_dir, kind="oracle")
    with torch.no_grad():
        real = data.render(data.sample_scenes(2000, "all", seed=2))
        features = result.model.cell_features(real.to(next(result.model.parameters()).device)).flatten(1)
        result.model.feature_scale.fill_(features.float().pow(2).mean().rsqrt().item())
    return result


ORACLE = Recipe(
    "oracle", "oracle", oracle.Oracle, version=2,
    description="reads shape, colour, size and cell of every object; flags junk",
    dataset=lambda size: oracle.SceneLabels(size, seed=1), fit=fit,
    data={"smoke": dict(size=1_920), "cpu": dict(size=100_000), "full": dict(size=100_000)},
    training={
        "smoke": dict(steps=30, batch_size=64, lr=2e-3, warmup_steps=5, lr_schedule="cosine"),
        "cpu": dict(steps=1500, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=100,
                    lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=50),
        "full": dict(steps=3000, batch_size=128, lr=2e-3, weight_decay=0.01, warmup_steps=100,
                     lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=50),
    },
    report=oracle.oracle_accuracy)

RECIPES = [ORACLE]
