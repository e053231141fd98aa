"""Chapters 09-11 (diffusion): parity with diffusers, the closed-form identities, the samplers' behaviour."""
import functools
import math

import pytest
import torch
from torch import nn

from minidalle2 import diffusion as D
from minidalle2.lab.train import TrainConfig
from minidalle2.lab.train import train

PARITY_ATOL = 1e-5
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SHAPE = (4, 3, 8, 8)


def report(what, diff):
    """Print the max abs difference reached (visible with pytest -s) and check it."""
    print(f"\n  parity {what}: max abs diff {diff:.2e}")
    assert diff < PARITY_ATOL, f"{what}: {diff:.2e}"


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def model_output(prediction, seed):
    """A plausible network output (float64): noise for eps/v, an image in [-1.2, 1.2] for x0 (so clipping acts)."""
    out = randn(seed)
    return (out * 0.6).clamp(-1.2, 1.2) if prediction == "x0" else out


def randn(seed, dtype=torch.float64):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(cls, name, **kw):
    """A diffusers scheduler that steps in float64 on OUR alpha-bar table. The tables are compared on their
    own (test_schedules_...); sharing one here makes the step comparison test the formulas. In float32,
    diffusers' beta_t = 1 - abar_t / abar_{t-1} cancels catastrophically at small t (errors ~5e-4 at
    t = 1, see test_float32_steps_...), which would hide any real difference."""
    ref = cls(beta_schedule=DIFFUSERS_NAME[name], **kw)
    ref.alphas_cumprod = D.Schedule(name).alphas_cumprod.clone()
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ref


