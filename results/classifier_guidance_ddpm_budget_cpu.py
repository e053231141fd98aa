"""Train the ddpm cpu recipe for 3x its steps; score smoothed classifier guidance (s = 8) on the benchmark's
1,000 prompts with the 1x / 2x / 3x EMA weights. Ad-hoc measurement for issue #4, stop 14.
Usage: PYTHONPATH=. python results/classifier_guidance_ddpm_budget_cpu.py OUT.json"""
import copy, json, sys, time
import torch
from minidalle2 import ddpm, guidance, zoo
from minidalle2.checkpoint import atomic_write_json
from minidalle2.presets import train_config
from minidalle2.scoreboard import score
from minidalle2.train import seed_everything, train
from minidalle2.zoo import derive_seed

budget = train_config("ddpm", "cpu").steps
seed_everything(derive_seed("ddpm", "cpu", "init"))
model = ddpm.build("cpu")
states = {}
def keep(step, seconds, sample_model):
    states[step] = (seconds, copy.deepcopy(sample_model.state_dict()))
    print("kept", step, seconds, flush=True)
train(model, ddpm.ddpm_loss, ddpm.shapes_dataset("cpu"), train_config("ddpm", "cpu", steps=3 * budget),
      kind="diffusion", snapshot=(budget, keep))
zoo_ddpm = zoo.load_or_train("ddpm", "cpu")
same = all(torch.equal(v, zoo_ddpm.state_dict()[k]) for k, v in states[budget][1].items())
print("1x weights identical to the zoo ddpm:", same, flush=True)
clf = zoo.load_or_train("classifier_guidance", "cpu")
prompts = zoo.get_recipe("classifier_guidance").prompts(1000, 100)   # the benchmark's prompts (seed 0 + 100)
rows = []
for step, (seconds, state) in sorted(states.items()):
    eval_model = ddpm.build("cpu"); eval_model.load_state_dict(state); eval_model.eval()
    start = time.perf_counter()
    images = guidance.classifier_guided_generate(eval_model, clf, guidance.classes_from_prompts(prompts),
                                                 guidance.CLASSIFIER_SCALE, guidance.CLASSIFIER_SMOOTHING,
                                                 guidance.SMOOTHING_SAMPLES, seed=0)
    report = score(images, prompts, seed=0)
    rows.append({"step": step, "train_minutes": seconds / 60, "sample_seconds": time.perf_counter() - start,
                 **{k: report[k] for k in ("caption_accuracy", "validity", "attr_shape", "attr_color", "fid")}})
    print(json.dumps(rows[-1]), flush=True)
atomic_write_json(sys.argv[1], {"identical_to_zoo_at_1x": same, "rows": rows})
