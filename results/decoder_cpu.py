"""Chapter 13's numbers at the cpu preset: the decoder decoding real CLIP image embeddings (with and without the
caption), its guidance sweep, the ablation without the text pathway, and the upsampler with and without conditioning
augmentation on decoder outputs and on real 32-px inputs. Trains what is not cached (each <= 10 minutes).
Usage: PYTHONPATH=. python results/decoder_cpu.py results/decoder_cpu.json [section ...]
sections: sweep, table (the scoreboard rows, appended to results/scoreboard.jsonl), ablation, upsampler"""
import json
import sys
import time

from minidalle2 import data, recipes
from minidalle2.lab import zoo
from minidalle2.lab.checkpoint import atomic_write_json
from minidalle2.recipes.decoder import GUIDANCE, decoder_report, encode, guidance_sweep, upsampling_report
from minidalle2.recipes.prior import test_prompts

PRESET = "cpu"
out_path, sections = sys.argv[1], sys.argv[2:] or ["sweep", "table", "ablation", "upsampler"]
try:
    results = json.load(open(out_path))
except (FileNotFoundError, ValueError):
    results = {}
results.setdefault("commands", {})


def load(name):
    recipe = recipes.get(name)
    return recipe, zoo.load_or_train(recipe, PRESET, progress=False), zoo.cached_meta(recipe, PRESET).get("seconds")


def show(name, row):
    print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)


for section in sections:
    results["commands"][section] = f"PYTHONPATH=. python results/decoder_cpu.py results/decoder_cpu.json {section}"
    if section == "sweep":     # CFG scale 1-5 (guide "both"), 50 embeddings of each kind x 5 seeds, no caption
        recipe, model, _ = load("decoder")
        results["sweep"] = guidance_sweep(model, zoo.Needs(recipe, PRESET), PRESET)
        for row in results["sweep"]:
            show("sweep", row)
    if section == "table":     # `python -m minidalle2 evaluate decoder --preset cpu`: the benchmark row + report
        for name in ("decoder", "upsampler", "upsampler_no_aug"):
            load(name)
            results.setdefault("table", {})[name] = row = recipes.benchmark(name, PRESET, path="results/scoreboard.jsonl")
            show(name, row)
    if section == "ablation":  # the decoder given each scene's caption too, and the decoder without a text pathway
        recipe, model, seconds = load("decoder")
        needs = zoo.Needs(recipe, PRESET)
        results["with_captions"] = decoder_report(model, needs, PRESET, captions=True)
        show("decoder + captions", results["with_captions"])
        recipe, model, seconds = load("decoder_no_text")
        results["no_text"] = {**decoder_report(model, zoo.Needs(recipe, PRESET), PRESET), "train_seconds": seconds}
        show("decoder_no_text", results["no_text"])
    if section == "upsampler":  # both upsamplers on the same decoder outputs and on real 32-px inputs
        recipe, model, _ = load("decoder")
        clip = zoo.Needs(recipe, PRESET)["clip"]
        captions, scenes = test_prompts(500, 3000)           # decoder_report's scenes
        start = time.perf_counter()
        decoded = model.decode(clip, encode(clip, data.render(scenes)), guidance=GUIDANCE, seed=3000)
        results["decode_seconds_1000"] = time.perf_counter() - start
        real = recipes.decoder.real_low_high(1000, 4000)
        results["upsampler"] = {}
        for name in ("upsampler", "upsampler_no_aug"):
            _, up, seconds = load(name)
            levels = (0.0, 0.1, 0.2) if up.augment else (0.0,)
            for level in levels:
                key = f"{name} noise_level={level}"
                results["upsampler"][key] = row = {
                    "train_seconds": seconds,
                    "on_decoder_outputs": upsampling_report(up, decoded, captions, noise_level=level),
                    "on_real_32px": upsampling_report(up, real[0], real[2].captions, real[1], noise_level=level)}
                show(key, row)
    atomic_write_json(out_path, results)
