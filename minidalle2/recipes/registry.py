"""The list of recipes and lookup by name (recipes/__init__.py fills RECIPES; the rest of the package reads it)."""

from ..lab import zoo

RECIPES: list = []


def register(*recipes):
    """Add recipes to the list, once each; a name used twice is an error."""
    for recipe in recipes:
        if any(r.name == recipe.name for r in RECIPES):
            raise ValueError(f"two recipes are called {recipe.name!r}")
        RECIPES.append(recipe)


def names() -> list[str]:
    return sorted(r.name for r in RECIPES)


def get(name) -> zoo.Recipe:
    """The recipe called `name`; a clear error naming the known ones otherwise."""
    for r in RECIPES:
        if r.name == name:
            return r
    raise zoo.ZooError(f"unknown recipe {name!r}; known: {', '.join(names())}")
