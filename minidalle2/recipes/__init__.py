"""
Recipes: every model the course trains, by name, one file per chapter family.

    from minidalle2 import recipes
    vae = recipes.load("vae", "cpu")                   # train-or-load through the zoo
    print(recipes.get("cfg").describe("cpu"))          # its model, data and budget at a preset
    print(recipes.table("cpu"))                        # every recipe's budget side by side

A recipe (lab.zoo.Recipe) holds, per preset, the model config, the data, the TrainConfig and other sizes,
the recipes it builds on, and how it samples. A new chapter adds a file here and its recipes to RECIPES.
"""

from ..lab import zoo
from ..lab.presets import PRESETS
from . import autoencoder, clip, decoder, diffusion, gan, oracle, prior, vae
from .evaluate import benchmark, generate  # noqa: F401
from .registry import RECIPES, get, names, register  # noqa: F401  (names: part of the API)

# explicit, in course order: importing a chapter module registers nothing by itself
register(*oracle.RECIPES, *gan.RECIPES, *autoencoder.RECIPES, *vae.RECIPES, *clip.RECIPES, *diffusion.RECIPES,
         *prior.RECIPES, *decoder.RECIPES)


def load(name, preset=None, **kwargs):
    """zoo.load_or_train of the recipe `name` (kwargs: cache, retrain, progress)."""
    return zoo.load_or_train(get(name), preset, **kwargs)


def training_history(name, preset=None, **kwargs) -> list[dict]:
    return zoo.training_history(get(name), preset, **kwargs)


def table(preset=None) -> str:
    """Every recipe's budget at `preset` (default: all presets) as a markdown table: the budgets side by side."""
    presets = PRESETS if preset is None else (preset,)
    lines = ["| recipe | preset | steps | batch | lr | schedule | ema | data | needs |", "|" + "---|" * 9]
    for r in RECIPES:
        for p in presets:
            c = r.train_config(p)
            data = r.data.get(p, {}).get("size", "-")
            lines.append(f"| {r.name} | {p} | {c.steps} | {c.batch_size} | {c.lr:g} | {c.lr_schedule} | "
                         f"{c.ema_decay or '-'} | {data} | {', '.join(n.name for n in r.needs) or '-'} |")
    return "\n".join(lines)

