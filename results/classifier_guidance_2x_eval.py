"""Stop 14 ad-hoc: smoothed classifier guidance (s = 8) on the benchmark's 1,000 prompts with the 2x classifier, guiding the
2x ddpm and the zoo's 1x ddpm (models from classifier_guidance_2x_train.py, saved under /tmp/s14/)."""
import json, sys, time
from minidalle2 import ddpm, guidance, zoo
from minidalle2.checkpoint import load_model
from minidalle2.scoreboard import score

prompts = zoo.get_recipe("classifier_guidance").prompts(1000, 100)
classes = guidance.classes_from_prompts(prompts)
ddpm2x = load_model("/tmp/s14/ddpm2x", lambda **c: ddpm.DiffusionModel(**c), "diffusion").eval()
from minidalle2.unet import NoisyClassifier
clf2x = load_model("/tmp/s14/classifier2x", lambda **c: NoisyClassifier(**c), "noisy_classifier").eval()
print("classifier 2x accuracy by t quartile:", guidance.accuracy_by_timestep(clf2x, guidance.classifier_schedule()), flush=True)
pairs = [("ddpm 2x", ddpm2x, "classifier 2x", clf2x), ("ddpm 1x", zoo.load_or_train("ddpm", "cpu"), "classifier 2x", clf2x)]
for dn, d, cn, c in pairs:
    start = time.perf_counter()
    images = guidance.classifier_guided_generate(d, c, classes, guidance.CLASSIFIER_SCALE, guidance.CLASSIFIER_SMOOTHING,
                                                 guidance.SMOOTHING_SAMPLES, seed=0)
    r = score(images, prompts, seed=0)
    print(json.dumps({"ddpm": dn, "classifier": cn, "sample_seconds": time.perf_counter() - start,
                      **{k: r[k] for k in ("caption_accuracy", "validity", "attr_shape", "attr_color", "fid")}}), flush=True)
