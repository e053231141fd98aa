"""Auto-encoder and denoising auto-encoder: shapes, losses, corruption statistics, errors, training,
the zoo round trip, and the exercise checks (pass the reference, fail realistic mistakes)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dataclasses

from minidalle2 import autoencoder as ae
from minidalle2 import recipes
from minidalle2.recipes import autoencoder as ae_recipes
from minidalle2.lab import metrics, zoo
from minidalle2.course.checks import autoencoder as checks
from minidalle2.course.checks.core import CheckFailed
from minidalle2.layers import ConvDecoder, ConvEncoder
from minidalle2.lab.train import TrainConfig
from minidalle2.lab.train import train

TINY = dict(latent_dim=16, widths=(8, 16, 16))


def images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_round_trip_of_config():
    model = ae.Autoencoder(**TINY)
    x = images(3)
    z = model.encode(x)
    assert z.shape == (3, 16) and model.decode(z).shape == x.shape and model(x).shape == x.shape
    again = type(model)(**model.config)
    assert again.config == model.config
    cond = ae.Autoencoder(**TINY, noise_level_input=True)
    assert cond(x, torch.tensor([0.1, 0.2, 0.3])).shape == x.shape and cond(x, 0.3).shape == x.shape
    with pytest.raises(ValueError, match="takes the noise level"):
        cond(x)


def test_bad_inputs_get_clear_errors():
    model = ae.Autoencoder(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        model(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        model.encode(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"latents z of shape \(B, 16\), got \(2, 8\)"):
        model.decode(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="latent_dim"):
        ae.Autoencoder(latent_dim=0)
    x = images(2)
    for sigma in (-0.1, float("nan"), float("inf"), torch.tensor([0.1, -1.0])):
        with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
            ae.add_gaussian_noise(x, sigma)
    with pytest.raises(ValueError, match="one per image"):
        ae.add_gaussian_noise(x, torch.tensor([0.1, 0.2, 0.3]))
    for ratio in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
            ae.mask_patches(x, ratio)
    with pytest.raises(ValueError, match="patch_size"):
        ae.mask_patches(x, 0.5, patch_size=5)
    with pytest.raises(ValueError, match="images of shape"):
        ae.add_gaussian_noise(torch.zeros(3, 32, 32), 0.1)


def test_reconstruction_loss_is_mean_squared_error():
    x, y = images(2, 1), images(2, 2)
    assert torch.allclose(ae.reconstruction_loss(x, y), ((x - y) ** 2).sum() / x.numel())


def test_gaussian_noise_has_std_sigma_per_image_and_follows_the_generator():
    x = images(4)
    sigma = torch.tensor([0.0, 0.1, 0.3, 1.0])
    noisy = ae.add_gaussian_noise(x, sigma, torch.Generator().manual_seed(0))
    std = (noisy - x).flatten(1).std(1)
    assert torch.allclose(std, sigma, rtol=0.05, atol=1e-6)
    assert (noisy - x).mean().abs() < 0.03
    same = ae.add_gaussian_noise(x, sigma, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, same)
    # PSNR of a noisy image is 10 log10(4 / sigma^2): 16.5 dB at sigma = 0.3
    psnr = metrics.psnr(ae.add_gaussian_noise(images(64), 0.3), images(64)).mean()
    assert abs(psnr - 16.48) < 0.1


def test_mask_hides_the_requested_share_of_whole_patches():
    x = images(64).abs() + 0.1
    masked, keep = ae.mask_patches(x, 0.3, patch_size=4, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (64, 1, 32, 32) and torch.equal(masked, x * keep)
    assert abs((1 - keep.mean()).item() - 0.3) < 0.03                    # 4096 patches
    blocks = keep.unfold(2, 4, 4).unfold(3, 4, 4).flatten(-2)
    assert (blocks == blocks[..., :1]).all()                             # constant per 4x4 patch
    assert torch.equal(ae.mask_patches(x, 0.0)[0], x)


def test_corrupt_mixes_noise_and_masking():
    x = images(256).abs() + 0.1
    x_tilde, sigma = ae.corrupt(x, sigma_max=0.5, mask_prob=0.25, generator=torch.Generator().manual_seed(0))
    has_zeros = (x_tilde == 0).flatten(1).any(1)
    assert torch.all(sigma[has_zeros] == 0)                              # masked images: sigma = 0
    assert 0.1 < has_zeros.float().mean() < 0.4 and sigma.max() <= 0.5


def tiny_config(steps, **kw):
    return TrainConfig(steps=steps, batch_size=8, lr=3e-3, device="cpu", log_every=1000, **kw)


class EightImages(torch.utils.data.Dataset):
    def __init__(self):
        from minidalle2 import data
        self.images = data.ShapesDataset(8, "train", seed=0).get_batch(torch.arange(8))["image"]

    def __len__(self):
        return 8

    def get_batch(self, idx):
        return {"image": self.images[idx]}


def test_overfits_one_batch_and_is_deterministic():
    dataset = EightImages()
    results = []
    for steps in (60, 5):
        torch.manual_seed(0)
        model = ae.Autoencoder(**TINY)
        results.append(train(model, ae.autoencoder_loss, dataset, tiny_config(steps), progress=False))
    history = results[0].history
    assert history[-1]["psnr"] > history[0]["psnr"] + 6 and history[-1]["psnr"] > 18
    torch.manual_seed(0)
    again = train(ae.Autoencoder(**TINY), ae.autoencoder_loss, dataset, tiny_config(5), progress=False)
    for a, b in zip(results[1].model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)                                         # same seed, same weights
    torch.manual_seed(0)
    dae = ae.Autoencoder(**TINY, noise_level_input=True)                 # the denoising loss trains too
    h = train(dae, ae.denoising_autoencoder_loss, dataset, tiny_config(30), progress=False).history
    assert h[-1]["loss"] < h[0]["loss"] / 2


def test_latent_gaussian_and_random_samples():
    torch.manual_seed(0)
    model = ae.Autoencoder(**TINY).eval()
    z = ae.fit_latent_gaussian(model, images(32))
    assert torch.allclose(model.latent_mean, z.mean(0)) and torch.allclose(model.latent_std, z.std(0))
    a, b = ae.sample_random_latents(model, 5, seed=1), ae.sample_random_latents(model, 5, seed=1)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b) and a.abs().max() <= 1


def test_recipes_round_trip_through_the_zoo(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    small = lambda r: dataclasses.replace(  # the chapter's recipe at a tinier size and budget
        r, model={"smoke": {**r.model["smoke"], "widths": (8, 8, 8)}},
        training={**r.training, "smoke": dict(steps=3, batch_size=8, lr=1e-3, device="cpu")})
    recipe, denoiser = small(recipes.get("autoencoder")), small(recipes.get("denoising_autoencoder"))
    model = zoo.load_or_train(recipe, "smoke", progress=False)
    assert model.latent_std.abs().sum() > 0 and not torch.equal(model.latent_std, torch.ones(ae_recipes.LATENT_DIM))
    again = zoo.load_or_train(recipe, "smoke", progress=False)          # loads, no retraining
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert recipe.sample(again, None, 3, 0).shape == (3, 3, 32, 32)
    dae = zoo.load_or_train(denoiser, "smoke", progress=False)
    report = ae_recipes.denoising_report(dae, n=20)
    assert abs(report["psnr_noisy"] - 16.5) < 0.5 and report["psnr_gain"] == report["psnr"] - report["psnr_noisy"]
    assert denoiser.sample is None


# ----------------------------------------------------------------------------- exercise checks

class GoodAE(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()
        self.encoder, self.decoder = ConvEncoder(out_features=latent_dim), ConvDecoder(in_features=latent_dim)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        return self.decode(self.encode(x))


class NoBottleneck(GoodAE):
    def __init__(self, latent_dim):
        nn.Module.__init__(self)
        self.encoder, self.decoder = ConvEncoder(), ConvDecoder()


class ReturnsZ(GoodAE):
    def forward(self, x):
        return self.encode(x)


def test_checks_pass_the_reference(capsys):
    checks.autoencoder_module(GoodAE)
    checks.reconstruction_loss(ae.reconstruction_loss)
    checks.add_gaussian_noise(lambda x, s: ae.add_gaussian_noise(x, s))
    checks.mask_patches(lambda x, r, p: ae.mask_patches(x, r, p))
    checks.denoising_loss(ae.denoising_loss)
    assert capsys.readouterr().out.count("correct") == 5


@pytest.mark.parametrize("check, wrong, message", [
    (checks.autoencoder_module, NoBottleneck, "out_features=latent_dim"),
    (checks.autoencoder_module, ReturnsZ, "returned z"),
    (checks.reconstruction_loss, lambda a, b: ((a - b) ** 2).sum(), "summed"),
    (checks.reconstruction_loss, lambda a, b: (a - b).abs().mean(), "L1"),
    (checks.reconstruction_loss, lambda a, b: F.mse_loss(a, b).detach(), "no gradient"),
    (checks.add_gaussian_noise, lambda x, s: x + torch.randn_like(x), "multiply eps by sigma"),
    (checks.add_gaussian_noise, lambda x, s: x + torch.as_tensor(s).reshape(-1, 1, 1, 1) ** 2 * torch.randn_like(x),
     "sigma\\*\\*2"),
    (checks.add_gaussian_noise, lambda x, s: x + torch.as_tensor(s).reshape(-1, 1, 1, 1) * torch.rand_like(x),
     "noise"),
    (checks.mask_patches, lambda x, r, p: (x * (torch.rand_like(x) >= r), (torch.rand_like(x) >= r).float()),
     "whole pixels"),
    (checks.mask_patches, lambda x, r, p: ae.mask_patches(x, r, 1), "constant on each"),
    (checks.mask_patches, lambda x, r, p: ae.mask_patches(x, 1 - r if r > 0 else 0.0, p), "HIDDEN"),
    (checks.denoising_loss, lambda m, clean, noisy: ae.reconstruction_loss(m(noisy), noisy), "CLEAN"),
    (checks.denoising_loss, lambda m, clean, noisy: ae.reconstruction_loss(m(clean), clean), "corrupted one"),
])
def test_checks_fail_realistic_mistakes(check, wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check(wrong)


def test_checks_say_not_written_yet():
    def stub(*args):
        raise NotImplementedError()
    with pytest.raises(NotImplementedError, match="not written yet"):
        checks.reconstruction_loss(stub)
