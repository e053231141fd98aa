"""Chapter 14: the pipeline and its manipulations (unclip.py), DDIM inversion (diffusion.ddim_invert), and the claims
report. Tiny untrained models: these tests check shapes, ranges, identities and plumbing, never quality (the
benchmark in results/unclip_cpu.py measures that)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from minidalle2 import data, diffusion, prior, unclip
from minidalle2.__main__ import main
from minidalle2.decoder import Decoder
from minidalle2.diffusion import Schedule
from minidalle2.diffusion_model import DiffusionModel
from minidalle2.lab import metrics
from minidalle2.recipes import claims
from minidalle2.upsampler import Upsampler

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py
D, W = 32, 32                                         # tiny_clip's sizes


def unit(n, seed=0, dim=D):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- slerp and the text-diff direction

def test_slerp_returns_its_ends_stays_on_the_sphere_and_splits_the_angle_evenly():
    a, b = unit(5, 1), unit(5, 2)
    torch.testing.assert_close(unclip.slerp(a, b, 0.0), a)
    torch.testing.assert_close(unclip.slerp(a, b, 1.0), b, atol=1e-6, rtol=0)
    path = unclip.slerp(a, b, torch.linspace(0, 1, 7))                          # (7, 5, D)
    assert path.shape == (7, 5, D)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(7, 5))
    omega = torch.arccos((a * b).sum(-1))
    angles = torch.arccos((path[:-1] * path[1:]).sum(-1).clamp(-1, 1))          # every step the same angle
    torch.testing.assert_close(angles, (omega / 6).expand(6, 5), atol=1e-3, rtol=0)
    # parallel ends: no plane for the arc, the point stays put
    torch.testing.assert_close(unclip.slerp(a, a.clone(), 0.3), a)


def test_the_text_diff_direction_is_the_normalised_difference():
    t0, t1 = unit(3, 3), unit(3, 4)
    d = unclip.text_diff_direction(t0, t1)
    torch.testing.assert_close(d, (t1 - t0) / (t1 - t0).norm(dim=-1, keepdim=True))
    with pytest.raises(ValueError, match="same CLIP text embedding"):
        unclip.text_diff_direction(t0, t0.clone())
    torch.testing.assert_close(unclip.check_thetas([0, 0.5]), torch.tensor([0.0, 0.5]))


# ----------------------------------------------------------------------------- DDIM inversion

def gaussian_eps(schedule, var):
    """The exact noise predictor for data ~ N(0, var I): eps*(x_t, t) = sqrt(1 - abar) x_t / (abar var + 1 - abar)."""
    abar = torch.tensor([schedule.abar(t) for t in range(schedule.T)])

    def model(x, t):
        a = abar[t].view(-1, *[1] * (x.ndim - 1))
        return (1 - a).sqrt() * x / (a * var + 1 - a)
    return model


def test_ddim_inversion_of_the_exact_model_follows_the_ode_both_ways():
    """For Gaussian data the probability-flow ODE is linear: x0 = sqrt(var) x_T at the end of the path. Inverting
    with the exact model lands there, and sampling from it comes back, more closely with more steps."""
    schedule, var = Schedule("cosine", 1000), 0.25
    model = gaussian_eps(schedule, var)
    x0 = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * math.sqrt(var)
    errors = []
    for steps in (20, 200):
        x_T = diffusion.ddim_invert(model, schedule, x0, steps=steps)
        back = diffusion.sample(model, schedule, tuple(x0.shape), steps=steps, x_T=x_T, clip_x0=False)
        errors.append((back - x0).abs().max().item())
    torch.testing.assert_close(x_T, x0 / math.sqrt(var), atol=0.1, rtol=0)
    assert errors[1] < 0.03 and errors[1] < errors[0] / 3


def test_the_starting_noise_replaces_the_seeds_draw():
    schedule = Schedule("linear", 100)
    model = gaussian_eps(schedule, 1.0)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 4, generator=g)
    same = diffusion.sample(model, schedule, (2, 4), steps=5, x_T=x_T, seed=1, clip_x0=False)
    torch.testing.assert_close(same, diffusion.sample(model, schedule, (2, 4), steps=5, x_T=x_T, seed=2, clip_x0=False))
    seeded = diffusion.sample(model, schedule, (2, 4), steps=5, seed=5, clip_x0=False)      # the seed's own draw
    torch.testing.assert_close(diffusion.sample(model, schedule, (2, 4), steps=5, x_T=x_T, seed=5, clip_x0=False), seeded)
    with pytest.raises(ValueError, match=r"x_T must be a float tensor of the sample shape \(2, 4\)"):
        diffusion.sample(model, schedule, (2, 4), steps=5, x_T=torch.zeros(3, 4))


@pytest.fixture(scope="module")
def pipe(tiny_clip):
    """A tiny pipeline: untrained prior, decoder (its zero heads made live, so that outputs depend on inputs) and
    upsampler, all bound to tiny_clip."""
    torch.manual_seed(0)
    p = prior.DiffusionPrior(embed_dim=D, text_width=W, width=16, layers=1).bind(tiny_clip).eval()
    d = Decoder(embed_dim=D, text_width=W, widths=(16, 32), attention_levels=(1,)).bind(tiny_clip).eval()
    for module in d.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.05)
    u = Upsampler(widths=(8, 16)).eval()
    return unclip.UnCLIP(tiny_clip, p, d, u)


def test_decoder_inversion_reconstructs_its_input_far_better_than_random_noise(pipe):
    images = data.render(data.sample_scenes(3, "test", seed=0))
    z = pipe.encode_image(images)
    x_T = pipe.invert(images, steps=50)
    back = pipe.decode_embeddings(z, x_T=x_T, upsample=False, steps=50)
    fresh = pipe.decode_embeddings(z, seed=0, upsample=False, steps=50)
    psnr_back, psnr_fresh = metrics.psnr(back, images).mean().item(), metrics.psnr(fresh, images).mean().item()
    assert psnr_back > 20 and psnr_back > psnr_fresh + 15, (psnr_back, psnr_fresh)   # bf16 and a random net: ~27 dB


# ----------------------------------------------------------------------------- the pipeline

def test_the_pipeline_runs_end_to_end_and_reports_every_stage(pipe):
    fast = dict(prior_steps=4, decoder_steps=3, upsampler_steps=2)
    captions = ["a red circle", "a big blue square above a small green cross"]
    stages = pipe.generate(captions, n=2, seed=3, return_stages=True, **fast)
    assert stages.captions == ["a red circle"] * 2 + ["a big blue square above a small green cross"] * 2
    assert stages.text_embed.shape == stages.image_embed.shape == (4, D)
    torch.testing.assert_close(stages.image_embed.norm(dim=-1), torch.ones(4))
    assert stages.low_res.shape == (4, 3, 32, 32) and stages.images.shape == (4, 3, 64, 64)
    assert stages.images.min() >= -1 and stages.images.max() <= 1
    assert set(stages.seconds) == {"clip", "prior", "decoder", "upsampler"}
    torch.testing.assert_close(pipe(captions, n=2, seed=3, **fast), stages.images, atol=0, rtol=0)   # same seed
    assert (pipe(captions, n=2, seed=4, **fast) - stages.images).abs().mean() > 1e-3                  # another seed
    assert pipe("a red circle", n=1, upsample=False, **fast).shape == (1, 3, 32, 32)


def test_each_manipulation_has_the_right_shape_and_range(pipe):
    a = data.render(data.sample_scenes(2, "test", seed=1))
    b = data.render(data.sample_scenes(2, "test", seed=2))
    opts = dict(upsample=False)
    fresh = pipe.variations(a, n=3, seed=0, **opts)
    assert fresh.shape == (6, 3, 32, 32) and fresh.abs().max() <= 1
    assert (fresh[0] - fresh[1]).abs().mean() > 0.01                       # copies of one image differ
    inverted = pipe.variations(a, n=2, invert=True, **opts)
    assert inverted.shape == (4, 3, 32, 32)
    strip = pipe.interpolate(a, b, frames=4, **opts)
    assert strip.shape == (2, 4, 3, 32, 32)
    # the ends are the ends' embeddings decoded from the path's one noise
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 32, 32, generator=g)
    torch.testing.assert_close(strip[:, 0], pipe.decode_embeddings(pipe.encode_image(a), x_T=x_T, **opts))
    torch.testing.assert_close(strip[:, -1], pipe.decode_embeddings(pipe.encode_image(b), x_T=x_T, **opts),
                               atol=1e-4, rtol=0)
    edits = pipe.text_diff(a, "a red circle", "a blue circle", thetas=(0.0, 0.25, 0.5), **opts)
    assert edits.shape == (2, 3, 3, 32, 32)
    # theta = 0 decodes the image's own embedding from its inverted noise: the reconstruction
    torch.testing.assert_close(edits[:, 0], pipe.decode_embeddings(pipe.encode_image(a), x_T=pipe.invert(a), **opts))
    assert (edits[:, 2] - edits[:, 0]).abs().mean() > 1e-3
    # 64-px inputs (the pipeline's own output size) are read at the decoder's 32
    assert pipe.variations(data.render(data.sample_scenes(1, "test", seed=3), 64), n=1).shape == (1, 3, 64, 64)


def test_models_of_different_clips_or_presets_are_refused(tiny_clip, pipe):
    from minidalle2 import clip
    torch.manual_seed(7)
    other = clip.CLIP(embed_dim=D, patch_size=8, image_width=32, image_layers=1, text_width=W, text_layers=1).eval()
    foreign = prior.DiffusionPrior(embed_dim=D, text_width=W, width=16, layers=1).bind(other)
    with pytest.raises(ValueError, match="the prior does not belong to this CLIP .*trained on another CLIP"):
        unclip.UnCLIP(tiny_clip, foreign, pipe.decoder)
    with pytest.raises(ValueError, match="the upsampler enlarges 16-px images but the decoder draws 32-px ones"):
        unclip.UnCLIP(tiny_clip, pipe.prior, pipe.decoder, Upsampler(low=16, widths=(8, 16), crop=16))


# ----------------------------------------------------------------------------- the claims report

def fake_results(tmp_path, diffusion_accuracy):
    """Results files holding exactly the numbers two claims read (a test of the report's logic, not a measurement)."""
    row = lambda acc: {"n": 500, "caption_accuracy": acc, "fid": 5.0, "diversity_per_prompt": 2.0}
    compare = {"prior_diffusion": row(diffusion_accuracy), "prior_none": row(0.40), "prior_mlp": row(0.50),
               "prior_ar": row(0.55), "prior_real": row(0.9)}
    (tmp_path / "unclip_cpu.json").write_text(json.dumps({"compare": compare, "compare_embedding_only": compare}))
    return tmp_path


@pytest.mark.parametrize("accuracy, expected", [(0.70, "yes"), (0.52, "unclear"), (0.30, "no")])
def test_claims_verdicts_follow_the_numbers(tmp_path, accuracy, expected):
    results = claims.load_results("cpu", fake_results(tmp_path, accuracy))
    rows = {c.check.__name__: (words, verdict) for c, words, verdict in claims.evaluate(results)}
    words, verdict = rows["prior_matters"]
    assert verdict == expected and f"{100 * accuracy:.1f}%" in words
    assert rows["variations"][1] == "unclear" and rows["variations"][0].startswith("not measured")


def test_the_claims_command_regenerates_the_report_from_results_files(tmp_path, capsys):
    fake_results(tmp_path, 0.70)
    assert main(["claims", "--preset", "cpu", "--results", str(tmp_path), "--no-run"]) == 0
    report = (tmp_path / "claims.md").read_text()
    assert len(claims.CLAIMS) >= 12 and report.count("\n| ") == len(claims.CLAIMS) + 1
    assert "70.0%" in report and "**yes**" in report
    (tmp_path / "unclip_cpu.json").write_text("{not json")
    assert main(["claims", "--preset", "cpu", "--results", str(tmp_path), "--no-run"]) == 2
    assert "unclip_cpu.json is not valid JSON" in capsys.readouterr().err


def test_reranking_keeps_the_candidate_clip_scores_highest(pipe):
    fast = dict(prior_steps=3, decoder_steps=2, upsample=False)
    kept = pipe.generate(["a red circle"], n=2, rerank=3, seed=1, return_stages=True, **fast)
    every = pipe.generate(["a red circle"] * 2, n=3, seed=1, return_stages=True, **fast)   # the same 6 candidates
    scores = (pipe.encode_image(every.low_res) * every.text_embed).sum(-1).view(2, 3)
    torch.testing.assert_close(kept.low_res, every.low_res.view(2, 3, 3, 32, 32)[torch.arange(2), scores.argmax(1)])
    assert "rerank" in kept.seconds
