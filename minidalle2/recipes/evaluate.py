"""The benchmark command: sample a recipe's generator, score the images with the oracle, add a scoreboard row."""

import time

from .. import data
from ..lab import zoo
from ..lab.scoreboard import add_row, score
from .registry import get

PROMPT_SPLITS = ("test", "holdout")   # benchmark prompts come from scenes never trained on
PIPELINE = "unclip"                    # not a recipe: the chapter-14 pipeline of four of them


def _check_request(n, seed, prompts=None):
    """The arguments every benchmark call shares, checked before any model is trained or loaded."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n!r}")
    data.check_seed(seed)
    if prompts is not None and len(data.check_prompt_list(prompts)) != n:
        raise ValueError(f"got {len(prompts)} prompts for n = {n} samples; give one prompt per sample")


def generate(name, preset, n, prompts=None, seed=0):
    """n samples of a registered generator, and its training time (seconds, None if unknown).
    The name "real" renders the prompts exactly: the ceiling every generator is compared with; "unclip" runs the
    whole pipeline of chapter 14 (64-px images)."""
    _check_request(n, seed, prompts)
    if name == PIPELINE:
        from .unclip import generate as pipeline_generate
        return pipeline_generate(preset, prompts, n, seed), None
    if name == "real":
        scenes = data.scenes_from_prompts(prompts, seed) if prompts is not None else data.sample_scenes(n, "test", seed)
        return data.render(scenes), 0.0
    recipe = get(name)
    if recipe.sample is None:
        raise ValueError(f"recipe {name!r} is not a generator (it has no sample function)")
    if prompts is not None and not recipe.conditional:
        raise ValueError(f"recipe {name!r} is an unconditional model: it takes no prompt; sample it without prompts")
    if recipe.conditional and prompts is None and recipe.prompts is not None:
        prompts = recipe.prompts(n, seed)             # e.g. balanced class captions for a class-conditional model
    model = zoo.load_or_train(recipe, preset)
    images = recipe.sample(model, prompts if recipe.conditional else None, n, seed, **zoo.with_needs(recipe, preset))
    return images, _train_seconds(recipe, preset)


def _train_seconds(recipe, preset):
    try:  # the train time is a nicety in the table, never a reason to fail
        return zoo.cached_meta(recipe, preset).get("seconds")
    except (zoo.ZooError, ValueError):
        return None


def benchmark(name, preset, n=1000, split="test", seed=0, path=None):
    """Sample n images (prompts = captions of `split`), score, add a row. A recipe with a `report`
    (e.g. reconstruction PSNR of an auto-encoder) adds those numbers too; a recipe that does not
    generate (a denoiser) gets a row of its report alone. "unclip": the whole pipeline (recipes.unclip.benchmark)."""
    _check_request(n, seed)
    if split not in PROMPT_SPLITS:
        raise ValueError(f"unknown split {split!r}: the prompts come from the captions of {' or '.join(PROMPT_SPLITS)}")
    if name == PIPELINE:
        from .unclip import benchmark as pipeline_benchmark
        return pipeline_benchmark(preset, n, split, seed, path)
    recipe = None if name == "real" else get(name)
    from_split = recipe is None or (recipe.sample is not None and recipe.conditional and recipe.prompts is None)
    if split != "test" and not from_split:
        why = ("takes no prompts" if recipe.sample is None or not recipe.conditional
               else "is benchmarked on its own prompts")
        raise ValueError(f"recipe {name!r} {why}, so split={split!r} would change nothing; leave it at 'test'")
    report, sample_seconds, train_seconds = {}, None, None
    if recipe is None or recipe.sample is not None:
        if recipe is not None and recipe.prompts is not None:  # e.g. class prompts for a class-conditional model
            prompts = recipe.prompts(n, seed + 100)
        else:
            prompts = data.sample_scenes(n, split, seed=seed + 100).captions
        if recipe is not None:
            zoo.load_or_train(recipe, preset)  # train (or load) first: the clock below times sampling only
        start = time.perf_counter()
        conditional = recipe is None or recipe.conditional
        images, train_seconds = generate(name, preset, n, prompts if conditional else None, seed)
        sample_seconds = time.perf_counter() - start
        report = score(images, prompts if conditional else None, seed=seed)
    if recipe is not None and recipe.report is not None:
        model = zoo.load_or_train(recipe, preset)
        train_seconds = _train_seconds(recipe, preset)
        report.update(recipe.report(model, **zoo.with_needs(recipe, preset)))
    elif recipe is not None and recipe.sample is None:
        raise ValueError(f"recipe {name!r} neither generates (no sample) nor reports (no report)")
    return add_row(name, preset, report, train_seconds=train_seconds, sample_seconds=sample_seconds,
                   path=path, split=split)
