"""The benchmark command: sample a recipe's generator, score the images with the oracle, add a scoreboard row."""

import time

from .. import data
from ..lab import zoo
from ..lab.scoreboard import add_row, score
from .registry import get


def generate(name, preset, n, prompts=None, seed=0):
    """n samples of a registered generator, and its training time (seconds, None if unknown).
    The name "real" renders the prompts exactly: the ceiling every generator is compared with."""
    if name == "real":
        scenes = data.scenes_from_prompts(prompts, seed) if prompts is not None else data.sample_scenes(n, "test", seed)
        return data.render(scenes), 0.0
    recipe = get(name)
    if recipe.sample is None:
        raise ValueError(f"recipe {name!r} is not a generator (it has no sample function)")
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
    generate (a denoiser) gets a row of its report alone."""
    recipe = None if name == "real" else get(name)
    report, sample_seconds, train_seconds = {}, None, None
    if recipe is None or recipe.sample is not None:
        if recipe is not None and recipe.prompts is not None:  # e.g. class prompts for a class-conditional model
            prompts = recipe.prompts(n, seed + 100)
        else:
            prompts = data.sample_scenes(n, split, seed=seed + 100).captions
        if recipe is not None:
            zoo.load_or_train(recipe, preset)  # train (or load) first: the clock below times sampling only
        start = time.perf_counter()
        images, train_seconds = generate(name, preset, n, prompts, seed)
        sample_seconds = time.perf_counter() - start
        conditional = recipe is None or recipe.conditional
        report = score(images, prompts if conditional else None, seed=seed)
    if recipe is not None and recipe.report is not None:
        model = zoo.load_or_train(recipe, preset)
        train_seconds = _train_seconds(recipe, preset)
        report.update(recipe.report(model, **zoo.with_needs(recipe, preset)))
    elif recipe is not None and recipe.sample is None:
        raise ValueError(f"recipe {name!r} neither generates (no sample) nor reports (no report)")
    return add_row(name, preset, report, train_seconds=train_seconds, sample_seconds=sample_seconds,
                   path=path, split=split)
