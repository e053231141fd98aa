"""Classifier guidance vs training budget, cpu-preset networks and recipes, on a GPU (steps are what count)."""
import copy, json, os, sys, time
import torch
from minidalle2 import guidance as G, data, recipes
from minidalle2.lab.train import train, seed_everything
from minidalle2.lab.scoreboard import score
from minidalle2.recipes.diffusion import CLASSIFIER_GUIDANCE, DDPM, classifier_schedule
OUT = os.environ["OUT"]; rows = []
def dump(): json.dump(rows, open(f"{OUT}/cg_budget.json", "w"), indent=1)
t0 = time.time()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
EVERY, N = int(sys.argv[3]), int(sys.argv[4])
ddpm1 = recipes.load("ddpm", "cpu").to(DEV); clf15 = recipes.load("classifier_guidance", "cpu").to(DEV)
# classifier: the cpu recipe (cosine lr), 2x the steps
seed_everything(0)
clf = CLASSIFIER_GUIDANCE.build_model("cpu")
if int(sys.argv[1]) == 0: clf30 = None
else:
 
 r = train(clf, lambda m, b: G.noisy_classifier_loss(m, b, classifier_schedule()), CLASSIFIER_GUIDANCE.make_dataset("cpu"),
          CLASSIFIER_GUIDANCE.train_config("cpu", steps=int(sys.argv[1])), kind="noisy_classifier", progress=False)
 clf30 = r.model.eval(); print("clf", sys.argv[1], "steps", r.seconds, "s", G.accuracy_by_timestep(clf30, classifier_schedule()), flush=True)
# ddpm: the cpu recipe (constant lr + EMA): EMA snapshots at 2x and 4x the cpu budget
seed_everything(0)
dm = DDPM.build_model("cpu"); snaps = {}
def keep(step, seconds, m):
    snaps[step] = copy.deepcopy(m).eval(); print("ddpm step", step, seconds, flush=True)
r = train(dm, DDPM.loss, DDPM.make_dataset("cpu"), DDPM.train_config("cpu", steps=int(sys.argv[2])),
          kind="diffusion", progress=False, snapshot=(EVERY, keep))
print("ddpm trained", r.seconds, time.time() - t0, flush=True)
classes, prompts = data.pair_prompts(N, 0)
grid = [(2800, ddpm1)] + [(s, m) for s, m in sorted(snaps.items()) if s > EVERY]
for ds, dmodel in grid:
    dmodel.schedule = ddpm1.schedule
    rep = score(dmodel.generate(N, seed=0), None)
    rows.append({"ddpm_steps": ds, "classifier_steps": 0, "scale": 0, "validity": rep["validity"]}); print(rows[-1], flush=True)
    for cs, c in [(15000, clf15), (int(sys.argv[1]), clf30)][:1 + (clf30 is not None)]:
        for s in (4.0, 8.0):
            rep = score(G.classifier_guided_generate(dmodel, c, classes, s, seed=0), prompts)
            rows.append({"ddpm_steps": ds, "classifier_steps": cs, "scale": s,
                         **{k: rep[k] for k in ("caption_accuracy", "attr_shape", "attr_color", "validity", "fid")}})
            print(rows[-1], time.time() - t0, flush=True); dump()