# ----------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_and_q_sample_match_diffusers(name):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[name])
    s = D.Schedule(name, T=1000)
    report(f"{name} betas", max_diff(s.betas, ref.betas))
    report(f"{name} alphas_cumprod", max_diff(s.alphas_cumprod, ref.alphas_cumprod))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    report(f"{name} q_sample vs add_noise", max_diff(D.q_sample(s, x0, t, noise), ref.add_noise(x0, noise, t)))
    report(f"{name} v target vs get_velocity",
           max_diff(D.training_target(s, x0, noise, t, "v"), ref.get_velocity(x0, noise, t)))


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(name, prediction, variance):
    """Identical noise: diffusers draws randn(shape, generator=g) on the CPU; we pass the same draw from a
    generator with the same seed. Full chain (t -> t-1) and a strided 50-step chain (t -> next timestep)."""
    diffusers = pytest.importorskip("diffusers")
    s = D.Schedule(name)
    worst = 0.0
    for strided in (False, True):
        ref = reference(diffusers.DDPMScheduler, name, variance_type=variance, clip_sample=True,
                        prediction_type=DIFFUSERS_PREDICTION[prediction], timestep_spacing="trailing")
        ts = list(range(999, -1, -1))
        if strided:
            ref.set_timesteps(50)
            ts = D.timesteps(s, 50, "trailing")
            assert ref.timesteps.tolist() == ts
        # diffusers adds noise when t > 0, we when t_prev >= 0: the same except at a strided chain's last step
        picks = [0, 1, 2, len(ts) // 2, len(ts) - 2] + ([] if strided else [len(ts) - 1])
        for i in picks:
            t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
            x_t, pred, noise = randn(i), model_output(prediction, 100 + i), randn(7)
            ref_out = ref.step(pred, t, x_t, generator=torch.Generator().manual_seed(7))   # draws randn(7) too
            x_prev, x0 = D.ddpm_step(s, pred, t, x_t, t_prev, prediction, variance, clip_x0=True, noise=noise)
            worst = max(worst, max_diff(x_prev, ref_out.prev_sample), max_diff(x0, ref_out.pred_original_sample))
    report(f"DDPM step {name} {prediction} {variance}", worst)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_step_matches_diffusers(name, prediction, spacing):
    """eta = 0 exactly, and eta = 0.7 with the same noise passed as diffusers' variance_noise. Our DDIM
    recomputes eps from the clipped x0 (as guided-diffusion): diffusers' use_clipped_model_output=True.
    (With steps dividing T, diffusers' prev = t - T // steps is our next timestep in the list.)"""
    diffusers = pytest.importorskip("diffusers")
    s = D.Schedule(name)
    worst = {}
    for clip in (True, False):
        ref = reference(diffusers.DDIMScheduler, name, clip_sample=clip, timestep_spacing=spacing,
                        prediction_type=DIFFUSERS_PREDICTION[prediction])
        ref.set_timesteps(50)
        ts = D.timesteps(s, 50, spacing)
        assert ref.timesteps.tolist() == ts
        for i in [0, 1, 25, 48, 49]:
            t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
            x_t, pred, noise = randn(i), model_output(prediction, 100 + i), randn(7)
            for eta in (0.0, 0.7):
                ref_out = ref.step(pred, t, x_t, eta=eta, use_clipped_model_output=True,
                                   variance_noise=noise if eta > 0 else None)
                x_prev, x0 = D.ddim_step(s, pred, t, x_t, t_prev, prediction, eta, clip_x0=clip, noise=noise)
                # unclipped at cosine's t = 999 (abar = 2e-9), x0 = (x_t - ...) / sqrt(abar) is ~1e4: compare relatively
                scale = max(1.0, ref_out.pred_original_sample.abs().max().item())
                key = f"clip={clip} eta={eta}"
                worst[key] = max(worst.get(key, 0.0), max_diff(x_prev, ref_out.prev_sample) / scale,
                                 max_diff(x0, ref_out.pred_original_sample) / scale)
    for key, diff in worst.items():
        report(f"DDIM step {name} {prediction} {spacing} {key}", diff)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_float32_steps_stay_close_to_the_float64_step(name):
    """Our coefficients are computed in float64 (Python floats), so a float32 step stays within ~3e-7 of the
    float64 one everywhere; diffusers' native float32 step (its own tables) matches to 1e-5 except at the
    first few t, where 1 - abar_t / abar_{t-1} loses digits (printed, not asserted)."""
    diffusers = pytest.importorskip("diffusers")
    s = D.Schedule(name)
    ref = diffusers.DDPMScheduler(beta_schedule=DIFFUSERS_NAME[name], prediction_type="epsilon")
    ours, theirs_small_t, theirs = 0.0, 0.0, 0.0
    for t in (1, 2, 5, 50, 500, 997):
        x_t, pred, noise = randn(t), randn(100 + t), randn(7)
        truth, _ = D.ddpm_step(s, pred, t, x_t, noise=noise)
        x32, _ = D.ddpm_step(s, pred.float(), t, x_t.float(), noise=noise.float())
        ref32 = ref.step(pred.float(), t, x_t.float(), generator=torch.Generator().manual_seed(7)).prev_sample
        ours = max(ours, max_diff(x32, truth))
        # diffusers draws its noise in float32: compare it with our float32 step given that same draw
        ref_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        x32_same_noise, _ = D.ddpm_step(s, pred.float(), t, x_t.float(), noise=ref_noise)
        diff = max_diff(ref32, x32_same_noise)
        theirs_small_t, theirs = (max(theirs_small_t, diff), theirs) if t <= 5 else (theirs_small_t, max(theirs, diff))
    print(f"\n  diffusers float32 DDPM step vs ours, {name}: t <= 5: {theirs_small_t:.1e}, t >= 50: {theirs:.1e}")
    report(f"float32 vs float64 DDPM step {name}", ours)
    report(f"diffusers native float32 DDPM step {name}, t >= 50", theirs)


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 999, 1000])
def test_timestep_spacing_matches_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    for spacing in ("trailing", "leading"):
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing)
        ref.set_timesteps(steps)
        assert D.timesteps(D.Schedule(), steps, spacing) == ref.timesteps.tolist()


# ----------------------------------------------------------------------------- closed-form identities

