import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from minidalle2 import recipes
from minidalle2.lab import presets, zoo
from minidalle2.lab.train import train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import MLP, make_dataset, mse  # noqa: E402

TOY_TRAINING = {"smoke": dict(steps=20, batch_size=16, lr=1e-2, log_every=5, device="cpu"),
                "cpu": dict(steps=50, batch_size=16, lr=1e-2, log_every=5, device="cpu"),
                "full": dict(steps=100, batch_size=32, lr=1e-2, log_every=10, device="cpu")}


def toy_recipe(fits, name="toy", **changes):
    """A tiny regressor recipe that records each preset it is trained at."""
    def build():
        torch.manual_seed(0)
        return MLP(width=8)

    def fit(model, job):
        fits.append(job.preset)
        return train(model, mse, make_dataset(), job.train_config(), run_dir=job.run_dir, kind="toy")
    return zoo.Recipe(name, kind="toy", build=build, fit=fit, training=TOY_TRAINING, description="a tiny regressor",
                      **changes)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """(the toy recipe, the presets it was trained at); the cache lives in tmp_path."""
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    fits = []
    return toy_recipe(fits), fits


def test_trains_once_then_loads(toy, tmp_path, capsys):
    recipe, fits = toy
    first = zoo.load_or_train(recipe, "smoke", progress=False)
    assert fits == ["smoke"] and "training 'toy'" in capsys.readouterr().out
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    assert (tmp_path / "cache" / "toy" / "smoke" / "model.safetensors").exists()
    assert not (tmp_path / "cache" / "toy" / "smoke" / "run").exists()  # training state cleaned up

    second = zoo.load_or_train(recipe, "smoke")
    assert fits == ["smoke"] and "loaded 'toy'" in capsys.readouterr().out
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)

    zoo.load_or_train(recipe, "cpu", progress=False)  # each preset has its own cache entry
    zoo.load_or_train(recipe, "smoke", retrain=True, progress=False)
    assert fits == ["smoke", "cpu", "smoke"]


def test_training_curves_are_kept_with_the_model(toy):
    recipe, _ = toy
    with pytest.raises(zoo.ZooError, match="no cached 'toy'"):
        zoo.training_history(recipe, "smoke")
    zoo.load_or_train(recipe, "smoke", progress=False)
    history = zoo.training_history(recipe, "smoke")
    assert [h["step"] for h in history] == list(range(1, recipe.train_config("smoke").steps + 1))
    assert all("loss" in h and "lr" in h for h in history)
    thinned = zoo._thin([{"step": i} for i in range(1, 1202)], points=500)
    assert len(thinned) <= 502 and thinned[0]["step"] == 1 and thinned[-1]["step"] == 1201


def test_default_preset_comes_from_env(toy, monkeypatch):
    recipe, fits = toy
    monkeypatch.setenv(presets.PRESET_ENV, "smoke")
    zoo.load_or_train(recipe, progress=False)
    assert fits == ["smoke"]
    monkeypatch.setenv(presets.PRESET_ENV, "huge")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        zoo.load_or_train(recipe)


def test_fingerprint_change_retrains(toy, capsys):
    recipe, fits = toy
    zoo.load_or_train(recipe, "smoke", progress=False)
    longer = dataclasses.replace(recipe, training={**TOY_TRAINING, "smoke": dict(TOY_TRAINING["smoke"], steps=25)})
    capsys.readouterr()
    zoo.load_or_train(longer, "smoke", progress=False)
    assert fits == ["smoke", "smoke"] and "stale" in capsys.readouterr().out
    zoo.load_or_train(dataclasses.replace(longer, version=2), "smoke", progress=False)  # a code change the author declares
    assert len(fits) == 3
    zoo.load_or_train(dataclasses.replace(longer, version=2, data={"smoke": dict(size=7)}), "smoke", progress=False)
    assert len(fits) == 4   # the data is part of the recipe too


def test_corrupt_cache_is_retrained(toy, tmp_path, capsys):
    recipe, fits = toy
    zoo.load_or_train(recipe, "smoke", progress=False)
    path = tmp_path / "cache" / "toy" / "smoke" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    model = zoo.load_or_train(recipe, "smoke", progress=False)
    out = capsys.readouterr().out
    assert "unusable" in out and "corrupt or truncated" in out and len(fits) == 2
    assert isinstance(model, MLP)
    zoo.load_or_train(recipe, "smoke")
    assert len(fits) == 2  # the retrained file is good


def interrupted_at(calls, step, config=None, **train_kwargs):
    """A fit whose loss raises KeyboardInterrupt during `step` (the laptop lid closes), the first time only."""
    def fit(model, job):
        def loss_fn(model, batch):
            calls.append(1)
            if len(calls) == step:
                raise KeyboardInterrupt
            return mse(model, batch)
        return train(model, loss_fn, make_dataset(), job.train_config(**(config or {})), run_dir=job.run_dir,
                     kind="toy", **train_kwargs)
    return fit


def test_interrupted_training_resumes(toy):
    recipe, _ = toy
    calls = []
    interrupted = dataclasses.replace(recipe, fit=interrupted_at(calls, 15, config=dict(checkpoint_every=10)))
    with pytest.raises(KeyboardInterrupt):
        zoo.load_or_train(interrupted, "smoke", progress=False)
    zoo.load_or_train(interrupted, "smoke", progress=False)
    assert len(calls) == 15 + 10  # the second call ran only steps 11..20 of the smoke budget


