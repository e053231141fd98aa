"""Bad input gets a clear error that names the problem, never a deep torch traceback or a silent wrong result.

One table: (id, callable, expected exception, regex its message must match). The first part holds the inputs a
probe of the library found handled badly; the second, inputs already handled well, so that none regresses.
Command lines run in-process through minidalle2.__main__.main and must exit 2 with "error: ..." on stderr;
every one fails before any model is trained."""
import functools
import re

import pytest
import torch
import torch.nn.functional as F

from minidalle2 import clip, data, decoder, diffusion, guidance, prior, recipes, unclip, upsampler, vae
from minidalle2.__main__ import main
from minidalle2.diffusion import Schedule
from minidalle2.diffusion_model import DiffusionModel
from minidalle2.lab import checkpoint, metrics, oracle, scoreboard
from minidalle2.lab.train import TrainConfig
from minidalle2.lab.zoo import ZooError
from minidalle2.recipes.diffusion import time_to_quality
from minidalle2.unet import NoisyClassifier, UNet


class CliError(Exception):
    """A command line that exited with code 2; the message is its stderr."""


class Cli:
    """python -m minidalle2 *argv, run in-process (with `env` set); exit code 2 raises CliError(stderr)."""

    def __init__(self, *argv, env=None):
        self.argv, self.env = list(argv), env or {}

    def __call__(self, capsys, monkeypatch):
        for name, value in self.env.items():
            monkeypatch.setenv(name, value)
        code = main(self.argv)
        err = capsys.readouterr().err
        if code == 2:
            raise CliError(err.strip())
        raise AssertionError(f"exit code {code}, expected 2; stderr: {err!r}")


# small models, built once and only by the rows that use them
@functools.cache
def unconditional_model():
    torch.manual_seed(0)
    return DiffusionModel(UNet(widths=(8, 16), time_dim=32), (3, 32, 32))


@functools.cache
def class_model():
    torch.manual_seed(0)
    return DiffusionModel(UNet(widths=(8, 16), time_dim=32, num_classes=4), (3, 32, 32), conditions={"cond": 0.1})


@functools.cache
def noisy_classifier():
    torch.manual_seed(0)
    return NoisyClassifier(num_classes=4, widths=(8, 16))


@functools.cache
def tiny_clip():
    torch.manual_seed(0)
    return clip.CLIP(embed_dim=16, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1,
                     context_length=20)


@functools.cache
def pretrained_clip():
    return clip.PretrainedCLIP(tiny_clip().model, clip.tokenizer(), 20)


@functools.cache
def tiny_vae():
    torch.manual_seed(0)
    return vae.VAE(latent_dim=4, widths=(8, 16, 32))


@functools.cache
def other_clip(embed_dim=16):
    """A CLIP of tiny_clip's sizes (or another embed_dim) with other weights."""
    torch.manual_seed(1)
    return clip.CLIP(embed_dim=embed_dim, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1,
                     context_length=20)


@functools.cache
def tiny_prior():
    """A diffusion prior bound to tiny_clip (embed_dim 16, text width 32, context 20)."""
    torch.manual_seed(0)
    return prior.DiffusionPrior(embed_dim=16, text_width=32, context_length=20, width=16, layers=1).bind(tiny_clip()).eval()


@functools.cache
def tiny_decoder(use_text=True):
    """A decoder bound to tiny_clip (embed_dim 16, text width 32)."""
    torch.manual_seed(0)
    return decoder.Decoder(embed_dim=16, text_width=32, widths=(8, 16), attention_levels=(1,),
                           use_text=use_text).bind(tiny_clip()).eval()


def decode(embeds=None, captions=None, clip_model=None, **options):
    embeds = F.normalize(torch.ones(2, 16), dim=-1) if embeds is None else embeds
    return tiny_decoder().decode(clip_model or tiny_clip(), embeds, captions, steps=2, **options)


@functools.cache
def tiny_upsampler():
    torch.manual_seed(0)
    return upsampler.Upsampler(widths=(8, 16)).eval()


@functools.cache
def tiny_pipe():
    return unclip.UnCLIP(tiny_clip(), tiny_prior(), tiny_decoder(), tiny_upsampler())


def prior_sample(captions=("a red circle",), clip_model=None, **options):
    return tiny_prior().sample(clip_model or tiny_clip(), captions if isinstance(captions, str) else list(captions),
                               steps=2, **options)


def prior_text(n=2, positions=20):
    return prior.text_condition(torch.zeros(n, positions, 32), torch.ones(n, positions, dtype=torch.bool),
                                torch.zeros(n, 16))


def images(n=1):
    return data.render(data.sample_scenes(n, "test", seed=0))


def nan_images():
    return torch.full((1, 3, 32, 32), float("nan"))


def config(**changes):
    return TrainConfig(**{"steps": 1, "batch_size": 1, "lr": 1e-3, **changes})


