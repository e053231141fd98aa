"""Chapter 12's table at the cpu preset: every prior's numbers (recipes.prior.prior_report), the diffusion prior's
best-of-N and guidance sweeps, and the normalisation comparison. Trains what is not cached (each <= 10 minutes).
Usage: PYTHONPATH=. python results/prior_cpu.py results/prior_cpu.json [section ...]
sections: table (default), sweep, norms (each normalisation at the recipe's budget), norms_short (at 600 steps),
prediction (x0- against eps-prediction, both at 600 steps)"""
import sys
import time

from minidalle2 import recipes
from minidalle2.lab import zoo
from minidalle2.lab.checkpoint import atomic_write_json
from minidalle2.recipes.prior import prior_report

PRESET = "cpu"
out_path, sections = sys.argv[1], sys.argv[2:] or ["table"]
try:
    import json
    results = json.load(open(out_path))
except (FileNotFoundError, ValueError):
    results = {}
results["command"] = "PYTHONPATH=. python results/prior_cpu.py results/prior_cpu.json " + " ".join(sections)


def run(recipe, **options):
    model = zoo.load_or_train(recipe, PRESET, progress=False)
    meta = zoo.cached_meta(recipe, PRESET)
    start = time.perf_counter()
    row = prior_report(model, zoo.Needs(recipe, PRESET), PRESET, **options)
    row.update(train_seconds=meta.get("seconds"), report_seconds=time.perf_counter() - start, options=options)
    print(recipe.name, options, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


if "table" in sections:   # the scoreboard rows: `python -m minidalle2 evaluate NAME --preset cpu`, appended to
    results["table"] = {}  # results/scoreboard.jsonl
    for name in ("prior_real", "prior_none", "prior_mlp", "prior_diffusion", "prior_ar"):
        zoo.load_or_train(recipes.get(name), PRESET, progress=False)
        results["table"][name] = recipes.benchmark(name, PRESET, path="results/scoreboard.jsonl")
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in results["table"][name].items()},
              flush=True)
if "sweep" in sections:   # each beside the table's defaults (best-of-2, guidance 1, DDIM eta 0; AR: best-of-2)
    d, ar = recipes.get("prior_diffusion"), recipes.get("prior_ar")
    results["best_of"] = {str(n): run(d, best_of=n) for n in (1, 4)}
    results["eta"] = {"1.0": run(d, eta=1.0)}
    results["guidance"] = {str(w): run(d, guidance=w) for w in (0.0, 1.5, 3.0)}
    results["ar"] = {"guidance=2": run(ar, guidance=2.0), "best_of=1": run(ar, best_of=1)}
if "norms" in sections:
    d = recipes.get("prior_diffusion")
    results["normalization"] = {m: run(d if m == d.model_config(PRESET)["normalization"] else
                                       d.variant(f"prior_diffusion_{m}", model=dict(normalization=m)))
                                for m in ("standardize", "sqrt_d", "unit")}
if "norms_short" in sections:   # the three normalisations at a quarter of the budget (600 steps, ~2.3 minutes each)
    d = recipes.get("prior_diffusion")
    results["normalization_600_steps"] = {
        m: run(d.variant(f"prior_diffusion_{m}_600", model=dict(normalization=m), training={"cpu": dict(steps=600)}))
        for m in ("standardize", "sqrt_d", "unit")}
if "prediction" in sections:   # the paper predicts z_0 directly; eps beside it, at norms_short's 600 steps
    d = recipes.get("prior_diffusion")
    results["prediction_600_steps"] = {
        p: run(d.variant(f"prior_diffusion_{p}_600", model=dict(prediction=p), training={"cpu": dict(steps=600)}))
        for p in ("x0", "eps")}
atomic_write_json(out_path, results)
