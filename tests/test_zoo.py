import sys
from pathlib import Path

import pytest
import torch

from minidalle2 import presets, zoo
from minidalle2.presets import train_config
from minidalle2.train import train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import MLP, make_dataset, mse  # noqa: E402


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """Registers a 'toy' recipe that counts how often it is trained; the cache lives in tmp_path."""
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "_REGISTRY", {})
    monkeypatch.setattr(zoo, "_RECIPE_MODULES", [])
    monkeypatch.setattr(zoo, "_imported", False)
    monkeypatch.setattr(zoo, "_missing_modules", [])
    fits = []

    def build(preset):
        torch.manual_seed(0)
        return MLP(width=8)

    def fit(model, preset, run_dir):
        fits.append(preset)
        return train(model, mse, make_dataset(), train_config("toy", preset, device="cpu"), run_dir=run_dir,
                     kind="toy")

    zoo.register(zoo.Recipe("toy", kind="toy", build=build, fit=fit, description="a tiny regressor"))
    return fits


def test_trains_once_then_loads(toy, tmp_path, capsys):
    first = zoo.load_or_train("toy", "smoke", progress=False)
    assert toy == ["smoke"] and "training 'toy'" in capsys.readouterr().out
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    assert (tmp_path / "cache" / "toy" / "smoke" / "model.safetensors").exists()
    assert not (tmp_path / "cache" / "toy" / "smoke" / "run").exists()  # training state cleaned up

    second = zoo.load_or_train("toy", "smoke")
    assert toy == ["smoke"] and "loaded 'toy'" in capsys.readouterr().out
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)

    assert first.zoo_preset == second.zoo_preset == "smoke"   # recipes built on it look up the same preset
    zoo.load_or_train("toy", "cpu", progress=False)  # each preset has its own cache entry
    zoo.load_or_train("toy", "smoke", retrain=True, progress=False)
    assert toy == ["smoke", "cpu", "smoke"]


def test_training_curves_are_kept_with_the_model(toy):
    with pytest.raises(zoo.ZooError, match="no cached 'toy'"):
        zoo.training_history("toy", "smoke")
    zoo.load_or_train("toy", "smoke", progress=False)
    history = zoo.training_history("toy", "smoke")
    assert [h["step"] for h in history] == list(range(1, train_config("toy", "smoke").steps + 1))
    assert all("loss" in h and "lr" in h for h in history)
    thinned = zoo._thin([{"step": i} for i in range(1, 1202)], points=500)
    assert len(thinned) <= 502 and thinned[0]["step"] == 1 and thinned[-1]["step"] == 1201


def test_default_preset_comes_from_env(toy, monkeypatch):
    monkeypatch.setenv(presets.PRESET_ENV, "smoke")
    zoo.load_or_train("toy", progress=False)
    assert toy == ["smoke"]
    monkeypatch.setenv(presets.PRESET_ENV, "huge")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        zoo.load_or_train("toy")


def test_fingerprint_change_retrains(toy, monkeypatch, capsys):
    zoo.load_or_train("toy", "smoke", progress=False)
    smoke = dict(presets.TRAINING["toy"]["smoke"], steps=25)
    monkeypatch.setitem(presets.TRAINING, "toy", {**presets.TRAINING["toy"], "smoke": smoke})
    capsys.readouterr()
    zoo.load_or_train("toy", "smoke", progress=False)
    assert toy == ["smoke", "smoke"] and "stale" in capsys.readouterr().out
    zoo.get_recipe("toy").version = 2  # a code change the author declares
    zoo.load_or_train("toy", "smoke", progress=False)
    assert len(toy) == 3


def test_corrupt_cache_is_retrained(toy, tmp_path, capsys):
    zoo.load_or_train("toy", "smoke", progress=False)
    path = tmp_path / "cache" / "toy" / "smoke" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    model = zoo.load_or_train("toy", "smoke", progress=False)
    out = capsys.readouterr().out
    assert "unusable" in out and "corrupt or truncated" in out and len(toy) == 2
    assert isinstance(model, MLP)
    zoo.load_or_train("toy", "smoke")
    assert len(toy) == 2  # the retrained file is good


def test_interrupted_training_resumes(toy, monkeypatch):
    calls = []
    def fit(model, preset, run_dir):
        def loss_fn(model, batch):
            calls.append(1)
            if len(calls) == 15:
                raise KeyboardInterrupt  # the laptop lid closes during step 15
            return mse(model, batch)
        cfg = train_config("toy", preset, device="cpu", checkpoint_every=10)
        return train(model, loss_fn, make_dataset(), cfg, run_dir=run_dir, kind="toy")
    monkeypatch.setattr(zoo.get_recipe("toy"), "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        zoo.load_or_train("toy", "smoke", progress=False)
    zoo.load_or_train("toy", "smoke", progress=False)
    assert len(calls) == 15 + 10  # the second call ran only steps 11..20 of the smoke budget


def test_unwritable_cache_dir(toy, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(zoo.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(zoo.ZooError, match=r"a_file/cache.*MINIDALLE2_CACHE"):
        zoo.cache_dir()
    with pytest.raises(zoo.ZooError, match="MINIDALLE2_CACHE"):
        zoo.load_or_train("toy", "smoke")


def test_unknown_preset_and_recipe(toy):
    with pytest.raises(ValueError, match="unknown preset 'big'; choose one of: smoke, cpu, full"):
        zoo.load_or_train("toy", "big")
    with pytest.raises(zoo.ZooError, match=r"unknown recipe 'nope'; known: toy"):
        zoo.load_or_train("nope", "smoke")
    assert [r.name for r in zoo.recipes()] == ["toy"]


def test_recipe_modules_are_imported_lazily(toy, tmp_path, monkeypatch):
    (tmp_path / "my_chapter.py").write_text(
        "from minidalle2 import zoo\n"
        "zoo.register(zoo.Recipe('chapter', kind='c', build=None, fit=None))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(zoo, "_RECIPE_MODULES", ["my_chapter", "minidalle2.not_written_yet"])
    assert "my_chapter" not in sys.modules
    assert zoo.get_recipe("chapter").kind == "c"
    with pytest.raises(zoo.ZooError, match="could not import minidalle2.not_written_yet"):
        zoo.get_recipe("oracle")
    monkeypatch.delitem(sys.modules, "my_chapter")


def test_retraining_a_recipe_gives_the_same_weights(monkeypatch, tmp_path):
    # build() without its own seed: the zoo seeds before building, so the caller's RNG state doesn't matter
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "_REGISTRY", {})
    monkeypatch.setattr(zoo, "_RECIPE_MODULES", [])
    fit = lambda model, preset, run_dir: train(model, mse, make_dataset(), train_config("toy", preset, device="cpu"),
                                               run_dir=run_dir, kind="toy")
    zoo.register(zoo.Recipe("unseeded", kind="toy", build=lambda preset: MLP(width=8), fit=fit, training="toy"))
    torch.manual_seed(1)
    first = zoo.load_or_train("unseeded", "smoke", progress=False)
    torch.manual_seed(2)
    second = zoo.load_or_train("unseeded", "smoke", retrain=True, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