def test_q_sample_has_the_right_mean_and_variance():
    s, n = D.Schedule("linear"), 100_000
    x0 = torch.tensor([0.8, -0.3, 0.0])
    for t in (0, 100, 600, 999):
        noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(t))
        x_t = D.q_sample(s, x0.expand(n, 3), t, noise)
        abar = s.abar(t)
        assert torch.allclose(x_t.mean(0), math.sqrt(abar) * x0, atol=5 * math.sqrt((1 - abar) / n) + 1e-6)
        assert torch.allclose(x_t.var(0), torch.full((3,), 1 - abar), rtol=0.02, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_the_three_parameterisations_convert_into_each_other(name):
    s = D.Schedule(name)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 3, 250, 500, 900, 998])
    x0, eps = torch.rand(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = D.q_sample(s, x0, t, eps)
    for prediction in D.PREDICTIONS:
        pred = D.training_target(s, x0, eps, t, prediction)
        x0_hat, eps_hat = D.predict_x0_eps(s, x_t, t, pred, prediction)
        assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9), prediction
    v = D.training_target(s, x0, eps, t, "v")
    a, sig = s.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1), s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a * eps - sig * x0)                      # Salimans & Ho's definition
    assert torch.allclose(a * x_t - sig * v, x0) and torch.allclose(sig * x_t + a * v, eps)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_shapes_snr_and_posterior(name):
    s = D.Schedule(name, T=1000)
    assert s.betas.shape == (1000,) and (s.betas > 0).all() and (s.betas <= 0.999).all()
    snr = s.snr(torch.arange(1000))
    assert (snr[1:] < snr[:-1]).all()                                 # noisier with every step
    assert s.alphas_cumprod[-1] < 1e-4                                 # ends (nearly) at pure noise
    # posterior precision = prior precision of the step + precision of q(x_{t-1} | x_0) (Bayes for Gaussians)
    t = torch.arange(1, 1000)
    expected = 1 / (s.alphas[t] / s.betas[t] + 1 / (1 - s.alphas_cumprod[t - 1]))
    assert torch.allclose(s.posterior_variance[t], expected, rtol=1e-9)
    assert s.posterior_variance[0] == 0 and torch.isfinite(s.posterior_log_variance_clipped).all()
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    # the posterior mean with the true x0 is coef1 x0 + coef2 x_t, and the DDPM step uses it
    x0, x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean, _ = D.ddpm_step(s, x0, 400, x_t, prediction="x0", clip_x0=False, noise=torch.zeros_like(x_t))
    assert torch.allclose(mean, s.posterior_mean_coef1[400] * x0 + s.posterior_mean_coef2[400] * x_t)
    if name == "cosine":                                              # Nichol & Dhariwal's abar(t) = f(t) / f(0)
        f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
        assert abs(s.abar(499) - f(500) / f(0)) < 1e-9


def test_min_snr_weights_are_min_snr_gamma_in_x0_space():
    s = D.Schedule("cosine")
    t = torch.tensor([0, 50, 200, 400, 700, 999])
    snr = s.snr(t).float()
    assert torch.allclose(D.min_snr_weight(s, t, "x0"), snr.clamp(max=5))
    assert torch.allclose(D.min_snr_weight(s, t, "eps"), snr.clamp(max=5) / snr)
    assert torch.allclose(D.min_snr_weight(s, t, "v"), snr.clamp(max=5) / (snr + 1))
    # whichever target the net predicts, the weighted error is min(SNR, 5) * (error of the implied x0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    x_t = D.q_sample(s, x0, t, eps)
    wrong_x0 = x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    wrong_eps = D.predict_x0_eps(s, x_t, t, wrong_x0, "x0")[1]
    x0_error = (wrong_x0 - x0).pow(2).flatten(1).mean(1)
    for prediction in D.PREDICTIONS:
        pred = D.training_target(s, wrong_x0, wrong_eps, t, prediction)
        error = (pred - D.training_target(s, x0, eps, t, prediction)).pow(2).flatten(1).mean(1)
        weighted = D.min_snr_weight(s, t, prediction).double() * error
        assert torch.allclose(weighted, snr.clamp(max=5).double() * x0_error, rtol=1e-4), prediction


# ----------------------------------------------------------------------------- samplers

def oracle(schedule, x0, prediction="eps"):
    """A perfect model of a dataset holding one image: it knows x0, so it returns the exact target."""
    def model(x_t, t, cond=None):
        eps = D.predict_x0_eps(schedule, x_t, t.cpu(), x0.expand_as(x_t), "x0")[1]
        return D.training_target(schedule, x0.expand_as(x_t), eps, t.cpu(), prediction)
    return model


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_sampling_an_oracle_recovers_its_image(name, prediction):
    s = D.Schedule(name)
    x0 = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    model = oracle(s, x0, prediction)
    # (one step from t = 999 is ill-conditioned for eps: x0 = (x_t - ...) / sqrt(abar), sqrt(abar) = 5e-5 in cosine)
    for method, steps, eta in [("ddim", 2, 0.0), ("ddim", 5, 0.0), ("ddim", 10, 1.0), ("ddpm", 20, 0.0)]:
        out = D.sample(model, s, (2, 3, 8, 8), steps=steps, method=method, eta=eta, seed=3, prediction=prediction)
        assert (out - x0).abs().max() < 1e-3, (method, steps, (out - x0).abs().max())


def test_sampling_is_deterministic_given_the_seed():
    torch.manual_seed(0)
    net = TinyNet()
    s = D.Schedule("cosine")
    for method, eta in [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)]:
        a = D.sample(net, s, (2, 3, 8, 8), steps=4, method=method, eta=eta, seed=5)
        torch.randn(10)                                          # the global RNG is not used
        b = D.sample(net, s, (2, 3, 8, 8), steps=4, method=method, eta=eta, seed=5)
        c = D.sample(net, s, (2, 3, 8, 8), steps=4, method=method, eta=eta, seed=6)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.abs().max() <= 1 + 1e-6                         # the last step lands on the clipped x0


