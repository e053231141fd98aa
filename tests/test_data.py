"""Shapes: determinism, labels that match the pixels, captions that parse back, splits, bad input."""
import pytest
import torch

from minidalle2 import data
from minidalle2.data import (COLOR_RGB, HELD_OUT_IDS, ShapesDataset, parse_caption, render, sample_scenes,
                             scenes_from_prompts, triple_id)
from minidalle2.lab.oracle import matches


def test_same_seed_same_images_and_captions():
    a, b = sample_scenes(300, seed=7), sample_scenes(300, seed=7)
    assert torch.equal(render(a), render(b)) and a.captions == b.captions
    c = sample_scenes(300, seed=8)
    assert not torch.equal(a.objects, c.objects)


def test_item_does_not_depend_on_dataset_size_or_start():
    small, big = ShapesDataset(100, seed=3), ShapesDataset(3000, seed=3)
    assert torch.equal(small[57]["image"], big[57]["image"]) and small[57]["caption"] == big[57]["caption"]
    part = sample_scenes(10, seed=3, start=1020)   # straddles a chunk boundary
    whole = sample_scenes(1030, seed=3)
    assert torch.equal(part.objects, whole.objects[1020:]) and part.captions == whole.captions[1020:]


def _cell_slice(cell, resolution=32, margin=0):
    row, col = divmod(cell, data.GRID)
    lo = lambda i: round(i * resolution / data.GRID)
    return slice(lo(row) + margin, lo(row + 1) - margin), slice(lo(col) + margin, lo(col + 1) - margin)


def test_labels_match_pixels():
    scenes = sample_scenes(400, seed=1)
    images = (render(scenes) + 1) / 2
    for img, objs in zip(images, scenes.objects):
        occupied = {int(o[3]) for o in objs if o[0] >= 0}
        for cell in range(9):
            rows, cols = _cell_slice(cell, margin=1)  # anti-aliased edges may touch the border pixel
            patch = img[:, rows, cols]
            if cell not in occupied:
                assert patch.max() < 0.05, "an empty cell has painted pixels"
        for o in objs:
            if o[0] < 0:
                continue
            rows, cols = _cell_slice(int(o[3]))
            patch = img[:, rows, cols]
            # the object's inner pixels carry its labelled colour (edges are blended with black)
            inner = patch[:, patch.sum(0) >= 0.97 * COLOR_RGB[o[1]].sum()]
            assert inner.shape[1] > 0
            assert torch.allclose(inner.mean(1), COLOR_RGB[o[1]], atol=0.03), o


def test_big_objects_cover_more_pixels_than_small_ones():
    objects = torch.tensor([[[s, 0, z, 4], [-1, -1, -1, -1]] for s in range(5) for z in (0, 1)])
    area = ((render(objects) + 1) / 2).sum((1, 2, 3)).view(5, 2)
    assert (area[:, 1] > 1.8 * area[:, 0]).all()


def test_shapes_differ_from_each_other():
    objects = torch.tensor([[[s, 4, 1, 4], [-1, -1, -1, -1]] for s in range(5)])
    images = render(objects)
    dist = torch.cdist(images.flatten(1), images.flatten(1))
    assert (dist + torch.eye(5) * 100).min() > 2.0


def test_captions_parse_back_to_the_labels():
    scenes = sample_scenes(2000, seed=2)
    for caption, objects in zip(scenes.captions, scenes.objects):
        prompt = parse_caption(caption)
        assert matches(prompt, objects), caption
        n = int((objects[:, 0] >= 0).sum())
        assert len(prompt.objects) == n
        if n == 1:  # one-object captions state everything, position included
            assert [prompt.objects[0].shape, prompt.objects[0].color, prompt.objects[0].size,
                    prompt.objects[0].position] == objects[0].tolist()
        else:
            assert prompt.relation in data.RELATIONS


def test_several_templates_are_used():
    captions = sample_scenes(500, seed=0, num_objects=1).captions
    starts = {c.split()[0] for c in captions}
    assert len(starts) >= 3


