"""The decoder at half its cpu budget (1,300 steps), beside the recipe's 2,600, on the same 600 test embeddings."""
import json
import torch
from minidalle2 import recipes, data
from minidalle2.lab import zoo
from minidalle2.lab.checkpoint import atomic_write_json
from minidalle2.lab.scoreboard import score
from minidalle2.recipes.prior import test_prompts
from minidalle2.recipes.decoder import encode, DECODER, GUIDANCE
half = DECODER.variant("decoder_1300_steps", training={"cpu": dict(steps=1300)})
v = zoo.load_or_train(half, "cpu", progress=False)
clip = recipes.load("clip", "cpu")
caps, scenes = test_prompts(300, 5000)
z = encode(clip, data.render(scenes))
out = {}
for name, m, sec in (("decoder_1300_steps", v, zoo.cached_meta(half, "cpu")["seconds"]),
                     ("decoder", recipes.load("decoder", "cpu"), zoo.cached_meta(DECODER, "cpu")["seconds"])):
    for captions in (None, caps):
        im = m.decode(clip, z, captions, guidance=GUIDANCE, seed=0)
        r1, r2 = score(im[:300], caps[:300]), score(im[300:], caps[300:])
        key = f"{name} {'with captions' if captions else 'embedding only'}"
        out[key] = {"train_seconds": sec, "caption_accuracy_one": r1["caption_accuracy"], "validity_one": r1["validity"],
                    "caption_accuracy_two": r2["caption_accuracy"], "validity_two": r2["validity"],
                    "attr_shape_two": r2["attr_shape"], "attr_relation_two": r2["attr_relation"]}
        print(key, out[key], flush=True)
path = "results/decoder_cpu.json"
results = json.load(open(path))
results["training_slope"] = {"command": "PYTHONPATH=. python results/decoder_slope_cpu.py", "prompts_per_kind": 300, **out}
atomic_write_json(path, results)