def test_classifier_free_guidance_combines_the_two_predictions():
    calls = []

    def model(x_t, t, cond=None):
        calls.append(cond.clone())
        return x_t * 0 + cond.view(-1, 1, 1, 1).float()          # "eps" = the class id, -1 when null

    x, cond = torch.zeros(2, 3, 4, 4), torch.tensor([3, 5])
    assert torch.equal(D.guided_prediction(model, x, 10, cond, 1.0)[:, 0, 0, 0], torch.tensor([3.0, 5.0]))
    assert torch.equal(D.guided_prediction(model, x, 10, cond, 0.0)[:, 0, 0, 0], torch.tensor([-1.0, -1.0]))
    calls.clear()
    out = D.guided_prediction(model, x, 10, cond, 3.0)[:, 0, 0, 0]   # -1 + 3 (c - (-1))
    assert torch.equal(out, torch.tensor([11.0, 17.0])) and len(calls) == 1   # one batched call
    assert calls[0].tolist() == [3, 5, D.NULL_CLASS, D.NULL_CLASS]
    seen = []
    hook = lambda x_t, t, pred: seen.append(t.tolist()) or pred + 1
    assert torch.equal(D.guided_prediction(model, x, 10, cond, hook)[:, 0, 0, 0], torch.tensor([4.0, 6.0]))
    assert seen == [[10, 10]]
    out = D.sample(model, D.Schedule(), (2, 3, 4, 4), steps=3, cond=cond, guidance=2.0, clip_x0=False)
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()


