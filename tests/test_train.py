import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minidalle2.lab.checkpoint import CheckpointError, load_checkpoint, load_model
from minidalle2 import recipes
from minidalle2.lab.train import TrainConfig
from minidalle2.lab.train import DivergenceError, lr_factor, make_optimizer, train

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402
from ddp_worker import MLP, build_model, make_dataset, mse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class DropoutMLP(nn.Module):
    """Has dropout, so the per-step RNG matters for exactness."""

    def __init__(self, width=16):
        super().__init__()
        self.config = dict(width=width)
        self.net = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Dropout(0.2), nn.LayerNorm(width),
                                 nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def config(**kw):
    base = dict(steps=20, batch_size=8, lr=1e-2, seed=0, device="cpu", log_every=1)
    return TrainConfig(**{**base, **kw})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def fresh(cls=DropoutMLP):
    torch.manual_seed(0)
    return cls()


def test_overfits_one_batch():
    data = make_dataset()
    result = train(fresh(MLP), mse, data, config(steps=300, batch_size=len(data), lr=1e-2), progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 300 and losses[-1] < losses[0] / 10


def test_same_seed_same_weights_other_seed_differs():
    cfg = config(steps=10, ema_decay=0.9)
    a = train(fresh(), mse, make_dataset(), cfg, progress=False)
    b = train(fresh(), mse, make_dataset(), cfg, progress=False)
    c = train(fresh(), mse, make_dataset(), cfg.replace(seed=1), progress=False)
    assert_same(weights(a.model), weights(b.model))
    assert_same(weights(a.ema_model), weights(b.ema_model))
    assert not torch.equal(a.model.net[0].weight, c.model.net[0].weight)


def test_resume_after_crash_is_bit_identical(tmp_path):
    cfg = config(steps=20, warmup_steps=4, lr_schedule="cosine", grad_clip=0.5, ema_decay=0.8,
                 weight_decay=0.1, checkpoint_every=10)
    straight = train(fresh(), mse, make_dataset(), cfg, run_dir=tmp_path / "a", progress=False)

    calls = []
    def crashing_mse(model, batch):
        calls.append(1)
        if len(calls) == 14:
            raise KeyboardInterrupt  # killed mid-run; the step-10 checkpoint is on disk
        return mse(model, batch)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), crashing_mse, make_dataset(), cfg, run_dir=tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b" / "state")[1]["step"] == 10

    resumed = train(fresh(), mse, make_dataset(), cfg, run_dir=tmp_path / "b", progress=False)
    assert len(calls) == 14  # the first 10 steps were not redone...
    assert_same(weights(straight.model), weights(resumed.model))  # ...and the rest matches exactly
    assert_same(weights(straight.ema_model), weights(resumed.ema_model))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]


def test_extending_a_constant_lr_run_is_bit_identical(tmp_path):
    straight = train(fresh(), mse, make_dataset(), config(steps=12), progress=False)
    train(fresh(), mse, make_dataset(), config(steps=6), run_dir=tmp_path, progress=False)
    extended = train(fresh(), mse, make_dataset(), config(steps=12), run_dir=tmp_path, progress=False)
    assert extended.step == 12 and len(extended.history) == 12
    assert_same(weights(straight.model), weights(extended.model))


def test_resume_refuses_a_different_config(tmp_path):
    train(fresh(), mse, make_dataset(), config(steps=4), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"lr: 0.01 -> 0.02"):
        train(fresh(), mse, make_dataset(), config(steps=8, lr=2e-2), run_dir=tmp_path, progress=False)
    # resume=False starts over
    result = train(fresh(), mse, make_dataset(), config(steps=8, lr=2e-2), run_dir=tmp_path, resume=False,
                   progress=False)
    assert result.step == 8 and len(result.history) == 8


