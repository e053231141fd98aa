"""The claims report: findings of the unCLIP, GLIDE, DALL-E and VQ-VAE papers, each set beside what this course
measures at toy scale, with a verdict computed from the numbers -- never tuned to agree.

    python -m minidalle2 claims --preset cpu      # -> results/claims.md

It reads the JSON files the chapters' benchmark scripts write (results/prior_cpu.json, results/decoder_cpu.json,
results/unclip_cpu.json, ...), runs the chapter-14 sections that are missing (recipes.unclip.measure), and writes one
markdown table. A verdict compares two measured proportions with their binomial standard errors: "yes" when the
difference goes the paper's way by more than two standard errors, "no" when it goes the other way by as much, and
"unclear" otherwise, or when a number is missing (the row then says which file or section to produce).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RESULTS = Path("results")
SOURCES = {"prior": "prior_{preset}.json", "decoder": "decoder_{preset}.json", "unclip": "unclip_{preset}.json",
           "cfg": "time_to_quality_cfg_{preset}.json",
           "classifier_guidance": "time_to_quality_classifier_guidance_{preset}.json"}
Z = 2.0   # standard errors a difference must clear


class Missing(KeyError):
    """A number the claim needs is not in the results files."""


def differs(a, n_a, b, n_b):
    """+1 if proportion a is above b by more than Z standard errors, -1 if below by as much, else 0."""
    se = math.sqrt(max(a * (1 - a), 1e-12) / n_a + max(b * (1 - b), 1e-12) / n_b)
    return 1 if a - b > Z * se else -1 if b - a > Z * se else 0


def verdict(sign):
    return {1: "yes", -1: "no", 0: "unclear"}[sign]


def at_least(value, n, bar):
    """yes if a proportion clears `bar` by Z standard errors, no if it falls short by as much, else unclear."""
    se = math.sqrt(max(value * (1 - value), 1e-12) / n)
    return verdict(1 if value - bar > Z * se else -1 if bar - value > Z * se else 0)


def pct(x):
    return f"{100 * x:.1f}%"


def get(results, source, *keys):
    node = results.get(source)
    if node is None:
        raise Missing(f"no {SOURCES[source].format(preset=results['_preset'])} in {results['_dir']}")
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            raise Missing(f"{SOURCES[source].format(preset=results['_preset'])} has no {'/'.join(keys)}")
        node = node[k]
    return node


@dataclass(frozen=True)
class Claim:
    paper: str          # paper, section / figure / table
    statement: str      # what the paper found
    command: str        # what measures it here
    check: Callable     # results -> (our numbers in words, "yes" | "no" | "unclear")


# ----------------------------------------------------------------------------- the checks

def prior_matters(r):
    """On the embedding-only rows (the decoder reads no caption, so the embedding must carry the scene); the
    captioned rows beside them."""
    rows, captioned = get(r, "unclip", "compare_embedding_only"), get(r, "unclip", "compare")
    d, none, mlp = rows["prior_diffusion"], rows["prior_none"], rows["prior_mlp"]
    n = d["n"]
    sign = min(differs(d["caption_accuracy"], n, none["caption_accuracy"], n),
               differs(d["caption_accuracy"], n, mlp["caption_accuracy"], n))
    words = (f"caption accuracy, the decoder reading the embedding alone: diffusion prior {pct(d['caption_accuracy'])}, "
             f"the text embedding fed directly {pct(none['caption_accuracy'])}, the MLP regressor "
             f"{pct(mlp['caption_accuracy'])}, a real render's embedding {pct(rows['prior_real']['caption_accuracy'])} "
             f"(n = {n} prompts each); per-prompt diversity {d['diversity_per_prompt']:.2f} / "
             f"{none['diversity_per_prompt']:.2f} / {mlp['diversity_per_prompt']:.2f}. With the caption also given to "
             "the decoder: " + " / ".join(pct(captioned[k]["caption_accuracy"])
                                          for k in ("prior_diffusion", "prior_none", "prior_mlp")))
    return words, verdict(sign)


def diffusion_vs_ar(r):
    rows = get(r, "unclip", "compare")
    d, ar = rows["prior_diffusion"], rows["prior_ar"]
    n = d["n"]
    sign = differs(d["caption_accuracy"], n, ar["caption_accuracy"], n)
    words = (f"pipeline caption accuracy: diffusion prior {pct(d['caption_accuracy'])}, AR prior "
             f"{pct(ar['caption_accuracy'])}; FID {d['fid']:.2f} vs {ar['fid']:.2f}")
    # "comparably or better": only a clear loss contradicts it
    return words, "yes" if sign >= 0 else "no"


def x0_vs_eps(r):
    rows = get(r, "prior", "prediction_600_steps")
    x0, eps = rows["x0"], rows["eps"]
    n = x0["n"]
    sign = differs(x0["knn_caption_accuracy"], n, eps["knn_caption_accuracy"], n)
    words = (f"kNN caption accuracy after 600 steps: x0-prediction {pct(x0['knn_caption_accuracy'])}, eps-prediction "
             f"{pct(eps['knn_caption_accuracy'])}; FD {x0['fd']:.4f} vs {eps['fd']:.4f}")
    return words, verdict(sign)


def best_of(r):
    one, two = get(r, "prior", "best_of", "1"), get(r, "prior", "table", "prior_diffusion")
    four = get(r, "prior", "best_of", "4")
    n = one["n"]
    sign = differs(two["knn_caption_accuracy"], n, one["knn_caption_accuracy"], n)
    words = (f"kNN caption accuracy best-of-1 {pct(one['knn_caption_accuracy'])}, best-of-2 "
             f"{pct(two['knn_caption_accuracy'])}, best-of-4 {pct(four['knn_caption_accuracy'])}; diversity ratio "
             f"{one['diversity_ratio']:.2f} / {two['diversity_ratio']:.2f} / {four['diversity_ratio']:.2f}")
    return words, verdict(sign)


def prior_guidance(r):
    base, guided = get(r, "prior", "table", "prior_diffusion"), get(r, "prior", "guidance", "1.5")
    n = base["n"]
    sign = differs(guided["knn_caption_accuracy"], n, base["knn_caption_accuracy"], n)
    words = (f"kNN caption accuracy unguided {pct(base['knn_caption_accuracy'])}, guided at 1.5 "
             f"{pct(guided['knn_caption_accuracy'])}; diversity ratio {base['diversity_ratio']:.2f} -> "
             f"{guided['diversity_ratio']:.2f}")
    # the claim: guiding the prior buys nothing; it holds unless guidance clearly helps
    return words, "yes" if sign <= 0 else "no"


def decoder_guidance(r):
    sweep = get(r, "decoder", "sweep")
    div = [row["diversity_per_embedding"] for row in sweep]
    acc = [row["caption_accuracy_one"] for row in sweep]
    falling = all(b < a for a, b in zip(div, div[1:]))
    words = ("CFG scale " + ", ".join(f"{row['scale']:g}" for row in sweep) + ": one-object caption accuracy "
             + ", ".join(pct(a) for a in acc) + "; per-embedding diversity " + ", ".join(f"{d:.2f}" for d in div))
    return words, "yes" if falling and max(acc) > acc[0] else "no" if not falling else "unclear"


def upsampler_augmentation(r):
    ups = get(r, "decoder", "upsampler")
    aug = ups["upsampler noise_level=0.1"]["on_decoder_outputs"]
    plain = ups["upsampler_no_aug noise_level=0.0"]["on_decoder_outputs"]
    n = 1000
    sign = differs(aug["caption_accuracy_64"], n, plain["caption_accuracy_64"], n)
    words = (f"on the decoder's 32-px outputs: caption accuracy at 64 px with augmentation {pct(aug['caption_accuracy_64'])}, "
             f"without {pct(plain['caption_accuracy_64'])}; FID {aug['fid_64']:.2f} vs {plain['fid_64']:.2f}")
    return words, verdict(sign)


def binding(r):
    t = get(r, "unclip", "table")
    n = t["n"] // 2
    sign = differs(t["caption_accuracy_one"], n, t["caption_accuracy_two"], n)
    words = (f"caption accuracy one-object {pct(t['caption_accuracy_one'])}, two-object {pct(t['caption_accuracy_two'])}; "
             f"binding errors (right attributes, wrong objects) {pct(t['binding_errors_two'])} of two-object images, "
             f"relation right {pct(t['attr_relation_two'])}")
    return words, verdict(sign)


def text_pathway(r):
    with_text, embed_only = get(r, "decoder", "with_captions"), get(r, "decoder", "table", "decoder")
    no_text = get(r, "decoder", "no_text")
    n = with_text["n"] // 2
    sign = differs(with_text["caption_accuracy_one"], n, no_text["caption_accuracy_one"], n)
    words = (f"decoding real embeddings, one-object caption accuracy: given the caption {pct(with_text['caption_accuracy_one'])}, "
             f"no caption {pct(embed_only['caption_accuracy_one'])}, trained without a text pathway "
             f"{pct(no_text['caption_accuracy_one'])}; two-object {pct(with_text['caption_accuracy_two'])} / "
             f"{pct(embed_only['caption_accuracy_two'])} / {pct(no_text['caption_accuracy_two'])}")
    # the paper's claim is "little help": a clear gain contradicts it
    return words, "no" if sign > 0 else "yes" if sign == 0 else "unclear"


def variations(r):
    v = get(r, "unclip", "variations")
    fresh = v["fresh"]
    n = v["images"] * v["copies"]
    split = (f" (one-object sources {pct(fresh['kept_shape_and_color_of_all_one'])}, two-object "
             f"{pct(fresh['kept_shape_and_color_of_all_two'])})" if "kept_shape_and_color_of_all_one" in fresh else "")
    words = (f"fresh-noise variations keep shape and colour in {pct(fresh['kept_shape_and_color_of_all'])} of all{split}"
             f" ({pct(fresh['kept_shape_and_color'])} of valid ones; validity {pct(fresh['validity'])}); position kept "
             f"{pct(fresh['kept_position'])}, size {pct(fresh['kept_size'])}; diversity between copies "
             f"{fresh['diversity_per_image']:.2f}")
    holds = at_least(fresh["kept_shape_and_color_of_all"], n, 0.9)
    return words, holds if fresh["diversity_per_image"] > 0 else "no"


def inversion(r):
    i = get(r, "unclip", "inversion")
    words = (f"PSNR of decoding from the DDIM-inverted noise {i['psnr_inverted']:.1f} dB, from random noise "
             f"{i['psnr_random_noise']:.1f} dB ({i['images']} test images, 32 px)")
    return words, "yes" if i["psnr_inverted"] > i["psnr_random_noise"] + 3 else "no"


def interpolation(r):
    i = get(r, "unclip", "interpolation")
    n = i["paths"] * (i["frames"] - 2)
    flips = ", ".join(f"{a} at {i[f'flip_{a}']:.2f}" for a in ("shape", "color", "size", "position")
                      if i.get(f"flip_{a}") is not None)
    words = (f"{pct(i['valid_interior'])} of the interior frames are valid scenes ({i['paths']} paths x "
             f"{i['frames']} frames); attributes flip (fraction of the path) {flips}")
    return words, at_least(i["valid_interior"], n, 0.8)


def text_diffs(r):
    rows = get(r, "unclip", "text_diff", "rows")
    n = get(r, "unclip", "text_diff", "edits")
    first, last = rows[0], rows[-1]
    words = ("success by theta " + ", ".join(f"{row['theta']:g}: {pct(row['success'])}" for row in rows)
             + f"; other attributes kept at theta {last['theta']:g}: {pct(last['others_kept'])}; clean edits "
             + pct(max(row["clean_edit"] for row in rows)) + " at best")
    return words, verdict(differs(last["success"], n, first["success"], n))


def cfg_vs_classifier(r):
    cfg, cg = get(r, "cfg", "rows"), get(r, "classifier_guidance", "rows")
    minutes = min(cfg[-1]["minutes"], cg[-1]["minutes"])
    a = max((row for row in cfg if row["minutes"] <= minutes), key=lambda row: row["minutes"])
    b = max((row for row in cg if row["minutes"] <= minutes), key=lambda row: row["minutes"])
    sign = differs(a["caption_accuracy"], get(r, "cfg", "images"), b["caption_accuracy"],
                   get(r, "classifier_guidance", "images"))
    words = (f"after ~{minutes:.0f} training minutes: classifier-free guidance {pct(a['caption_accuracy'])} caption "
             f"accuracy (FID {a['fid']:.1f}), classifier guidance {pct(b['caption_accuracy'])} (FID {b['fid']:.1f})")
    return words, verdict(sign)


def reranking(r):
    base = get(r, "unclip", "guidance", "2.0")
    rows = {1: base, **{int(k): v for k, v in get(r, "unclip", "rerank").items()}}
    n = base["n"]
    best = max(rows)
    words = ("pipeline caption accuracy (32 px) by candidates per image: " + ", ".join(
        f"{k}: {pct(rows[k]['caption_accuracy'])} (two-object {pct(rows[k]['caption_accuracy_two'])})" for k in sorted(rows)))
    return words + "; the flattening past ~32 is beyond this budget", verdict(
        differs(rows[best]["caption_accuracy"], n, base["caption_accuracy"], n))


def not_built(chapter, issue):
    def check(r):
        raise Missing(f"chapter {chapter} is not built yet (issue #{issue}): nothing measures this")
    return check


U = "PYTHONPATH=. python results/unclip_cpu.py results/unclip_cpu.json"
CLAIMS = [
    Claim("unCLIP (Ramesh et al. 2022), Sec. 5.1", "The prior matters: decoding a prior's image embedding "
          "beats feeding the decoder the caption's text embedding directly, or a deterministic regressor's.",
          f"{U} compare compare_embedding_only", prior_matters),
    Claim("unCLIP, Sec. 5.2 (human evaluations, Table 1)", "The diffusion prior performs comparably to or better than the autoregressive "
          "prior (and costs less compute).", f"{U} compare", diffusion_vs_ar),
    Claim("unCLIP, Sec. 2.2", "For the diffusion prior it is better to predict the clean embedding z_0 directly than "
          "the noise.", "PYTHONPATH=. python results/prior_cpu.py results/prior_cpu.json prediction", x0_vs_eps),
    Claim("unCLIP, Sec. 2.2", "Best-of-2: drawing two embeddings and keeping the one closer to the text embedding "
          "improves quality.", "PYTHONPATH=. python results/prior_cpu.py results/prior_cpu.json table sweep", best_of),
    Claim("unCLIP, Sec. 2.2 and 5 (the design notes' reading)", "Guiding the prior buys little: the samples come from "
          "the decoder's guidance.", "PYTHONPATH=. python results/prior_cpu.py results/prior_cpu.json sweep",
          prior_guidance),
    Claim("Ho & Salimans 2022; unCLIP, Sec. 5.3", "Guidance trades diversity for "
          "fidelity: accuracy rises at moderate scales while diversity falls with every step up.",
          "PYTHONPATH=. python results/decoder_cpu.py results/decoder_cpu.json sweep", decoder_guidance),
    Claim("unCLIP, Sec. 2.1 (after Ho et al. 2021, cascaded diffusion)", "Corrupting the upsampler's low-resolution "
          "input in training (blur, noise) makes it robust to the decoder's imperfect outputs.",
          "PYTHONPATH=. python results/decoder_cpu.py results/decoder_cpu.json upsampler", upsampler_augmentation),
    Claim("unCLIP, Sec. 7", "unCLIP struggles to bind attributes to objects: two-object scenes fail far "
          "more often than one-object ones.", f"{U} table", binding),
    Claim("unCLIP, Sec. 2.1 and 7", "The decoder's text pathway (GLIDE's) offers little help: the CLIP image "
          "embedding carries the picture.", "PYTHONPATH=. python results/decoder_cpu.py results/decoder_cpu.json "
          "table ablation", text_pathway),
    Claim("unCLIP, Sec. 3.1", "Variations keep the image's semantics (what objects, which colours) while the "
          "details the embedding leaves open change.", f"{U} variations", variations),
    Claim("unCLIP, Sec. 3.1", "With DDIM (eta = 0) the decoder inverts: the image's own noise x_T reconstructs it "
          "(the bipartite latent (z_i, x_T)).", f"{U} inversion", inversion),
    Claim("unCLIP, Sec. 3.2", "Interpolating CLIP image embeddings (slerp), with the noise held fixed, "
          "moves smoothly between two images: the frames stay on the image manifold.", f"{U} interpolation",
          interpolation),
    Claim("unCLIP, Sec. 3.3", "Text diffs: moving an image's embedding towards the difference of two "
          "captions' text embeddings makes the edit the captions describe.", f"{U} text_diff", text_diffs),
    Claim("GLIDE (Nichol et al. 2022), abstract and Sec. 5", "Classifier-free guidance is preferred over "
          "guidance by a separately trained (CLIP) classifier; here: over chapter 10's noisy classifier.", "python -m minidalle2 curve cfg / curve classifier_guidance "
          "(results/time_to_quality_*_cpu.json)", cfg_vs_classifier),
    Claim("VQ-VAE (van den Oord et al. 2017), Sec. 4", "A discrete latent code with a learned autoregressive prior "
          "generates coherent images.", "notebook 05 (not built)", not_built("05", 22)),
    Claim("DALL-E (Ramesh et al. 2021), Sec. 2.5", "Reranking candidates with CLIP improves the "
          "samples (gains flatten past ~32 candidates). Tested here on the unCLIP pipeline (generate(rerank=k)); "
          "DALL-E itself is chapter 08, not built yet (#24).", f"{U} rerank", reranking),
]


def load_results(preset, results_dir=RESULTS):
    """{source: the parsed JSON file} for the files that exist, plus _preset and _dir."""
    results_dir = Path(results_dir)
    out = {"_preset": preset, "_dir": str(results_dir)}
    for source, name in SOURCES.items():
        path = results_dir / name.format(preset=preset)
        if path.exists():
            try:
                out[source] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e.msg}); rerun the command that writes it") from None
    return out


def missing_sections(results):
    """The chapter-14 sections the claims read that the unclip results lack."""
    have = results.get("unclip", {})
    return [s for s in ("table", "compare", "compare_embedding_only", "guidance", "rerank", "variations", "inversion", "interpolation",
                        "text_diff") if s not in have]


def evaluate(results):
    """[(claim, our numbers in words, verdict)] for every claim."""
    rows = []
    for claim in CLAIMS:
        try:
            words, result = claim.check(results)
        except Missing as e:
            words, result = f"not measured: {e.args[0]}", "unclear"
        rows.append((claim, words, result))
    return rows


def report(rows, preset):
    """The markdown table."""
    counts = {v: sum(r[2] == v for r in rows) for v in ("yes", "no", "unclear")}
    lines = [f"# The papers' claims at toy scale ({preset} preset)", "",
             "Generated by `python -m minidalle2 claims --preset " + preset + "` from the results files; a verdict "
             f"compares measured proportions with their binomial standard errors (a difference must clear {Z:g} of "
             "them), never tuned to agree. \"Holds here\" asks whether the paper's direction holds at toy scale.", "",
             f"{len(rows)} claims: {counts['yes']} hold, {counts['no']} do not, {counts['unclear']} unclear.", "",
             "| # | paper | claim | command | measured here | holds here |", "|---|---|---|---|---|---|"]
    for i, (claim, words, result) in enumerate(rows, 1):
        cells = [str(i), claim.paper, claim.statement, f"`{claim.command}`", words, f"**{result}**"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def claims(preset="cpu", results_dir=RESULTS, out=None, run_missing=True):
    """Write the report (default results_dir/claims.md; another preset: claims_<preset>.md), running the chapter-14
    sections that are missing first when run_missing; returns its path."""
    from ..lab.checkpoint import atomic_write_bytes
    results_dir = Path(results_dir)
    if not results_dir.is_dir():   # a typo must not yield a report of nothing
        raise FileNotFoundError(f"no results folder at {results_dir} (the folder the benchmark scripts write to)")
    results = load_results(preset, results_dir)
    todo = missing_sections(results)
    if todo and run_missing:
        from .unclip import measure
        print(f"claims: measuring the missing chapter-14 sections {todo} at {preset}")
        measure(preset, results_dir / SOURCES["unclip"].format(preset=preset), todo)
        results = load_results(preset, results_dir)
    out = Path(out) if out else results_dir / ("claims.md" if preset == "cpu" else f"claims_{preset}.md")
    atomic_write_bytes(out, report(evaluate(results), preset).encode())
    return out
