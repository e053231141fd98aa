"""The shipped oracle: accuracy on fresh real renders, junk detection, clear errors for bad input."""
import json

import pytest
import torch

from minidalle2 import data
from minidalle2.data import ObjectSpec, Prompt
from minidalle2.lab.oracle import (WEIGHTS, Oracle, cell_targets, check_readable, load_oracle, matches, oracle_accuracy,
                               oracle_loss, read, render_training_batch)


@pytest.fixture(scope="module")
def oracle():
    return load_oracle()


def test_shipped_oracle_reads_fresh_real_images(oracle):
    # new scenes (a seed never used in training or in the shipped report), both resolutions
    report = oracle_accuracy(oracle, n=1000, seed=2026)
    for resolution in ("32", "64"):
        for attribute in ("shape", "color", "size", "position", "count"):
            assert report[resolution][attribute] >= 0.995, (resolution, attribute, report)
        assert report[resolution]["valid"] >= 0.98, report


def test_shipped_record_sits_beside_the_weights():
    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert meta["kind"] == "oracle" and meta["recipe"] == "oracle"
    assert "python -m minidalle2 train oracle" in meta["command"]
    assert meta["train_seconds"] > 0 and meta["report"]["32"]["shape"] >= 0.995


def test_junk_is_read_as_invalid(oracle):
    scenes = data.sample_scenes(600, "test", seed=9)
    torch.manual_seed(0)
    images, targets = render_training_batch(scenes.objects, scenes.offsets, 32, junk_prob=1.0, noise_std=0.0)
    reading = read(oracle, images)
    assert reading.valid.float().mean() < 0.1
    clean = read(oracle, data.render(scenes))
    assert clean.valid.float().mean() > 0.98


def test_noise_and_blank_images_are_invalid(oracle):
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(64, 3, 32, 32, generator=g) * 2 - 1)
    blank = -torch.ones(64, 3, 32, 32)
    assert read(oracle, noise).valid.float().mean() < 0.1
    assert not read(oracle, blank).valid.any()  # no object at all is not a Shapes scene


def test_cell_targets_by_hand():
    objects = torch.tensor([[[2, 3, 1, 4], [0, 1, 0, 8]]])
    t = cell_targets(objects, junk=torch.tensor([[False, True]]))
    assert t[0, 4].tolist() == [1, 2, 3, 1]
    assert t[0, 8].tolist() == [2, -1, -1, -1]      # junk: occupancy only
    assert t[0, 0].tolist() == [0, -1, -1, -1]      # empty


def test_matches_checks_attributes_and_relation():
    objects = torch.tensor([[0, 0, 1, 1], [1, 4, 0, 7]])   # big red circle top; small blue square bottom
    assert matches(Prompt([ObjectSpec(0, 0, 1), ObjectSpec(1, 4, 0)], "above"), objects)
    assert matches(Prompt([ObjectSpec(1, 4), ObjectSpec(0)], "below"), objects)
    assert not matches(Prompt([ObjectSpec(0, 0), ObjectSpec(1, 4)], "below"), objects)
    assert not matches(Prompt([ObjectSpec(0, 1), ObjectSpec(1, 4)], None), objects)   # wrong colour
    assert not matches(Prompt([ObjectSpec(0)], None), objects)                         # wrong count


def test_loss_decreases_on_one_batch():
    torch.manual_seed(0)
    model = Oracle(widths=(8, 16, 16), cell_features=16)
    batch = data.sample_scenes(32, "train", seed=0)
    batch = {"objects": batch.objects, "offsets": batch.offsets}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(60):
        torch.manual_seed(step % 2)   # the same two renders (junk and noise are random) again and again
        loss, parts = oracle_loss(model, batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first and set(parts) == {"occupancy", "shape", "color", "size"}


@pytest.mark.parametrize("images, error, words", [
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "float"),
    (torch.zeros(2, 1, 32, 32), ValueError, "3 channels"),
    (torch.zeros(3, 32, 32), ValueError, r"\(N, C, H, W\)"),
    (torch.zeros(2, 3, 32, 16), ValueError, "square"),
    (torch.full((2, 3, 32, 32), 255.0), ValueError, r"\[-1, 1\]"),
    (torch.full((2, 3, 32, 32), float("nan")), ValueError, "NaN"),
    (torch.zeros(0, 3, 32, 32), ValueError, "empty"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images_get_clear_errors(images, error, words):
    with pytest.raises(error, match=words):
        check_readable(images)


def test_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train oracle"):
        load_oracle.__wrapped__(tmp_path / "nothing")