HUGE = 99999999999999999999999
SEED_RANGE = r"seed must be an int in \[0, 2\*\*63 - 1\], got "
x, t = torch.zeros(2, 3, 32, 32), torch.tensor([1, 2])

BAD_INPUTS = [
    # ------------------------------------------------------------------ the probe's cases: new behaviour
    # 1. counts of the time-to-quality curve: 0 meant "the default", -1 "every step"
    ("curve --steps 0", Cli("curve", "ddpm", "--steps", "0"), CliError,
     r"^error: --steps must be a positive number of training steps, got 0$"),
    ("curve --every 0", Cli("curve", "ddpm", "--every", "0"), CliError,
     r"^error: --every must be a positive number of training steps between scores, got 0$"),
    ("curve --every -1", Cli("curve", "ddpm", "--every", "-1"), CliError, r"^error: --every must be a positive .*got -1$"),
    ("curve --images 0", Cli("curve", "cfg", "--images", "0"), CliError,
     r"^error: --images must be a positive number of samples per score, got 0$"),
    ("time_to_quality steps=0", lambda: time_to_quality("ddpm", "smoke", steps=0), ValueError,
     r"time_to_quality: steps must be a positive int \(training steps\) or None .*got 0"),
    ("time_to_quality every=-1", lambda: time_to_quality("ddpm", "smoke", every=-1), ValueError,
     r"every must be a positive int .*got -1"),
    ("time_to_quality images=2.5", lambda: time_to_quality("cfg", "smoke", images=2.5), ValueError,
     r"images must be a positive int .*got 2\.5"),
    # 2. a prompt for an unconditional model
    ("sample ddpm --prompt", Cli("sample", "ddpm", "--prompt", "a red circle", "--preset", "smoke"), CliError,
     r"^error: recipe 'ddpm' is an unconditional model: it takes no prompt"),
    ("generate ddpm with prompts", lambda: recipes.generate("ddpm", "smoke", 1, ["a red circle"]), ValueError,
     r"recipe 'ddpm' is an unconditional model: it takes no prompt"),
    # 3. the benchmark's split: only test and holdout are prompt sources, and only for recipes that read them
    ("evaluate --split bogus", Cli("evaluate", "cfg", "--split", "bogus", "--preset", "smoke"), CliError,
     r"^error: unknown split 'bogus': the prompts come from the captions of test or holdout$"),
    ("benchmark split=train", lambda: recipes.benchmark("real", "smoke", 10, split="train"), ValueError,
     r"unknown split 'train'.*test or holdout"),
    ("evaluate cfg --split holdout", Cli("evaluate", "cfg", "--split", "holdout", "--preset", "smoke"), CliError,
     r"recipe 'cfg' is benchmarked on its own prompts, so split='holdout' would change nothing"),
    ("evaluate ddpm --split holdout", Cli("evaluate", "ddpm", "--split", "holdout", "--preset", "smoke"), CliError,
     r"recipe 'ddpm' takes no prompts, so split='holdout' would change nothing"),
    # 4. a scoreboard path with a typo
    ("scoreboard --path typo", Cli("scoreboard", "--path", "/nonexistent/typo.jsonl"), CliError,
     r"^error: no scoreboard file at /nonexistent/typo\.jsonl$"),
    # 5. contradictory words in a caption
    ("caption big small", lambda: data.parse_caption("a big small circle"), ValueError,
     r"gives one object two sizes: 'big' and 'small'"),
    ("caption red blue", lambda: data.parse_caption("a red blue circle"), ValueError,
     r"gives one object two colors: 'red' and 'blue'"),
    # 6. CLIP's encoder on NaN and 0-255 images
    ("CLIP NaN images", lambda: tiny_clip().encode_image(nan_images()), ValueError,
     r"CLIP\.encode_image images contain NaN or inf"),
    ("CLIP 0-255 images", lambda: tiny_clip().encode_image(torch.full((1, 3, 32, 32), 255.0)), ValueError,
     r"CLIP\.encode_image images must lie in \[-1, 1\], got min 255 max 255 \(images in 0-255\? use x / 127\.5 - 1\)"),
    # 7. a bad $MINIDALLE2_PRESET
    ("bad MINIDALLE2_PRESET", Cli("train", "oracle", env={"MINIDALLE2_PRESET": "bogus"}), CliError,
     r"^error: \$MINIDALLE2_PRESET: unknown preset 'bogus'; choose one of: smoke, cpu, full$"),
    # 8. the number of samples
    ("sample --n -5", Cli("sample", "real", "--n", "-5"), CliError, r"^error: --n must be a positive number of samples, got -5$"),
    ("sample --n 0", Cli("sample", "real", "--n", "0"), CliError, r"^error: --n must be a positive number of samples, got 0$"),
    ("evaluate --n 0", Cli("evaluate", "real", "--n", "0"), CliError, r"^error: --n must be a positive number of samples"),
    ("generate n=0", lambda: recipes.generate("real", "smoke", 0), ValueError, r"n must be a positive number of samples, got 0"),
    ("generate 1 prompt for 3", lambda: recipes.generate("real", "smoke", 3, ["a red circle"]), ValueError,
     r"got 1 prompts for n = 3 samples"),
    # 9. seeds out of a torch generator's range: one shared check (data.check_seed)
    ("sample --seed huge", Cli("sample", "real", "--seed", str(HUGE)), CliError, r"^error: --" + SEED_RANGE + str(HUGE)),
    ("sample_scenes seed huge", lambda: data.sample_scenes(2, seed=HUGE), ValueError, SEED_RANGE + str(HUGE)),
    ("sample_scenes seed -1", lambda: data.sample_scenes(2, seed=-1), ValueError, SEED_RANGE + "-1"),
    ("ShapesDataset seed huge", lambda: data.ShapesDataset(2, seed=HUGE), ValueError, SEED_RANGE),
    ("pair_prompts seed huge", lambda: data.pair_prompts(2, seed=HUGE), ValueError, SEED_RANGE),
    ("scenes_from_prompts seed huge", lambda: data.scenes_from_prompts(["a red circle"], seed=HUGE), ValueError,
     SEED_RANGE),
    ("model.generate seed huge", lambda: unconditional_model().generate(1, seed=HUGE), ValueError, SEED_RANGE),
    ("diffusion.sample seed huge", lambda: diffusion.sample(unconditional_model(), Schedule(), (1, 3, 32, 32),
                                                            seed=HUGE), ValueError, SEED_RANGE),
    ("VAE.sample seed huge", lambda: tiny_vae().sample(1, seed=HUGE), ValueError, SEED_RANGE),
    # 10. positions for each object that cannot be drawn (captions that can: see the tests below the table)
    ("caption positions contradict the relation",
     lambda: data.parse_caption("a small red circle at the top left above a blue square at the top right"), ValueError,
     r"contradicts itself: a small red circle at the top left cannot be above a blue square at the top right"),
    ("caption both objects in one cell", lambda: data.parse_caption("a circle in the center and a square in the middle"),
     ValueError, r"puts both objects at the center; a cell holds one object"),
    ("caption two places for one object", lambda: data.parse_caption("a circle at the top left at the bottom"),
     ValueError, r"unknown position 'top left bottom' for the circle"),
    # 11. a caption that is not a str
    ("caption bytes", lambda: data.parse_caption(b"a red circle"), TypeError, r"^captions must be str, got bytes$"),
    ("caption None", lambda: data.parse_caption(None), TypeError, r"^captions must be str, got NoneType$"),
    # 12. a bare string where a list of prompts is expected
    ("score bare string", lambda: scoreboard.score(images(), "a red circle"), TypeError,
     r"prompts must be a list of captions, one per image; got a single str 'a red circle' \(wrap it in a list\)"),
    ("scenes_from_prompts bare string", lambda: data.scenes_from_prompts("a red circle"), TypeError,
     r"prompts must be a list of captions"),
    ("generate real bare string", lambda: recipes.generate("real", "smoke", 1, "a red circle"), TypeError,
     r"prompts must be a list of captions"),
    ("score_reconstructions bare string", lambda: scoreboard.score_reconstructions(images(), images(), "a red circle"),
     TypeError, r"captions must be a list of captions"),
    # 13. dataset sizes and seeds of the wrong type
    ("ShapesDataset(10.5)", lambda: data.ShapesDataset(10.5), TypeError,
     r"size must be an int \(the number of images\), got float 10\.5"),
    ("ShapesDataset seed 'abc'", lambda: data.ShapesDataset(10, seed="abc"), TypeError,
     r"seed must be an int \(a random seed\), got str 'abc'"),
    ("sample_scenes(2.5)", lambda: data.sample_scenes(2.5), TypeError, r"n must be an int \(the number of scenes\)"),
    # 14. device strings
    ("TrainConfig device tpu", lambda: config(device="tpu"), ValueError,
     r"TrainConfig: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    ("TrainConfig device cuda:x", lambda: config(device="cuda:x"), ValueError, r"device must be .*got 'cuda:x'"),
    ("TrainConfig device gpu", lambda: config(device="gpu"), ValueError, r"device must be .*got 'gpu'"),
    # 15. float class ids: the dtype is named
    ("generate float classes", lambda: class_model().generate(2, cond=torch.tensor([0.0, 1.0])), ValueError,
     r"LongTensor of shape \(2,\), got a torch\.float32 tensor of shape \(2,\) \(use cond\.long\(\)\)"),
    # 16. noise that does not have the shape of x0
    ("q_sample noise shape", lambda: diffusion.q_sample(Schedule(), x, t, torch.zeros(2, 3, 16, 16)), ValueError,
     r"q_sample: noise must have the shape of x0 \(2, 3, 32, 32\) .*got \(2, 3, 16, 16\)"),
    ("q_sample noise broadcast", lambda: diffusion.q_sample(Schedule(), x, t, torch.zeros(3, 32, 32)), ValueError,
     r"noise must have the shape of x0 .*got \(3, 32, 32\)"),

    # ------------------------------------------------------------------ already handled well: must not regress
    ("caption typo", lambda: data.parse_caption("a red circel"), ValueError, r"unknown word 'circel'"),
    ("caption empty", lambda: data.parse_caption("  "), ValueError, r"empty caption"),
    ("caption color without shape", lambda: data.parse_caption("a big red"), ValueError, r"not followed by a shape"),
    ("caption two relations", lambda: data.parse_caption("a circle above a square above a cross"), ValueError,
     r"more than one relation"),
    ("caption three objects", lambda: data.parse_caption("a circle and a square and a cross"), ValueError, r"at most 2"),
    ("caption bad position", lambda: data.parse_caption("a red circle at the top middle left"), ValueError,
     r"unknown position"),
    ("sample_scenes split", lambda: data.sample_scenes(4, split="validation"), ValueError, r"unknown split 'validation'"),
    ("sample_scenes num_objects", lambda: data.sample_scenes(4, num_objects=3), ValueError, r"at most 2"),
    ("sample_scenes p_two", lambda: data.sample_scenes(4, p_two=1.5), ValueError, r"p_two must be a probability"),
    ("sample_scenes n=-1", lambda: data.sample_scenes(-1), ValueError, r"n must be an int >= 0"),
    ("render resolution", lambda: data.render(data.sample_scenes(1), resolution=8), ValueError,
     r"resolution must be an int >= 16"),
    ("ShapesDataset(0)", lambda: data.ShapesDataset(0), ValueError, r"size must be a positive int"),
    ("ShapesDataset index", lambda: data.ShapesDataset(2)[5], IndexError, r"index 5 out of range"),
    ("pair_caption range", lambda: data.pair_caption(30), ValueError, r"class id out of range"),
    ("check_images single image", lambda: data.check_images(torch.zeros(3, 32, 32)), ValueError, r"a single image\?"),
    ("check_images uint8", lambda: data.check_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError,
     r"uint8 images"),
    ("check_images NaN", lambda: data.check_images(nan_images()), ValueError, r"images contain NaN or inf"),
    ("Schedule name", lambda: Schedule("quadratic"), ValueError, r"unknown schedule 'quadratic'"),
    ("Schedule T", lambda: Schedule("linear", T=1), ValueError, r"T \(the number of diffusion steps\) must be an int >= 2"),
    ("q_sample t range", lambda: diffusion.q_sample(Schedule(), x, torch.tensor([0, 1000]), x), ValueError,
     r"timestep out of range"),
    ("q_sample float t", lambda: diffusion.q_sample(Schedule(), x, torch.tensor([0.5, 1.0]), x), ValueError,
     r"timesteps must be integers"),
    ("timesteps 0", lambda: diffusion.timesteps(Schedule(), 0), ValueError, r"steps must be an int in \[1, T = 1000\]"),
    ("sample method", lambda: diffusion.sample(unconditional_model(), Schedule(), (1, 3, 32, 32), method="euler"),
     ValueError, r"method must be 'ddim' or 'ddpm'"),
    ("UNet unconditional given cond", lambda: unconditional_model().net(x, t, torch.tensor([0, 1])), ValueError,
     r"built unconditional"),
    ("UNet class range", lambda: class_model().net(x, t, torch.tensor([0, 4])), ValueError,
     r"class id out of range \[-1, 4\)"),
    ("UNet image size", lambda: unconditional_model().net(torch.zeros(1, 3, 16, 16), 1), ValueError,
     r"UNet expects images of shape \(B, 3, 32, 32\)"),
    ("DiffusionModel prediction", lambda: DiffusionModel(UNet(widths=(8, 16)), (3, 32, 32), prediction="score"),
     ValueError, r"prediction must be one of"),
    ("generate n=0", lambda: unconditional_model().generate(0), ValueError, r"n must be a positive number of samples"),
    ("generate cond for unconditional", lambda: unconditional_model().generate(1, cond=torch.tensor([0])), ValueError,
     r"this model is unconditional"),
    ("classifier guidance scale", lambda: guidance.classifier_guidance(noisy_classifier(), Schedule(), torch.tensor([0]),
                                                                       -1.0), ValueError,
     r"classifier guidance scale must be a finite number >= 0"),
    ("classifier guidance float classes",
     lambda: guidance.classifier_guided_generate(unconditional_model(), noisy_classifier(), torch.tensor([0.5]), 1.0),
     ValueError, r"classes must be a 1-D tensor of integer class ids"),
    ("VAE.encode shape", lambda: tiny_vae().encode(torch.zeros(1, 3, 16, 16)), ValueError,
     r"VAE\.encode expects images of shape \(B, 3, 32, 32\)"),
    ("VAE.sample n=0", lambda: tiny_vae().sample(0), ValueError, r"n must be a positive number of samples"),
    ("CLIP uint8 images", lambda: tiny_clip().encode_image(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError,
     r"uint8 images"),
    ("PretrainedCLIP NaN images", lambda: pretrained_clip().encode_image(nan_images()), ValueError,
     r"contain NaN or inf"),
    ("PretrainedCLIP 0-255 images", lambda: pretrained_clip().encode_image(torch.full((1, 3, 32, 32), 255.0)),
     ValueError, r"must lie in \[-1, 1\]"),
    ("tokenize empty", lambda: clip.tokenize([]), ValueError, r"empty list of captions"),
    ("tokenize bytes", lambda: clip.tokenize([b"a red circle"]), TypeError, r"caption 0 is a bytes, not a string"),
    ("CLIP patch size", lambda: clip.CLIP(resolution=30), ValueError, r"resolution 30 is not a multiple of patch_size 8"),
    ("TrainConfig steps", lambda: config(steps=0), ValueError, r"steps must be an int >= 1"),
    ("TrainConfig lr", lambda: config(lr=-1.0), ValueError, r"lr must be > 0"),
    ("TrainConfig lr_schedule", lambda: config(lr_schedule="linear"), ValueError, r"lr_schedule must be 'constant' or"),
    ("TrainConfig ema_decay", lambda: config(ema_decay=1.0), ValueError, r"ema_decay must be None or in \(0, 1\)"),
    ("TrainConfig seed", lambda: config(seed="0"), ValueError, r"seed must be an int"),
    ("score prompt count", lambda: scoreboard.score(images(2), ["a red circle"]), ValueError, r"one prompt per image"),
    ("score caption typo", lambda: scoreboard.score(images(2), ["a red circle", "a red blob"]), ValueError,
     r"unknown word 'blob'"),
    ("oracle empty batch", lambda: oracle.check_readable(torch.zeros(0, 3, 32, 32)), ValueError, r"images is empty"),
    ("FID 1-D features", lambda: metrics.frechet_distance(torch.zeros(5), torch.zeros(5)), ValueError, r"must be 2-D"),
    ("coverage float labels", lambda: metrics.coverage(torch.tensor([0.5]), 3), ValueError,
     r"labels must be an integer tensor"),
    ("psnr shapes", lambda: metrics.psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8)), ValueError, r"differ in shape"),
    ("load_checkpoint missing", lambda: checkpoint.load_checkpoint("/nonexistent/model"), checkpoint.CheckpointError,
     r"/nonexistent/model.*not found"),
    ("recipes.get unknown", lambda: recipes.get("nope"), ZooError, r"unknown recipe 'nope'; known: "),
    ("train unknown recipe", Cli("train", "no_such_model", "--preset", "smoke"), CliError,
     r"^error: unknown recipe 'no_such_model'"),
    ("evaluate unknown recipe", Cli("evaluate", "nope", "--preset", "smoke"), CliError, r"^error: unknown recipe 'nope'"),
    ("recipes unknown recipe", Cli("recipes", "nope"), CliError, r"^error: unknown recipe 'nope'"),
    ("sample caption typo", Cli("sample", "real", "--prompt", "a red blob", "--n", "2"), CliError,
     r"^error: unknown word 'blob'"),

    # ------------------------------------------------------------------ chapter 12: the priors (prior.py)
    ("prior empty caption", lambda: prior_sample([""]), ValueError, r"caption 0 is empty"),
    ("prior blank caption", lambda: prior_sample(["a red circle", "   "]), ValueError, r"caption 1 is empty"),
    ("prior caption too long", lambda: prior_sample(["a " + "big " * 30 + "circle"]), ValueError,
     r"a caption is too long for the prior's CLIP"),
    ("prior 30 x big", lambda: prior_sample([" ".join(["big"] * 30)]), ValueError, r"not followed by a shape"),
    ("prior unknown word", lambda: prior_sample(["a red blob"]), ValueError, r"unknown word 'blob'"),
    ("prior bare string", lambda: prior_sample("a red circle"), TypeError, r"captions must be a list of captions"),
    ("prior no captions", lambda: prior_sample([]), ValueError, r"captions must be a non-empty list"),
    ("prior caption not a str", lambda: prior_sample([3]), TypeError, r"caption 0 is a int, not a string"),
    ("prior another CLIP", lambda: prior_sample(clip_model=other_clip()), ValueError,
     r"trained on another CLIP than the one given"),
    ("prior CLIP of another size", lambda: prior_sample(clip_model=other_clip(24)), ValueError,
     r"reads a CLIP with embed_dim 16 and text width 32; this CLIP has 24 and 32"),
    ("prior bind CLIP of another size", lambda: prior.DiffusionPrior(embed_dim=16, text_width=32).bind(other_clip(24)),
     ValueError, r"embed_dim 16 .*this CLIP has 24"),
    ("prior best_of=0", lambda: prior_sample(best_of=0), ValueError, r"best_of must be an int >= 1 .*got 0$"),
    ("prior best_of=1.5", lambda: prior_sample(best_of=1.5), ValueError, r"best_of must be an int >= 1 .*got 1\.5$"),
    ("prior best_of=True", lambda: prior_sample(best_of=True), ValueError, r"best_of must be an int >= 1 .*got True$"),
    ("prior net embedding dim", lambda: tiny_prior().diffusion.net(torch.zeros(2, 17), torch.tensor([1, 2]), prior_text()),
     ValueError, r"the prior denoises embeddings \(B, 16\), got \(2, 17\)"),
    ("prior net text too long", lambda: tiny_prior().diffusion.net(torch.zeros(2, 16), torch.tensor([1, 2]),
                                                                   prior_text(positions=24)),
     ValueError, r"the text has 24 token positions; this prior reads at most 20"),
    ("prior text not a text_condition", lambda: prior.split_text(torch.zeros(2, 16), 32, 16), ValueError,
     r"a prior's text is text_condition\(states, mask, embed\)"),
    ("text_condition no first token",
     lambda: prior.text_condition(torch.zeros(1, 3, 32), torch.tensor([[False, True, True]]), torch.zeros(1, 16)),
     ValueError, r"every caption needs at least its first token"),
    ("text_condition shapes", lambda: prior.text_condition(torch.zeros(2, 3, 32), torch.ones(2, 3, dtype=torch.bool),
                                                           torch.zeros(3, 16)),
     ValueError, r"text_condition expects states \(B, L, W\), mask \(B, L\) and embed \(B, D\)"),
    ("keep_best shapes", lambda: prior.keep_best(torch.zeros(2, 3, 16), torch.zeros(3, 8)), ValueError,
     r"keep_best expects candidates \(N, B, D\) and text_embed \(B, D\)"),
    ("EmbeddingNorm mode", lambda: prior.EmbeddingNorm(16, "whiten"), ValueError, r"normalization must be one of"),
    ("PCAQuantizer k > dim", lambda: prior.PCAQuantizer(16, 17, 8), ValueError, r"1 <= k <= dim \(16\)"),
    ("PCAQuantizer bins=1", lambda: prior.PCAQuantizer(16, 4, 1), ValueError, r"bins >= 2"),
    ("ARPrior temperature=0", lambda: prior.ARPrior(embed_dim=16, text_width=32, context_length=20, k=2, bins=4, width=16,
                                                    layers=1).eval().embed(prior_text(), torch.zeros(2, 16), temperature=0),
     ValueError, r"temperature must be .*> 0"),
    ("EmbeddingNorm embedding dim", lambda: prior.EmbeddingNorm(16).encode(torch.zeros(2, 17)), ValueError,
     r"\(B, 16\).*got \(2, 17\)"),
    ("PCAQuantizer embedding dim", lambda: prior.PCAQuantizer(16, 4, 8).encode(torch.zeros(2, 17)), ValueError,
     r"\(B, 16\).*got \(2, 17\)"),

    # ------------------------------------------------------------------ chapter 13: decoder and upsampler
    ("decoder embedding dim", lambda: decode(F.normalize(torch.ones(2, 17), dim=-1)), ValueError,
     r"expects CLIP image embeddings \(B, 16\) \(float\), got \(2, 17\).*reads a CLIP with embed_dim 16"),
    ("decoder embedding not unit length", lambda: decode(torch.ones(2, 16)), ValueError,
     r"expects unit-length CLIP image embeddings .*got norms in \[4, 4\]"),
    ("decoder embedding partly NaN", lambda: tiny_decoder().diffusion.net(
        torch.zeros(1, 3, 32, 32), torch.tensor([1]), torch.tensor([[float("nan")] + [0.25] * 15]), None),
     ValueError, r"all finite or all NaN"),
    ("decoder integer embeddings", lambda: decode(torch.ones(2, 16, dtype=torch.long)), ValueError,
     r"expects CLIP image embeddings \(B, 16\) \(float\)"),
    ("decoder another CLIP", lambda: decode(clip_model=other_clip()), ValueError,
     r"this Decoder was trained on another CLIP than the one given"),
    ("decoder CLIP of another size", lambda: decode(clip_model=other_clip(24)), ValueError,
     r"this Decoder reads a CLIP with embed_dim 16 and text width 32; this CLIP has 24 and 32"),
    ("decoder not a CLIP", lambda: decode(clip_model="ViT-B-32"), ValueError,
     r"Decoder needs the CLIP it was trained with .*got str"),
    ("decoder unknown guidance mode", lambda: decode(guidance=2.0, guide="caption"), ValueError,
     r"unknown guidance mode guide='caption': choose one of \['both', 'embed', 'text'\]"),
    ("decoder caption count", lambda: decode(captions=["a red circle"]), ValueError,
     r"got 2 embeddings but 1 captions"),
    ("decoder caption typo", lambda: decode(captions=["a red circle", "a red blob"]), ValueError, r"unknown word 'blob'"),
    ("decoder without text given captions", lambda: tiny_decoder(False).decode(
        tiny_clip(), F.normalize(torch.ones(1, 16), dim=-1), ["a red circle"]), ValueError, r"no text pathway"),
    ("decoder net missing text", lambda: tiny_decoder().diffusion.net(
        torch.zeros(1, 3, 32, 32), torch.tensor([1]), F.normalize(torch.ones(1, 16), dim=-1)), ValueError,
     r"this decoder reads captions \(use_text=True\): give text"),
    ("upsampler 64-px input", lambda: tiny_upsampler().upsample(torch.zeros(1, 3, 64, 64)), ValueError,
     r"expects the 32-px images to enlarge, got 64-px ones"),
    ("upsampler 16-px input", lambda: tiny_upsampler().upsample(torch.zeros(1, 3, 16, 16)), ValueError,
     r"expects images of shape \(B, 3, 32, 32\), got \(1, 3, 16, 16\)"),
    ("upsampler noise level", lambda: tiny_upsampler().upsample(torch.zeros(1, 3, 32, 32), noise_level=2), ValueError,
     r"noise_level must be a number in \[0, 1\)"),
    ("upsampler crop", lambda: upsampler.Upsampler(widths=(8, 16), crop=18), ValueError,
     r"crop 18 must be a multiple of 4 and at most 64"),
    ("upsampler net odd size", lambda: tiny_upsampler().diffusion.net(
        torch.zeros(1, 3, 30, 30), torch.tensor([1]), torch.zeros(1, 3, 30, 30), torch.zeros(1)), ValueError,
     r"fully convolutional and takes square images whose side is a multiple of 4, got \(1, 3, 30, 30\)"),
    # ------------------------------------------------------------------ chapter 14: the pipeline
    ("unclip empty caption", lambda: tiny_pipe().generate([""], n=1), ValueError, r"caption 0 is empty"),
    ("unclip caption too long", lambda: tiny_pipe().generate("a " + "big " * 30 + "circle", n=1), ValueError,
     r"a caption is too long for the prior's CLIP"),
    ("unclip unknown word", lambda: tiny_pipe().generate("a red zebra", n=1), ValueError,
     r"unknown word 'zebra' in caption 'a red zebra'; shapes: circle, square, .*colors: red, "),
    ("unclip n zero", lambda: tiny_pipe().generate("a red circle", n=0), ValueError,
     r"n must be a positive number of images per caption, got 0"),
    ("unclip rerank zero", lambda: tiny_pipe().generate("a red circle", n=1, rerank=0), ValueError,
     r"rerank must be a positive number"),
    ("unclip prior steps without a diffusion prior", lambda: unclip.UnCLIP(tiny_clip(), prior.TextPrior(16, 32).bind(tiny_clip()),
                                                                 tiny_decoder()).generate("a red circle", prior_steps=4),
     ValueError, r"prior_steps is the diffusion prior's; this pipeline's prior is a TextPrior"),
    ("unclip prior of another CLIP", lambda: unclip.UnCLIP(other_clip(), tiny_prior(), tiny_decoder()), ValueError,
     r"the prior does not belong to this CLIP \(are the models from different presets\?\)"),
    ("unclip decoder of another size", lambda: unclip.UnCLIP(tiny_clip(), tiny_prior(), decoder.Decoder(
        embed_dim=24, text_width=32, widths=(8, 16), attention_levels=(1,))), ValueError,
     r"the decoder does not belong to this CLIP .*reads a CLIP with embed_dim 24"),
    ("unclip upsampler of another size", lambda: unclip.UnCLIP(tiny_clip(), tiny_prior(), tiny_decoder(),
                                                                upsampler.Upsampler(low=16, widths=(8, 16), crop=16)),
     ValueError, r"the upsampler enlarges 16-px images but the decoder draws 32-px ones"),
    ("unclip not a prior", lambda: unclip.UnCLIP(tiny_clip(), tiny_decoder(), tiny_decoder()), ValueError,
     r"prior must be a minidalle2.prior.Prior"),
    ("unclip variations wrong size", lambda: tiny_pipe().variations(torch.zeros(1, 3, 48, 48)), ValueError,
     r"images for variations: expected square RGB images of 32x32 or 64x64 pixels, got \(48, 48\)"),
    ("unclip variations grayscale", lambda: tiny_pipe().variations(torch.zeros(1, 1, 32, 32)), ValueError,
     r"images for variations must have 3 channels"),
    ("unclip theta above 1", lambda: tiny_pipe().text_diff(images(), "a red circle", "a blue circle", thetas=[0.5, 1.5]),
     ValueError, r"theta must be numbers in \[0, 1.0\] .*got \[0.5, 1.5\]"),
    ("unclip theta negative", lambda: tiny_pipe().text_diff(images(), "a red circle", "a blue circle", thetas=-0.1),
     ValueError, r"theta must be numbers in \[0, 1.0\]"),
    ("unclip text diff unknown word", lambda: tiny_pipe().text_diff(images(), "a red circle", "a blue blob"),
     ValueError, r"unknown word 'blob'"),
    ("unclip interpolation frames", lambda: tiny_pipe().interpolate(images(), images(), frames=1), ValueError,
     r"frames must be an int >= 2"),
    ("unclip slerp shapes", lambda: unclip.slerp(torch.ones(2, 4), torch.ones(3, 4), 0.5), ValueError,
     r"slerp expects two unit-vector tensors of one shape"),
    ("evaluate unclip bad split", Cli("evaluate", "unclip", "--split", "train"), CliError,
     r"^error: unknown split 'train'"),
    ("claims missing results dir file", Cli("claims", "--results", "/nonexistent/dir", "--no-run"), CliError,
     r"^error: no results folder at /nonexistent/dir"),
    ("UNet missing context", lambda: UNet(widths=(8, 16), context_dim=8)(torch.zeros(1, 3, 32, 32), torch.tensor([1])),
     ValueError, r"built with context_dim=8 and needs context tokens \(1, L, 8\), got NoneType"),
]


