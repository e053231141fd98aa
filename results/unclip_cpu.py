"""Chapter 14's numbers at the cpu preset: the whole pipeline (chapter-07 CLIP, chapter-12 diffusion prior, chapter-13
decoder and upsampler; each trained within its own 10 minutes, or loaded from the cache) on held-out test prompts,
the priors compared, the decoder's guidance in the pipeline, and the manipulations (recipes.unclip.measure).
Usage: PYTHONPATH=. python results/unclip_cpu.py results/unclip_cpu.json [section ...]
sections: table (also the scoreboard row, appended to results/scoreboard.jsonl), compare, guidance, variations,
inversion, interpolation, text_diff, speed (time it alone, on an idle machine)"""
import json
import sys

import torch

from minidalle2.recipes.unclip import SECTIONS, measure

torch.set_num_threads(2)
out_path, sections = sys.argv[1], sys.argv[2:] or list(SECTIONS)
results = measure("cpu", out_path, sections, scoreboard="results/scoreboard.jsonl")
for section in sections:
    print(section, json.dumps(results[section])[:1500])