def test_final_model_checkpoint_loads(tmp_path):
    result = train(fresh(), mse, make_dataset(), config(steps=5, ema_decay=0.5), run_dir=tmp_path,
                   kind="regressor", progress=False)
    model = load_model(tmp_path / "model", DropoutMLP, expected_kind="regressor")
    assert_same(weights(model), weights(result.ema_model))
    assert load_checkpoint(tmp_path / "model")[1]["step"] == 5


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    calls = []
    def nan_at_step_8(model, batch):
        calls.append(1)
        loss = mse(model, batch)
        return loss * float("nan") if len(calls) == 8 else loss
    with pytest.raises(DivergenceError, match=r"step 8.*state\.safetensors \(step 6\)") as info:
        train(fresh(), nan_at_step_8, make_dataset(), config(checkpoint_every=3), run_dir=tmp_path,
              progress=False)
    assert info.value.step == 8
    tensors, meta = load_checkpoint(tmp_path / "state", expected_kind="train_state")
    assert meta["step"] == 6 and len(meta["history"]) == 6
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "model")  # no final model from a diverged run


def test_nan_guard_without_run_dir():
    with pytest.raises(DivergenceError, match="no checkpoint was written"):
        train(fresh(), lambda m, b: mse(m, b) / 0 * 0, make_dataset(), config(steps=3), progress=False)


def test_ema_matches_hand_computation():
    cfg = config(steps=2, seed=5)
    w1 = weights(train(fresh(), mse, make_dataset(), cfg.replace(steps=1), progress=False).model)
    w2 = weights(train(fresh(), mse, make_dataset(), cfg, progress=False).model)
    result = train(fresh(), mse, make_dataset(), cfg.replace(ema_decay=0.75), progress=False)
    assert_same(weights(result.model), w2)  # EMA does not change training
    ema = weights(result.ema_model)
    for k in w2:  # AveragedModel copies the weights at the first update, then averages
        expected = 0.75 * w1[k] + 0.25 * w2[k] if w2[k].is_floating_point() else w2[k]
        assert torch.allclose(ema[k], expected, atol=1e-7), k
    assert not torch.equal(ema["net.0.weight"], w2["net.0.weight"])


def test_ema_warmup_uses_the_short_decay_first():
    cfg = config(steps=3, seed=5)
    w = [weights(train(fresh(), mse, make_dataset(), cfg.replace(steps=k), progress=False).model) for k in (1, 2, 3)]
    result = train(fresh(), mse, make_dataset(), cfg.replace(ema_decay=0.99, ema_warmup=True), progress=False)
    ema = weights(result.ema_model)
    d2, d3 = 2 / 11, 3 / 12                      # min(0.99, (1 + n) / (10 + n)) after n = 1, 2 updates
    for k in w[0]:
        if w[0][k].is_floating_point():
            expected = d3 * (d2 * w[0][k] + (1 - d2) * w[1][k]) + (1 - d3) * w[2][k]
            assert torch.allclose(ema[k], expected, atol=1e-6), k
    assert "ema_warmup" not in cfg.to_dict() and cfg.replace(ema_warmup=True).to_dict()["ema_warmup"] is True