@pytest.mark.parametrize("fn, error, pattern", [pytest.param(*row[1:4], id=row[0], marks=row[4:])
                                                 for row in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(fn, error, pattern, capsys, monkeypatch):
    with pytest.raises(error) as info:
        fn(capsys, monkeypatch) if isinstance(fn, Cli) else fn()
    message = str(info.value)
    assert re.search(pattern, message), f"message {message!r} does not match {pattern!r}"
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- two objects, each with its position

CAPTION = "a small red circle at the top left above a blue square at the bottom right"


def _scene(objects):
    return data.Scenes(torch.tensor([objects]), torch.zeros(1, 2, 2), [CAPTION])


def test_each_object_keeps_its_own_position():
    prompt = data.parse_caption(CAPTION)
    (circle, square), relation = prompt.objects, prompt.relation
    assert (circle.shape, circle.color, circle.size, circle.position) == (0, 0, 0, 0)   # top left
    assert (square.shape, square.color, square.size, square.position) == (1, 4, None, 8)  # bottom right
    assert relation == "above"
    assert data.parse_caption(str(prompt)) == prompt                 # the Prompt reads back as itself
    # a place before each object belongs to that object
    other = data.parse_caption("in the top left a red circle, in the bottom right a blue square")
    assert [o.position for o in other.objects] == [0, 8] and other.relation is None
    # one object with a place, the other without: as before
    assert [o.position for o in data.parse_caption("a circle above a square at the bottom").objects] == [None, 7]


def test_oracle_and_scoreboard_hold_both_positions_and_the_relation():
    prompt = data.parse_caption(CAPTION)
    right = data.scenes_from_prompts([CAPTION], seed=0)
    assert matches_labels_and_pixels(prompt, right)
    # the square one cell to the left: still below the circle, but not at the bottom right
    wrong = _scene([[0, 0, 0, 0], [1, 4, 1, 7]])
    assert not oracle.matches(prompt, wrong.objects[0])
    assert not oracle.matches(prompt, oracle.read(oracle.load_oracle(), data.render(wrong)).objects[0])
    good, bad = scoreboard.score(data.render(right), [CAPTION]), scoreboard.score(data.render(wrong), [CAPTION])
    assert good["caption_accuracy"] == 1 and good["attr_position"] == 1 and good["attr_relation"] == 1
    assert bad["caption_accuracy"] == 0 and bad["attr_position"] == 0.5 and bad["attr_relation"] == 1


def matches_labels_and_pixels(prompt, scenes):
    """The labels satisfy the prompt, and so does the oracle's reading of the real render."""
    reading = oracle.read(oracle.load_oracle(), data.render(scenes))
    return oracle.matches(prompt, scenes.objects[0]) and bool(reading.valid[0]) and oracle.matches(prompt, reading.objects[0])


# ----------------------------------------------------------------------------- valid inputs still pass

def test_valid_seeds_devices_and_an_empty_default_scoreboard(capsys, monkeypatch, tmp_path):
    import numpy as np
    assert data.check_seed(0) == 0 and data.check_seed(2**63 - 1) == 2**63 - 1 and data.check_seed(np.int64(3)) == 3
    assert len(data.sample_scenes(2, seed=2**63 - 1)) == 2
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert config(device=device).device == device
    # no board yet at the default path: an empty table and a note, not an error
    monkeypatch.setenv("MINIDALLE2_SCOREBOARD", str(tmp_path / "board.jsonl"))
    assert main(["scoreboard"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("| model |") and "no rows yet" in out.err
