"""
Presets: how much compute a run may spend. The single place that names them.

    smoke   seconds per notebook on a 2-core CPU; proves the plumbing; what CI runs
    cpu     a laptop without a GPU; each training run <= ~10 minutes on 2 cores
    full    one GPU, minutes; best quality; the recipe for shipped checkpoints

What a preset buys for each model (sizes, data, training budget) is part of that model's recipe
(minidalle2/recipes/); `python -m minidalle2 recipes` prints them side by side.
"""

import os

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
