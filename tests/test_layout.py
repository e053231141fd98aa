"""The package layout's import rules, read from the source with `ast` (nothing is imported to check them).

    minidalle2/*.py          concepts (data, layers, gan, ..., diffusion_model, guidance): import only each other
    minidalle2/lab/          infrastructure (train, checkpoint, zoo, ...): may import concepts, never recipes or course
    minidalle2/course/       the course machinery: may import concepts and lab, never recipes
    minidalle2/recipes/      every trained model by name: may import anything above
    minidalle2/__main__.py   the command line

Every import counts, at module level or inside a function: a lazy import still ties the two modules together.
"""
import ast
import contextlib
import io
from pathlib import Path

import pytest

PACKAGE = "minidalle2"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAYERS = ("lab", "recipes", "course")


def module_name(path):
    """minidalle2/lab/train.py -> minidalle2.lab.train; minidalle2/lab/__init__.py -> minidalle2.lab."""
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
PACKAGES = {module_name(p) for p in FILES.values() if p.name == "__init__.py"}
CONCEPTS = sorted(m for m, p in FILES.items() if p.parent == ROOT and p.name not in ("__init__.py", "__main__.py"))


def resolve(target):
    """The module a dotted name refers to: itself if it is a module of the package, else its longest module prefix
    (minidalle2.diffusion.sample -> minidalle2.diffusion)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in FILES:
            return name
    return target


def imports(module):
    """[(imported module, line, source text)] for every import of minidalle2.* in `module`, anywhere in the file."""
    path = FILES[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if module in PACKAGES else module.rpartition(".")[0]     # what `from .` means here
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append((resolve(alias.name), node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    raise AssertionError(f"{module}:{node.lineno}: relative import goes above the package")
                base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            text = f"from {'.' * node.level}{node.module or ''} import "
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from . import x` imports the submodule x if there is one, else the name x from the package
                target = submodule if submodule in FILES else resolve(base)
                found.append((target, node.lineno, text + alias.name))
    return found


GRAPH = {m: imports(m) for m in FILES}


def where(module, line, text):
    return f"{FILES[module].relative_to(ROOT.parent)}:{line} ({module}): `{text}`"


def violations(importers, forbidden):
    """Every import by a module in `importers` of a module in (or under) one of the `forbidden` packages."""
    bad = []
    for module in importers:
        for target, line, text in GRAPH[module]:
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                bad.append(f"{where(module, line, text)} imports {target}")
    return bad


def in_layer(layer):
    prefix = f"{PACKAGE}.{layer}"
    return sorted(m for m in FILES if m == prefix or m.startswith(prefix + "."))


# ----------------------------------------------------------------------------- the parser itself

def test_the_parser_sees_the_layout():
    """A guard for the rules below: they pass vacuously if the walk finds no files or no imports."""
    assert {"minidalle2.diffusion", "minidalle2.diffusion_model", "minidalle2.layers"} <= set(CONCEPTS)
    for layer in LAYERS:
        assert f"{PACKAGE}.{layer}" in PACKAGES, f"no package minidalle2/{layer}/"
    assert "minidalle2.course.checks" in PACKAGES
    # module level, relative: diffusion_model.py has `from .diffusion import ...` and `from . import data`
    targets = {t for t, _, _ in GRAPH["minidalle2.diffusion_model"]}
    assert {"minidalle2.diffusion", "minidalle2.data"} <= targets, targets
    # inside functions: __main__.py imports the recipes and the lab lazily
    targets = {t for t, _, _ in GRAPH["minidalle2.__main__"]}
    assert "minidalle2.recipes" in targets and "minidalle2.lab.presets" in targets, targets
    # two dots: recipes/__init__.py has `from ..lab import zoo`
    assert "minidalle2.lab.zoo" in {t for t, _, _ in GRAPH["minidalle2.recipes"]}


# ----------------------------------------------------------------------------- the rules

def find_cycle(graph):
    """One import cycle [a, b, ..., a] in {module: [(target, line, text)]}, or None (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in graph}
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted({t for t, _, _ in graph[root] if t in graph})))]
        path = [root]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour[child] == GREY:
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                path.append(child)
                stack.append((child, iter(sorted({t for t, _, _ in graph[child] if t in graph}))))
    return None


def test_find_cycle_reports_the_path():
    graph = {"a": [("b", 1, "")], "b": [("c", 1, "")], "c": [("a", 1, ""), ("d", 1, "")], "d": []}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": [("b", 1, "")], "b": [], "c": [("a", 1, "")]}) is None
    two = cycles({"a": [("b", 1, "")], "b": [("a", 1, "")], "c": [("d", 1, "")], "d": [("c", 1, "")]})
    assert sorted(sorted(set(c)) for c in two) == [["a", "b"], ["c", "d"]]


def cycles(graph):
    """One cycle per group of mutually importing modules: remove each found cycle's closing edge and look again."""
    graph = {m: list(edges) for m, edges in graph.items()}
    found = []
    while (cycle := find_cycle(graph)) is not None:
        found.append(cycle)
        graph[cycle[-2]] = [e for e in graph[cycle[-2]] if e[0] != cycle[-1]]
    return found


def test_no_import_cycles():
    report = []
    for cycle in cycles(GRAPH):
        report.append("import cycle " + " -> ".join(cycle) + ":")
        for a, b in zip(cycle, cycle[1:]):
            line, text = next((line, text) for t, line, text in GRAPH[a] if t == b)
            report.append(f"  {where(a, line, text)} -> {b}")
    if report:
        pytest.fail("\n".join(report), pytrace=False)


def test_concept_modules_import_no_lab_recipes_or_course():
    bad = violations(CONCEPTS, [f"{PACKAGE}.{layer}" for layer in LAYERS])
    assert not bad, "a concept module imports infrastructure or course code:\n" + "\n".join(bad)


def test_lab_imports_no_recipes_or_course():
    bad = violations(in_layer("lab"), [f"{PACKAGE}.recipes", f"{PACKAGE}.course"])
    assert not bad, "minidalle2.lab imports recipes or course code:\n" + "\n".join(bad)


def test_course_imports_no_recipes():
    bad = violations(in_layer("course"), [f"{PACKAGE}.recipes"])
    assert not bad, "minidalle2.course imports recipes:\n" + "\n".join(bad)


def test_every_concept_module_has_a_docstring():
    missing = [f"{FILES[m].relative_to(ROOT.parent)} ({m})" for m in CONCEPTS
               if not (ast.get_docstring(ast.parse(FILES[m].read_text())) or "").strip()]
    assert not missing, "concept modules without a module docstring (ls minidalle2/ is the table of contents):\n" \
        + "\n".join(missing)


# ----------------------------------------------------------------------------- the command line

def test_cli_recipes_lists_every_recipe():
    from minidalle2 import recipes
    from minidalle2.__main__ import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["recipes", "--preset", "smoke"]) == 0
    rows = {line.split("|")[1].strip() for line in out.getvalue().splitlines() if line.startswith("| ")}
    names = recipes.names()
    assert names, "no recipes registered"
    missing = [n for n in names if n not in rows]
    assert not missing, f"`python -m minidalle2 recipes --preset smoke` does not list {missing}:\n{out.getvalue()}"
    assert all("| smoke |" in line for line in out.getvalue().splitlines()[2:] if line.strip())