def test_unwritable_cache_dir(toy, tmp_path, monkeypatch):
    recipe, _ = toy
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(zoo.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(zoo.ZooError, match=r"a_file/cache.*MINIDALLE2_CACHE"):
        zoo.cache_dir()
    with pytest.raises(zoo.ZooError, match="MINIDALLE2_CACHE"):
        zoo.load_or_train(recipe, "smoke")


def test_unknown_preset_and_recipe(toy):
    recipe, _ = toy
    with pytest.raises(ValueError, match="unknown preset 'big'; choose one of: smoke, cpu, full"):
        zoo.load_or_train(recipe, "big")
    with pytest.raises(zoo.ZooError, match=r"unknown recipe 'nope'; known: .*autoencoder.*vae"):
        recipes.get("nope")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['stpes'\]"):
        recipe.train_config("smoke", stpes=3)
    with pytest.raises(ValueError, match=r"no training budget for preset\(s\) \['full'\]"):
        dataclasses.replace(recipe, training={"smoke": {}, "cpu": {}})
    with pytest.raises(ValueError, match="give fit, or both loss and dataset"):
        dataclasses.replace(recipe, fit=None)
    with pytest.raises(KeyError, match="has no setting 'every'"):
        recipe.setting("every", "smoke")


def test_needs_are_loaded_at_the_same_preset_when_used(toy, capsys):
    base, fits = toy
    seen = []

    def fit(model, job):
        seen.append(sorted(job.needs))           # declared, not loaded yet
        teacher = job.needs["toy"]               # loaded (trained first) at the job's preset on first use
        seen.append(type(teacher).__name__)
        return train(model, mse, make_dataset(), job.train_config(), run_dir=job.run_dir, kind="toy")
    student = dataclasses.replace(toy_recipe([], name="student"), fit=fit, needs=(base,))
    zoo.load_or_train(student, "smoke", progress=False)
    assert seen == [["toy"], "MLP"] and fits == ["smoke"]
    with pytest.raises(KeyError, match="not among the declared needs"):
        zoo.Needs(student, "smoke")["vae"]
    # a need's fingerprint is part of the dependent's: retrain the need differently and the dependent is stale
    before = zoo.fingerprint(student, "smoke")
    changed = dataclasses.replace(student, needs=(dataclasses.replace(base, version=5),))
    assert zoo.fingerprint(changed, "smoke") != before


def test_retraining_a_recipe_gives_the_same_weights(monkeypatch, tmp_path):
    # build() without its own seed: the zoo seeds before building, so the caller's RNG state doesn't matter
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    recipe = zoo.Recipe("unseeded", kind="toy", build=lambda: MLP(width=8), loss=mse, dataset=make_dataset,
                        training=TOY_TRAINING)
    torch.manual_seed(1)
    first = zoo.load_or_train(recipe, "smoke", progress=False)
    torch.manual_seed(2)
    second = zoo.load_or_train(recipe, "smoke", retrain=True, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_fingerprint_leaves_the_callers_rng_alone(toy):
    recipe, _ = toy
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    zoo.fingerprint(recipe, "smoke")
    assert torch.equal(torch.rand(3), expected)


def test_a_variant_changes_settings_at_every_preset_and_is_cached_apart(toy, tmp_path):
    recipe, fits = toy
    wide = recipe.variant("toy_wide", training=dict(lr=5e-3), data=dict(size=10))
    assert wide.name == "toy_wide" and recipe.name == "toy"
    assert all(wide.train_config(p).lr == 5e-3 and wide.data[p] == {"size": 10} for p in presets.PRESETS)
    assert wide.train_config("cpu").steps == recipe.train_config("cpu").steps      # the rest is kept
    zoo.load_or_train(recipe, "smoke", progress=False)
    zoo.load_or_train(wide, "smoke", progress=False)
    assert fits == ["smoke", "smoke"] and (tmp_path / "cache" / "toy_wide" / "smoke" / "model.json").exists()


def test_an_interrupted_zoo_training_resumes_from_its_last_checkpoint_and_says_so(toy, capsys):
    recipe, _ = toy
    calls = []
    # checkpoint_seconds=0: a checkpoint after every step, as a long run gets one every minute
    interrupted = dataclasses.replace(recipe, fit=interrupted_at(calls, 15, checkpoint_seconds=0))
    with pytest.raises(KeyboardInterrupt):
        zoo.load_or_train(interrupted, "smoke", progress=False)
    capsys.readouterr()
    resumed = zoo.load_or_train(interrupted, "smoke", progress=False)
    assert "resuming the interrupted training of 'toy' (smoke) from step 14 of 20" in capsys.readouterr().out
    assert len(calls) == 15 + 6                            # steps 15..20 again, nothing before
    fresh = zoo.load_or_train(recipe, "smoke", retrain=True, progress=False)   # the same run, never interrupted
    for a, b in zip(resumed.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_state_that_cannot_be_read_is_set_aside(toy, tmp_path, capsys):
    recipe, fits = toy
    run = tmp_path / "cache" / "toy" / "smoke" / "run"
    run.mkdir(parents=True)
    (run / "fingerprint.txt").write_text(zoo.fingerprint(recipe, "smoke"))
    (run / "state.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    zoo.load_or_train(recipe, "smoke", progress=False)
    out = capsys.readouterr().out
    assert "cannot be resumed" in out and "training starts afresh" in out and "--retrain" in out and fits == ["smoke"]
    assert [p.name.startswith("run.unusable-") for p in run.parent.iterdir() if p.is_dir()] == [True]