def test_ema_warmup_copies_integer_buffers():
    """An integer buffer (e.g. a prior's CLIP signature) is state, not a weight: the warm-up EMA copies it (lerp has
    no integer kernel, and averaging ids would corrupt them)."""
    from torch.optim.swa_utils import AveragedModel

    from minidalle2.lab.train import ema_warmup_fn
    model = nn.Linear(2, 2)
    model.register_buffer("ids", torch.tensor([7, 200], dtype=torch.uint8))
    ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(0.99), use_buffers=True)
    ema.update_parameters(model)
    model.ids.fill_(9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.equal(ema.module.ids, torch.tensor([9, 9], dtype=torch.uint8))
    assert not torch.equal(ema.module.weight, model.weight)          # floats are still averaged


def test_snapshots_are_recorded_in_the_history_and_not_timed():
    import time
    calls = []

    def snapshot(step, seconds, model):
        calls.append((step, model.training))
        time.sleep(0.3)
        return {"score": step / 10}

    result = train(fresh(), mse, make_dataset(), config(steps=20, ema_decay=0.9), progress=False,
                   snapshot=(10, snapshot))
    assert [c[0] for c in calls] == [10, 20]
    assert [h["eval_score"] for h in result.history if "eval_score" in h] == [1.0, 2.0]
    assert [h["step"] for h in result.history if "eval_score" in h] == [10, 20]
    assert result.seconds < 0.3          # 20 tiny steps; the 0.6 s of snapshots are not training time


def test_warmup_then_cosine_lr():
    cfg = config(steps=10, warmup_steps=4, lr_schedule="cosine", lr=1e-3)
    lrs = [h["lr"] for h in train(fresh(), mse, make_dataset(), cfg, progress=False).history]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_factor(3, config(steps=10, warmup_steps=0)) == 1.0


def test_no_weight_decay_on_1d_params():
    model = fresh()
    opt = make_optimizer(model, config(weight_decay=0.5))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
    # behaviour: with zero gradients only decay moves weights, and only the matrices move
    before = weights(model)
    cfg = config(steps=3, weight_decay=0.5, lr=0.1)
    after = weights(train(model, lambda m, b: 0.0 * mse(m, b), make_dataset(), cfg, progress=False).model)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            assert torch.allclose(after[name], before[name] * 0.95 ** 3), name
        else:
            assert torch.equal(after[name], before[name]), name


def test_bf16_autocast_runs_on_cpu():
    seen = []
    def loss_fn(model, batch):
        out = model(batch[0])
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return ((out.float() - batch[1]) ** 2).mean(), {"out_mean": out.float().mean()}
    result = train(fresh(), loss_fn, make_dataset(), config(steps=20, bf16=True), progress=False)
    assert seen[0] == (True, torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # weights stay fp32
    assert math.isfinite(result.history[-1]["loss"]) and "out_mean" in result.history[-1]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_dataset_without_get_batch_and_dict_batches():
    data = [{"x": torch.randn(3), "y": torch.randn(1)} for _ in range(12)]
    logged = []
    cfg = config(steps=5, batch_size=4, log_every=2)
    result = train(fresh(), lambda m, b: mse(m, (b["x"], b["y"])), data, cfg, on_log=logged.append,
                   progress=False)
    assert [e["step"] for e in logged] == [2, 4, 5] and result.step == 5


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train(fresh(), mse, [], config(), progress=False)
    with pytest.raises(ValueError, match="larger than the dataset"):
        train(fresh(), mse, make_dataset(), config(batch_size=1000), progress=False)
    model = fresh()
    model.config = {"activation": nn.ReLU()}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        train(model, mse, make_dataset(), config(), run_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr_schedule"):
        config(lr_schedule="linear")
    with pytest.raises(ValueError, match="ema_decay"):
        config(ema_decay=1.5)
    with pytest.raises(ValueError, match="unknown preset 'big'; choose one of: smoke, cpu, full"):
        recipes.get("vae").train_config("big")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(ddp_worker.__file__)), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single = train(build_model(), mse, make_dataset(), ddp_worker.CONFIG, progress=False)
    ddp_model = load_model(tmp_path / "ddp" / "model", MLP)  # the EMA weights
    ddp_state, meta = load_checkpoint(tmp_path / "ddp" / "state")
    assert meta["step"] == ddp_worker.CONFIG.steps
    for k, v in single.ema_model.state_dict().items():
        assert torch.allclose(ddp_model.state_dict()[k], v, atol=1e-6), k
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp_state["model." + k], v, atol=1e-6), k
    single_losses = [h["loss"] for h in single.history]
    assert [h["loss"] for h in meta["history"]] == pytest.approx(single_losses, abs=1e-6)


def test_train_or_load_under_ddp_writes_the_cache_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(ddp_worker.__file__)), "zoo", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    where = tmp_path / "cache" / "ddp_toy" / "smoke"
    assert (where / "model.safetensors").exists() and not (where / "run").exists()
    assert proc.stdout.count("zoo: training 'ddp_toy'") == 1   # rank 0 alone prepares and saves
    load_model(where / "model", MLP, expected_kind="toy")
