"""A tiny training run for the DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py RUN_DIR`.

test_train.py imports build_model/make_dataset/CONFIG from here to run the same thing in one process.
"""

import sys

import torch
from torch import nn

from minidalle2.lab.train import TrainConfig, train

CONFIG = TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=2, lr_schedule="cosine", grad_clip=1.0,
                     ema_decay=0.9, weight_decay=0.1, seed=3, device="cpu", log_every=1)


class MLP(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.config = dict(width=width)
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)


def build_model():
    torch.manual_seed(0)
    return MLP()


class Regression:
    def __init__(self, n=20):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x.sum(1, keepdim=True).sin()

    def __len__(self):
        return len(self.x)

    def get_batch(self, idx):
        return self.x[idx], self.y[idx]


def make_dataset():
    return Regression()


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def train_through_zoo(cache):
    """`torchrun ... ddp_worker.py zoo CACHE`: train-or-load under DDP; only rank 0 may touch the cache."""
    from minidalle2.lab import zoo
    fit = lambda model, job: train(model, mse, make_dataset(), CONFIG, run_dir=job.run_dir)
    recipe = zoo.Recipe("ddp_toy", kind="toy", build=MLP, fit=fit, training={p: CONFIG.to_dict() for p in ("smoke", "cpu", "full")})
    zoo.load_or_train(recipe, "smoke", cache=cache, progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "zoo":
        train_through_zoo(sys.argv[2])
    else:
        train(build_model(), mse, make_dataset(), CONFIG, run_dir=sys.argv[1], progress=False)
