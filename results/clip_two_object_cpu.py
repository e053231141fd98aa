"""Issue #18's first question: can the chapter-07 CLIP read two-object scenes? The cpu recipe's model, scored by
clip.two_object_report on 1,000 two-object test scenes (and the chapter's own one-object numbers beside them).
Usage: PYTHONPATH=. python results/clip_two_object_cpu.py results/clip_two_object_cpu.json"""
import sys

from minidalle2 import clip, recipes
from minidalle2.lab.checkpoint import atomic_write_json
from minidalle2.lab.zoo import cached_meta

model = recipes.load("clip", "cpu")
report = {**clip.evaluate(model), **clip.two_object_report(model, n=1000)}
report["train_seconds"] = cached_meta(recipes.get("clip"), "cpu").get("seconds")
for k, v in sorted(report.items()):
    print(f"{k:45} {v:.4g}")
atomic_write_json(sys.argv[1], {"command": "PYTHONPATH=. python results/clip_two_object_cpu.py results/clip_two_object_cpu.json",
                                "report": report})
