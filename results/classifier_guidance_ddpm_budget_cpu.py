"""Train the ddpm cpu recipe for 3x its steps; score smoothed classifier guidance (s = 8) on the benchmark's
1,000 prompts with the 1x / 2x / 3x EMA weights. Ad-hoc measurement for issue #4, stop 14.
Usage: PYTHONPATH=. python results/classifier_guidance_ddpm_budget_cpu.py OUT.json"""
import copy, json, sys, time
import torch
from minidalle2 import guidance, recipes
from minidalle2.lab.checkpoint import atomic_write_json
from minidalle2.lab.scoreboard import score
from minidalle2.lab.train import derive_seed, seed_everything, train
from minidalle2.recipes import diffusion as rd

budget = rd.DDPM.train_config("cpu").steps
seed_everything(derive_seed("ddpm", "cpu", "init"))
model = rd.DDPM.build_model("cpu")
states = {}
def keep(step, seconds, sample_model):
    states[step] = (seconds, copy.deepcopy(sample_model.state_dict()))
    print("kept", step, seconds, flush=True)
train(model, rd.DDPM.loss, rd.DDPM.make_dataset("cpu"), rd.DDPM.train_config("cpu", steps=3 * budget),
      kind="diffusion", snapshot=(budget, keep))
zoo_ddpm = recipes.load("ddpm", "cpu")
same = all(torch.equal(v, zoo_ddpm.state_dict()[k]) for k, v in states[budget][1].items())
print("1x weights identical to the zoo ddpm:", same, flush=True)
clf = recipes.load("classifier_guidance", "cpu")
prompts = recipes.get("classifier_guidance").prompts(1000, 100)   # the benchmark's prompts (seed 0 + 100)
rows = []
for step, (seconds, state) in sorted(states.items()):
    eval_model = rd.DDPM.build_model("cpu"); eval_model.load_state_dict(state); eval_model.eval()
    start = time.perf_counter()
    images = guidance.classifier_guided_generate(eval_model, clf, guidance.classes_from_prompts(prompts),
                                                 rd.CLASSIFIER_SCALE, rd.CLASSIFIER_SMOOTHING,
                                                 rd.SMOOTHING_SAMPLES, seed=0)
    report = score(images, prompts, seed=0)
    rows.append({"step": step, "train_minutes": seconds / 60, "sample_seconds": time.perf_counter() - start,
                 **{k: report[k] for k in ("caption_accuracy", "validity", "attr_shape", "attr_color", "fid")}})
    print(json.dumps(rows[-1]), flush=True)
atomic_write_json(sys.argv[1], {"identical_to_zoo_at_1x": same, "rows": rows})