def test_held_out_triples():
    def triples(scenes):
        o = scenes.objects[scenes.objects[..., 0] >= 0]
        return triple_id(o[:, 0], o[:, 1], o[:, 2])
    held = torch.tensor(HELD_OUT_IDS)
    assert not torch.isin(triples(sample_scenes(5000, "train")), held).any()
    assert not torch.isin(triples(sample_scenes(2000, "test")), held).any()
    hold = sample_scenes(2000, "holdout")
    first = triple_id(*hold.objects[:, 0, :3].T)
    assert torch.isin(first, held).all()
    # every shape x colour pair is still seen in training (only the size triple is held out)
    seen = triples(sample_scenes(5000, "train"))
    pairs = set((seen // 2).tolist())
    assert len(pairs) == 30


def test_resolution_and_grayscale():
    scenes = sample_scenes(16, seed=4)
    rgb, big, gray = render(scenes), render(scenes, 64), render(scenes, grayscale=True)
    assert rgb.shape == (16, 3, 32, 32) and big.shape == (16, 3, 64, 64) and gray.shape == (16, 1, 32, 32)
    assert rgb.min() >= -1 and rgb.max() <= 1
    lum = (((rgb + 1) / 2) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose((gray + 1) / 2, lum, atol=1e-5)
    # 64x64 area-downsampled is close to the 32x32 render (same scene, just sharper)
    assert (data.downsample(big, 32) - rgb).abs().mean() < 0.03


def test_dataset_and_loader():
    ds = ShapesDataset(64, seed=0)
    batch = ds.get_batch(torch.tensor([0, 5, 9]))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["objects"].shape == (3, 2, 4)
    assert torch.equal(batch["image"][1], ds[5]["image"])
    loader = data.shapes_loader(batch_size=16, size=64)
    item = next(iter(loader))
    assert item["image"].shape == (16, 3, 32, 32) and len(item["caption"]) == 16
    # uint8 storage round-trips the float render exactly to within quantisation
    assert (ds[3]["image"] - render(data.Scenes(ds.scenes.objects[3:4], ds.scenes.offsets[3:4], []))[0]).abs().max() < 1 / 127


def test_scenes_from_prompts_satisfy_the_prompts():
    prompts = ["a red circle", "a big blue square above a small green cross", "a cross at the top left",
               "a circle left of a square", "a small purple triangle at the bottom right"]
    scenes = scenes_from_prompts(prompts * 20, seed=0)
    for p, objects in zip(prompts * 20, scenes.objects):
        assert matches(parse_caption(p), objects), p


@pytest.mark.parametrize("caption, words", [
    ("", "empty"), ("   ", "empty"), ("a red circel", "circel"), ("a big red", "not followed by a shape"),
    ("a red thing", "thing"), ("a circle above a square above a cross", "more than one relation"),
    ("a circle and a square and a cross", "at most 2"), ("a circle above", "relation"),
    ("a red circle at the top middle left", "position"),
])
def test_bad_captions_are_named(caption, words):
    with pytest.raises(ValueError, match=words):
        parse_caption(caption)


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_objects=3), "at most 2"), (dict(split="validation"), "unknown split"),
    (dict(p_two=1.5), "probability"), (dict(n=-1), ">= 0"),
])
def test_impossible_dataset_requests(kwargs, words):
    args = dict(n=4) | kwargs
    with pytest.raises(ValueError, match=words):
        sample_scenes(**args)


def test_bad_resolution_and_size():
    with pytest.raises(ValueError, match="resolution"):
        render(sample_scenes(2), resolution=8)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset(0)


def test_twins_differ_in_one_thing_and_keep_the_split():
    """data.twin_scenes: a hard negative per scene, same template, one change; train twins never use a held-out
    triple; the twin batch interleaves scene and twin."""
    scenes = sample_scenes(3000, "train", seed=5, p_two=0.5)
    twins = data.twin_scenes(scenes, "train", seed=1)
    assert all(a != b for a, b in zip(scenes.captions, twins.captions))
    for s, t, caption in zip(scenes.objects.tolist(), twins.objects.tolist(), twins.captions):
        assert matches(parse_caption(caption), torch.tensor(t)), caption      # the twin's caption is true of it
        if s[1][0] < 0:      # one object: exactly one field differs
            assert sum(x != y for x, y in zip(s[0], t[0])) == 1 and t[1] == s[1]
        elif s[0][:3] != s[1][:3]:   # two objects: a swap between them (same multiset of values per field)
            assert all(sorted((s[0][i], s[1][i])) == sorted((t[0][i], t[1][i])) for i in range(4))
            assert sum((s[0][i], s[1][i]) != (t[0][i], t[1][i]) for i in range(4)) == 1
    used = torch.tensor([triple_id(*o[:3]) for o in twins.objects.reshape(-1, 4).tolist() if o[0] >= 0])
    assert not torch.isin(used, torch.tensor(HELD_OUT_IDS)).any()
    cells_swapped = (twins.objects[:, :, 3] != scenes.objects[:, :, 3]).all(1) & (scenes.objects[:, 1, 0] >= 0)
    assert 0.4 < cells_swapped.sum() / (scenes.objects[:, 1, 0] >= 0).sum() < 0.7     # half swap the relation
    ds = data.TwinShapesDataset(64, "train", seed=2)
    batch = ds.get_batch(torch.tensor([3, 7]))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["caption"][2] == ds.scenes.captions[7]
    assert batch["caption"][3] == ds.twins.captions[7] and torch.equal(batch["objects"][1], ds.twins.objects[3])
    with pytest.raises(ValueError, match="caption choices"):
        data.twin_scenes(scenes_from_prompts(["a red circle"]))