def test_bad_inputs_are_named():
    s, model = D.Schedule(), lambda x, t, cond=None: x
    with pytest.raises(ValueError, match="unknown schedule 'cos'"):
        D.Schedule("cos")
    with pytest.raises(ValueError, match="T .* must be an int >= 2"):
        D.Schedule("linear", T=1)
    with pytest.raises(ValueError, match="timestep out of range.*1000"):
        D.q_sample(s, torch.zeros(2, 3), torch.tensor([0, 1000]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="timesteps must be integers"):
        D.q_sample(s, torch.zeros(2, 3), torch.tensor([0.5, 1.0]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="timestep out of range"):
        D.ddim_step(s, torch.zeros(1, 3), 1000, torch.zeros(1, 3), 980)
    with pytest.raises(ValueError, match="prediction must be one of"):
        D.training_target(s, torch.zeros(1, 3), torch.zeros(1, 3), 0, "noise")
    for steps in (0, 1001, 2.5):
        with pytest.raises(ValueError, match=r"steps must be an int in \[1, T = 1000\]"):
            D.sample(model, s, (1, 3, 4, 4), steps=steps)
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
            D.sample(model, s, (1, 3, 4, 4), cond=torch.tensor([1]), guidance=w)
    with pytest.raises(ValueError, match="needs cond"):
        D.sample(model, s, (1, 3, 4, 4), guidance=2.0)
    with pytest.raises(ValueError, match="cond must be a tensor of 2 conditions"):
        D.sample(model, s, (2, 3, 4, 4), cond=torch.tensor([1, 2, 3]))
    for shape in ((3,), (0, 3, 4, 4), (2, 3, 4.0, 4), "2x3x4x4"):
        with pytest.raises(ValueError, match="shape must be a tuple of positive ints"):
            D.sample(model, s, shape)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        D.sample(model, s, (1, 3, 4, 4), eta=-0.1)
    with pytest.raises(ValueError, match="method must be 'ddim' or 'ddpm'"):
        D.sample(model, s, (1, 3, 4, 4), method="euler")
    with pytest.raises(ValueError, match="spacing must be"):
        D.timesteps(s, 10, "linspace")
    with pytest.raises(ValueError, match=r"prediction shaped like x_t \(1, 3, 4, 4\), got \(1, 3\)"):
        D.sample(lambda x, t: x[:, :, 0, 0], s, (1, 3, 4, 4))
    with pytest.raises(ValueError, match="weighting must be None or 'min_snr'"):
        D.diffusion_loss(model, {"image": torch.zeros(2, 3)}, s, weighting="snr")
    with pytest.raises(ValueError, match="cond_key 'label' is not in the batch"):
        D.diffusion_loss(model, {"image": torch.zeros(2, 3)}, s, cond_key="label")
    with pytest.raises(ValueError, match=r"a droppable condition is class ids \(B,\).*got \(2, 5\) torch.int64"):
        D.diffusion_loss(model, {"image": torch.zeros(2, 3), "cond": torch.zeros(2, 5, dtype=torch.long)}, s,
                         cond_key="cond", p_uncond=0.1)


# ----------------------------------------------------------------------------- training

class TinyNet(nn.Module):
    """A small conv net for model(x_t, t, cond): the timestep and class enter as extra constant channels."""

    def __init__(self, channels=3, width=32, classes=4):
        super().__init__()
        self.embed = nn.Embedding(classes + 1, 1)                # the last row is the null class
        self.net = nn.Sequential(nn.Conv2d(channels + 2, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, t, cond=None):
        b, _, h, w = x.shape
        c = torch.full((b,), self.embed.num_embeddings - 1, device=x.device) if cond is None else cond
        c = torch.where(c == D.NULL_CLASS, self.embed.num_embeddings - 1, c)
        extra = torch.stack([t.float() / 1000, self.embed(c)[:, 0]], 1)[:, :, None, None].expand(b, 2, h, w)
        return self.net(torch.cat([x, extra.to(x.dtype)], 1))


def test_condition_dropout_and_a_deterministic_loss():
    seen = []
    model = lambda x, t, cond=None: seen.append(cond) or x * 0
    batch = {"image": torch.zeros(1000, 3), "cond": torch.full((1000,), 2)}
    D.diffusion_loss(model, batch, D.Schedule(), cond_key="cond", p_uncond=0.3, generator=torch.Generator().manual_seed(0))
    dropped = (seen[-1] == D.NULL_CLASS).float().mean().item()
    assert 0.25 < dropped < 0.35 and set(seen[-1].tolist()) == {2, D.NULL_CLASS}
    D.diffusion_loss(model, batch, D.Schedule(), cond_key="cond")
    assert (seen[-1] == 2).all()
    vectors = D.drop_condition(torch.ones(1000, 4), 0.3, torch.Generator().manual_seed(0))   # NaN rows = no condition
    assert torch.equal(vectors.isnan().all(1), vectors.isnan().any(1)) and 0.25 < vectors.isnan().all(1).float().mean() < 0.35
    D.diffusion_loss(model, batch, D.Schedule())
    assert seen[-1] is None
    torch.manual_seed(0)
    net, x = TinyNet(), torch.rand(4, 3, 8, 8) * 2 - 1
    runs = [D.diffusion_loss(net, {"image": x}, D.Schedule(), "v", "min_snr", generator=torch.Generator().manual_seed(1))
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and set(runs[0][1]) == {"mse"}


@pytest.mark.parametrize("prediction,weighting", [("eps", None), ("v", "min_snr")])
def test_a_tiny_net_overfits_one_batch(prediction, weighting):
    """Same batch, same t and noise every step (a freshly seeded generator): the loss must fall clearly."""
    torch.manual_seed(0)
    net, s = TinyNet(), D.Schedule("cosine")
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"image": x, "cond": torch.arange(8) % 4}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, _ = D.diffusion_loss(net, batch, s, prediction, weighting, cond_key="cond",
                                   generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_diffusion_loss_plugs_into_the_training_loop():
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"image": torch.rand(3, 8, 8, generator=g) * 2 - 1, "cond": i % 4}

    torch.manual_seed(0)
    loss_fn = functools.partial(D.diffusion_loss, schedule=D.Schedule("cosine"), cond_key="cond", p_uncond=0.2)
    result = train(TinyNet(), loss_fn, Data(), TrainConfig(steps=5, batch_size=8, lr=1e-3, device="cpu"),
                   progress=False)
    assert len(result.history) >= 1 and all(math.isfinite(h["loss"]) for h in result.history)


@pytest.mark.parametrize("kind", ["classes", "vectors"])
def test_the_unet_speaks_this_conditioning_interface(kind):
    """The contract with unet.UNet: cond ids with -1 (or vector rows of NaN) = no condition, in training
    (condition dropout) and in sampling (CFG)."""
    unet = pytest.importorskip("minidalle2.unet")
    torch.manual_seed(0)
    extra = dict(num_classes=4) if kind == "classes" else dict(cond_dim=6)
    net = unet.UNet(channels=3, resolution=8, widths=(8, 16), time_dim=32, **extra)
    cond = torch.tensor([0, 3]) if kind == "classes" else torch.randn(2, 6)
    batch = {"image": torch.rand(2, 3, 8, 8) * 2 - 1, "cond": cond}
    loss, _ = D.diffusion_loss(net, batch, D.Schedule(), cond_key="cond", p_uncond=0.5)
    loss.backward()
    out = D.sample(net, D.Schedule(), (2, 3, 8, 8), steps=2, cond=cond, guidance=3.0)
    assert torch.isfinite(loss) and out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
