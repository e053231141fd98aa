"""The command line: python -m minidalle2 {train, sample, evaluate, curve, scoreboard, claims, recipes, course, student} --help"""
import argparse
import json
import sys

# what each count option counts, for its error message
_COUNTS = {"n": "samples", "steps": "training steps", "every": "training steps between scores",
           "images": "samples per score"}


def _check_counts(args, *names):
    """Counts given on the command line must be positive: 0 must not quietly mean "the default"."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive number of {_COUNTS[name]}, got {value}")


def _check_seed(args):
    from .data import check_seed
    check_seed(args.seed, "--seed")


def _train(args):
    from . import recipes
    from .lab import zoo
    recipe = recipes.get(args.name)
    if args.export:
        meta = zoo.export(recipe, args.preset, args.export, retrain=args.retrain)
        print(json.dumps(meta, indent=2))
    else:
        zoo.load_or_train(recipe, args.preset, retrain=args.retrain)
    return 0


def _sample(args):
    _check_counts(args, "n")
    _check_seed(args)
    from .lab.viz import image_grid
    from .recipes import generate
    import torchvision
    prompts = [args.prompt[i % len(args.prompt)] for i in range(args.n)] if args.prompt else None
    images, _ = generate(args.name, args.preset, args.n, prompts, args.seed)
    torchvision.utils.save_image((image_grid(images, nrow=8) + 1) / 2, args.out)
    print(f"wrote {len(images)} samples to {args.out}")
    return 0


def _evaluate(args):
    _check_counts(args, "n")
    _check_seed(args)
    from .lab.scoreboard import format_other_numbers, format_table
    from .recipes import benchmark
    row = benchmark(args.name, args.preset, args.n, args.split, args.seed, args.scoreboard)
    print(format_table([row]))
    print(format_other_numbers(row))
    if args.json:
        from .lab.checkpoint import atomic_write_json
        atomic_write_json(args.json, row)
    return 0


def _curve(args):
    _check_counts(args, "steps", "every", "images")
    from .lab.checkpoint import atomic_write_json
    from .recipes.diffusion import time_to_quality
    rows = time_to_quality(args.name, args.preset, args.steps, args.every, args.images)
    if args.json:
        atomic_write_json(args.json, {"recipe": args.name, "preset": args.preset, "steps": args.steps,
                                      "every": args.every, "rows": rows})
    return 0


def _scoreboard(args):
    from pathlib import Path
    from .lab.scoreboard import default_path, format_table, load_rows
    path = Path(args.path) if args.path else default_path()
    if args.path and not path.is_file():  # a typo must not look like an empty board
        raise FileNotFoundError(f"no scoreboard file at {path}")
    print(format_table(load_rows(path)))
    if not path.exists():
        print(f"(no rows yet: {path} does not exist; `python -m minidalle2 evaluate NAME` adds one)", file=sys.stderr)
    return 0


def _claims(args):
    from .recipes.claims import claims
    path = claims(args.preset, args.results, args.out, run_missing=not args.no_run)
    print(f"wrote {path}")
    return 0


def _recipes(args):
    from . import recipes
    if args.name:
        print(recipes.get(args.name).describe(args.preset))
    else:
        print(recipes.table(args.preset))
    return 0


def _student(args):
    from .course.exercises import exercise_count, write_student_notebooks
    from .course.runner import list_notebooks
    import nbformat
    paths = args.notebooks or list_notebooks(args.notebooks_dir)
    if not paths:
        raise ValueError(f"no notebooks found in {args.notebooks_dir}")
    for dest in write_student_notebooks(paths, args.out):
        print(f"{dest}  ({exercise_count(nbformat.read(str(dest), as_version=4))} exercises)")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["course"]:  # the course runner owns its own options
        from .course.runner import main as course_main
        return course_main(argv[1:])
    from .lab.presets import PRESETS
    parser = argparse.ArgumentParser(prog="python -m minidalle2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_preset(p):
        p.add_argument("--preset", choices=PRESETS, default=None, help="default: $MINIDALLE2_PRESET or cpu")
        return p

    p = with_preset(sub.add_parser("train", help="train a recipe (or load it from the cache)"))
    p.add_argument("name")
    p.add_argument("--retrain", action="store_true", help="train even if a cached model is valid")
    p.add_argument("--export", metavar="PATH", help="also write the model + its measured report to PATH")
    p.set_defaults(run=_train)

    p = with_preset(sub.add_parser("sample", help="draw samples from a generator into a PNG grid"))
    p.add_argument("name", help="a generator recipe, 'unclip' for the whole pipeline (64 px), or 'real' for exact "
                                "renders of the prompts")
    p.add_argument("--prompt", action="append", help="caption (repeat for several)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(run=_sample)

    p = with_preset(sub.add_parser("evaluate", help="benchmark a generator with the oracle; adds a scoreboard row"))
    p.add_argument("name", help="a generator recipe, 'unclip' for the whole pipeline, or 'real' for the ceiling row")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--split", default="test", help="whose captions are the prompts: test or holdout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scoreboard", metavar="PATH", help="default: $MINIDALLE2_SCOREBOARD or <cache>/scoreboard.jsonl")
    p.add_argument("--json", metavar="PATH", help="also write the row as a JSON report")
    p.set_defaults(run=_evaluate)

    p = with_preset(sub.add_parser("curve", help="time-to-quality: train a fresh diffusion model, score it every k steps"))
    p.add_argument("name", choices=["ddpm", "cfg", "classifier_guidance"],
                   help="classifier_guidance: a fresh ddpm, guided by the preset's noisy classifier")
    p.add_argument("--steps", type=int, help="default: the preset's budget")
    p.add_argument("--every", type=int, help="score every N steps (default: the recipe's settings)")
    p.add_argument("--images", type=int, help="samples per score (default: the recipe's settings)")
    p.add_argument("--json", metavar="PATH", help="write the curve here")
    p.set_defaults(run=_curve)

    p = sub.add_parser("scoreboard", help="print the scoreboard table")
    p.add_argument("--path", help="default: $MINIDALLE2_SCOREBOARD or <cache>/scoreboard.jsonl")
    p.set_defaults(run=_scoreboard)

    p = with_preset(sub.add_parser("claims", help="the papers' claims beside our numbers -> results/claims.md"))
    p.add_argument("--results", default="results", help="the folder of results files (default: results)")
    p.add_argument("--out", help="default: <results>/claims.md (cpu) or claims_<preset>.md")
    p.add_argument("--no-run", action="store_true", help="only read the results files; measure nothing missing")
    p.set_defaults(run=_claims)

    p = sub.add_parser("student", help="write student versions of the notebooks (solutions -> NotImplementedError)")
    p.add_argument("notebooks", nargs="*", help="default: every NN_*.ipynb in --notebooks-dir")
    p.add_argument("--notebooks-dir", default="notebooks")
    p.add_argument("--out", default="build/student", help="output folder (default: build/student)")
    p.set_defaults(run=_student)

    p = sub.add_parser("recipes", help="print every recipe's budget side by side, or one recipe in full")
    p.add_argument("name", nargs="?", help="one recipe: its model, data, budget and needs at --preset")
    p.add_argument("--preset", choices=PRESETS, default=None, help="default: every preset (one recipe: the default one)")
    p.set_defaults(run=_recipes)

    sub.add_parser("course", help="run every notebook in order (see: course --help)")
    args = parser.parse_args(argv)
    from .lab.presets import default_preset
    from .lab.train import DivergenceError
    from .lab.zoo import ZooError
    try:
        if getattr(args, "preset", "x") is None and args.command != "recipes":
            args.preset = default_preset()   # a bad $MINIDALLE2_PRESET is one clear line too
        return args.run(args)
    except (ValueError, OSError, ZooError, DivergenceError) as e:  # one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
