"""Oracle metrics on inputs whose answers are known, and the scoreboard file."""
import json
import subprocess
import sys

import pytest
import torch

from minidalle2 import data
from minidalle2.lab.scoreboard import add_row, format_other_numbers, format_table, load_rows, reference_images, score


@pytest.fixture(scope="module")
def real():
    captions = data.sample_scenes(400, "test", seed=31).captions
    return data.render(data.scenes_from_prompts(captions, seed=5)), captions


def test_real_images_score_the_ceiling(real):
    images, captions = real
    report = score(images, captions)
    assert report["caption_accuracy"] >= 0.98 and report["validity"] >= 0.98
    for attribute in ("shape", "color", "size", "position", "relation", "count"):
        assert report[f"attr_{attribute}"] >= 0.98, (attribute, report)
    assert report["coverage"] == 1.0
    # FID of real renders against the reference is as small as two real sets score against each other
    assert report["fid"] < 2.5 * report["fid_floor"] + 1e-3


def test_shuffled_captions_score_near_chance(real):
    images, captions = real
    shuffled = [captions[i] for i in torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))]
    report = score(images, shuffled)
    assert report["caption_accuracy"] < 0.05
    assert report["validity"] >= 0.98   # the images are still fine: only the captions are wrong


def test_degraded_images_are_far_from_real(real):
    images, captions = real
    blurred = torch.nn.functional.avg_pool2d(images, 5, 1, 2)
    report = score(blurred, captions)
    clean = score(images, captions)
    assert report["fid"] > 10 * clean["fid_floor"] and report["validity"] < clean["validity"]
    assert report["kid"] > clean["kid_floor"]


def test_unconditional_score_and_diversity():
    images = reference_images(200, seed=3)
    report = score(images)
    assert "caption_accuracy" not in report and report["validity"] > 0.97
    # 200 copies of one image: no diversity, one shape x colour pair
    same = score(images[:1].repeat(200, 1, 1, 1))
    assert same["diversity"] < 1e-3 < report["diversity"] and same["coverage"] == 1 / 30


def test_prompt_count_must_match(real):
    images, captions = real
    with pytest.raises(ValueError, match="one prompt per image"):
        score(images[:10], captions[:9])
    with pytest.raises(ValueError, match="unknown word"):
        score(images[:2], ["a red circle", "a red blob"])


def test_rows_round_trip(tmp_path):
    path = tmp_path / "board.jsonl"
    add_row("real", "smoke", {"n": 10, "caption_accuracy": 1.0, "validity": 0.99}, train_seconds=0.0,
            sample_seconds=0.01, path=path)
    add_row("gan", "cpu", {"n": 10, "validity": 0.5}, train_seconds=12.5, path=path)
    rows = load_rows(path)
    assert [r["model"] for r in rows] == ["real", "gan"]
    assert rows[0]["caption_accuracy"] == 1.0 and "caption_accuracy" not in rows[1]
    table = format_table(rows)
    assert "| real | smoke | 10 | 1 | 0.99 |" in table and "| gan | cpu | 10 | - | 0.5 |" in table
    # numbers with no column (a CLIP's retrieval, a VAE's ELBO) are listed under the table, text is not
    extra = format_other_numbers({"model": "clip", "n": 256, "r1_text_to_image": 0.77, "active_units": 32,
                                  "machine": "x", "sample_seconds": None})
    assert extra.splitlines() == ["active_units: 32", "r1_text_to_image: 0.77"]
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match="line 3"):
        load_rows(path)


def test_cli_lists_commands_and_benchmarks_real(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "minidalle2", *a], capture_output=True, text=True,
                                    env={**__import__("os").environ, "MINIDALLE2_CACHE": str(tmp_path / "cache")})
    out = run("--help")
    assert out.returncode == 0
    for command in ("train", "sample", "evaluate", "scoreboard", "course"):
        assert command in out.stdout
    board = tmp_path / "board.jsonl"
    out = run("evaluate", "real", "--n", "200", "--preset", "smoke", "--scoreboard", str(board),
              "--json", str(tmp_path / "row.json"))
    assert out.returncode == 0, out.stderr
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["model"] == "real" and row["caption_accuracy"] >= 0.98
    assert "real" in run("scoreboard", "--path", str(board)).stdout
    out = run("sample", "real", "--prompt", "a red circle", "--prompt", "a blue square above a green cross",
              "--n", "4", "--out", str(tmp_path / "s.png"))
    assert out.returncode == 0 and (tmp_path / "s.png").stat().st_size > 0, out.stderr
    bad = run("sample", "real", "--prompt", "a red blob", "--n", "2", "--out", str(tmp_path / "t.png"))
    assert bad.returncode == 2 and "unknown word 'blob'" in bad.stderr
    bad = run("train", "oracle", "--preset", "huge")
    assert bad.returncode != 0 and "huge" in bad.stderr
    bad = run("train", "no_such_model", "--preset", "smoke")
    assert bad.returncode == 2 and "unknown recipe 'no_such_model'" in bad.stderr


def test_reconstruction_scores(real):
    from minidalle2.lab.scoreboard import score_reconstructions
    images, captions = real
    perfect = score_reconstructions(images, images, captions)
    assert perfect["recon_caption_accuracy"] >= 0.98 and perfect["psnr"] > 100
    blurred = torch.nn.functional.avg_pool2d(images, 4).repeat_interleave(4, -1).repeat_interleave(4, -2)
    worse = score_reconstructions(blurred, images, captions)
    assert worse["psnr"] < 25 and worse["recon_caption_accuracy"] < perfect["recon_caption_accuracy"]
    with pytest.raises(ValueError, match="captions"):
        score_reconstructions(images, images, captions[:3])


def test_benchmark_row_of_a_recipe_that_only_reports(tmp_path, monkeypatch):
    """A denoiser is not a generator: its row holds its report and its train time, no sample scores."""
    import dataclasses
    from minidalle2.lab import zoo
    from minidalle2.recipes import evaluate
    recipe = zoo.Recipe("denoiser_demo", "demo", build=None, fit=lambda model, job: None,
                        training={p: dict(steps=1, batch_size=1, lr=1.0) for p in ("smoke", "cpu", "full")},
                        report=lambda model: {"psnr_gain": 12.5})
    monkeypatch.setattr(evaluate, "get", lambda name: recipe)
    monkeypatch.setattr(zoo, "load_or_train", lambda recipe, preset: torch.nn.Identity())
    row = evaluate.benchmark("denoiser_demo", "smoke", n=10, path=tmp_path / "b.jsonl")
    assert row["psnr_gain"] == 12.5 and row["model"] == "denoiser_demo" and "validity" not in row
    recipe = dataclasses.replace(recipe, report=None)
    with pytest.raises(ValueError, match="neither generates"):
        evaluate.benchmark("denoiser_demo", "smoke", n=10, path=tmp_path / "b.jsonl")
