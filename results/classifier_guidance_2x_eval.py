"""Stop 14 ad-hoc: smoothed classifier guidance (s = 8) on the benchmark's 1,000 prompts with the 2x classifier, guiding the
2x ddpm and the zoo's 1x ddpm (models from classifier_guidance_2x_train.py, saved under /tmp/s14/)."""
import json, sys, time
from minidalle2 import guidance, recipes
from minidalle2.diffusion_model import DiffusionModel
from minidalle2.lab.checkpoint import load_model
from minidalle2.lab.scoreboard import score
from minidalle2.recipes import diffusion as rd
from minidalle2.unet import NoisyClassifier, UNet

prompts = recipes.get("classifier_guidance").prompts(1000, 100)
classes = guidance.classes_from_prompts(prompts)
ddpm2x = load_model("/tmp/s14/ddpm2x", DiffusionModel.factory(UNet), "diffusion").eval()
clf2x = load_model("/tmp/s14/classifier2x", lambda **c: NoisyClassifier(**c), "noisy_classifier").eval()
print("classifier 2x accuracy by t quartile:", guidance.accuracy_by_timestep(clf2x, rd.classifier_schedule()), flush=True)
pairs = [("ddpm 2x", ddpm2x, "classifier 2x", clf2x), ("ddpm 1x", recipes.load("ddpm", "cpu"), "classifier 2x", clf2x)]
for dn, d, cn, c in pairs:
    start = time.perf_counter()
    images = guidance.classifier_guided_generate(d, c, classes, rd.CLASSIFIER_SCALE, rd.CLASSIFIER_SMOOTHING,
                                                 rd.SMOOTHING_SAMPLES, seed=0)
    r = score(images, prompts, seed=0)
    print(json.dumps({"ddpm": dn, "classifier": cn, "sample_seconds": time.perf_counter() - start,
                      **{k: r[k] for k in ("caption_accuracy", "validity", "attr_shape", "attr_color", "fid")}}), flush=True)
