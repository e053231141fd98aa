"""The denoising U-Net and the noisy classifier: shapes, conditioning, init, errors, checkpoints, learning."""
import math

import pytest
import torch

from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.diffusion import drop_condition
from minidalle2.unet import NoisyClassifier, UNet, timestep_embedding

TINY = dict(widths=(8, 16), time_dim=32)


def randomise_head(model):
    """The head and each block's last conv start at zero (output 0 for any input, every block the
    identity); give them weights, as training would, to see t and cond reach the output."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)


@pytest.mark.parametrize("patch_size", [1, 2])
@pytest.mark.parametrize("mode", ["none", "classes", "vector", "image"])
def test_output_shape_for_every_conditioning_mode_and_patch_size(mode, patch_size):
    kw = {"none": {}, "classes": dict(num_classes=30), "vector": dict(cond_dim=12),
          "image": dict(image_cond_channels=3)}[mode]
    model = UNet(**TINY, patch_size=patch_size, **kw)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 500, 999])
    cond = {"classes": torch.tensor([0, 29, -1]), "vector": torch.randn(3, 12)}.get(mode)
    image_cond = torch.randn(3, 3, 32, 32) if mode == "image" else None
    assert model(x, t, cond, image_cond=image_cond).shape == x.shape


def test_other_shapes_grayscale_64px_two_blocks_no_attention():
    model = UNet(channels=1, resolution=64, widths=(8, 16, 16, 16), blocks_per_level=2, attention_levels=())
    assert model(torch.randn(2, 1, 64, 64), 7).shape == (2, 1, 64, 64)   # a scalar t serves the batch
    assert not any(type(m).__name__ == "Attention" for m in model.modules())
    classifier = NoisyClassifier(num_classes=30, widths=(8, 16))
    assert classifier(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).shape == (2, 30)


def test_timestep_embedding_values():
    t = torch.tensor([0, 1, 10, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (4, 16)
    assert torch.equal(emb[0, :8], torch.zeros(8)) and torch.equal(emb[0, 8:], torch.ones(8))   # sin 0, cos 0
    freqs = torch.exp(-math.log(10000) * torch.arange(8) / 8)
    torch.testing.assert_close(emb[2], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))
    assert torch.cdist(emb, emb).add(torch.eye(4)).min() > 0.1                 # distinct t, distinct vectors
    assert timestep_embedding(torch.tensor([3.5]), 7).shape == (1, 7)          # float t, odd dim padded
    torch.testing.assert_close(timestep_embedding(torch.tensor([2.0]), 8), timestep_embedding(torch.tensor([2]), 8))


def test_zero_init_head_outputs_exactly_zero():
    model = UNet(**TINY, num_classes=5)
    assert torch.equal(model(torch.randn(2, 3, 32, 32), torch.tensor([3, 900]), torch.tensor([1, -1])),
                       torch.zeros(2, 3, 32, 32))


def test_one_set_of_parameters_serves_every_t():
    torch.manual_seed(0)
    model = UNet(**TINY)
    randomise_head(model)
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    out = model(x, torch.tensor([10, 800]))                    # same image, same module, two steps
    assert (out[0] - out[1]).abs().max() > 1e-4
    out.pow(2).sum().backward()
    assert model.embed.time[0].weight.grad.abs().sum() > 0     # t reaches the loss through the embedding


def test_null_class_differs_from_real_classes_and_is_learned():
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=4)
    randomise_head(model)
    x, t = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1), torch.tensor([100, 100])
    out = model(x, t, torch.tensor([2, -1]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    out[1].pow(2).sum().backward()                             # only the unconditional row
    grad = model.embed.classes.weight.grad
    assert grad[4].abs().sum() > 0 and grad[:4].abs().sum() == 0   # -1 uses row K = 4, the null row


def test_null_vector_is_learned_and_nan_rows_mean_no_condition():
    torch.manual_seed(0)
    model = UNet(**TINY, cond_dim=6)
    randomise_head(model)
    x, t = torch.randn(1, 3, 32, 32).expand(3, -1, -1, -1), torch.tensor([5, 5, 5])
    cond = torch.randn(3, 6)
    cond[1] = float("nan")
    out = model(x, t, cond)
    assert torch.isfinite(out).all() and (out[0] - out[1]).abs().max() > 1e-4
    out[1].pow(2).sum().backward()
    assert model.embed.null.grad.abs().sum() > 0
    null = model.null_condition(3)
    torch.testing.assert_close(model(x, t, null)[0], out[1])   # null_condition() is the NaN convention
    assert torch.equal(UNet(**TINY, num_classes=4).null_condition(2), torch.tensor([-1, -1]))


def test_drop_condition():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1000) % 30
    dropped = drop_condition(labels, 0.2, generator=g)
    assert set(dropped[dropped != labels].tolist()) == {-1} and 150 < (dropped == -1).sum() < 250
    vectors = drop_condition(torch.randn(10, 4), 1.0)
    assert vectors.isnan().all()
    assert torch.equal(drop_condition(labels, 0.0), labels)


def test_bad_inputs_are_named():
    plain, classes, vector = UNet(**TINY), UNet(**TINY, num_classes=4), UNet(**TINY, cond_dim=6)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 32, 32\), got \(2, 1, 28, 28\)"):
        plain(torch.randn(2, 1, 28, 28), t)
    with pytest.raises(ValueError, match=r"t must lie in \[0, num_timesteps=1000\)"):
        plain(x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"t must lie"):
        plain(x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"t of shape \(2,\) or a scalar"):
        plain(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="built unconditional"):
        plain(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="conditional and needs cond"):
        classes(x, t)
    with pytest.raises(ValueError, match=r"class id out of range \[-1, 4\)"):
        classes(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class ids, a LongTensor"):
        classes(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"float vectors of shape \(2, 6\)"):
        vector(x, t, torch.randn(2, 5))
    with pytest.raises(ValueError, match="partly NaN"):
        vector(x, t, torch.tensor([[float("nan")] + [0.0] * 5, [0.0] * 6]))
    with pytest.raises(ValueError, match="needs image_cond"):
        UNet(**TINY, image_cond_channels=3)(x, t)
    with pytest.raises(ValueError, match="not both"):
        UNet(**TINY, num_classes=4, cond_dim=6)
    with pytest.raises(ValueError, match="cannot be divided"):
        UNet(resolution=32, widths=(8, 16, 16, 16, 16, 16), patch_size=2)
    with pytest.raises(ValueError, match=r"attention_levels \[2\] out of range"):
        UNet(widths=(8, 16), attention_levels=(2,))
    with pytest.raises(ValueError, match="NoisyClassifier expects images"):
        NoisyClassifier(widths=(8, 16))(torch.randn(2, 3, 16, 16), t)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    for model, cls in [(UNet(**TINY, cond_dim=6, patch_size=2, attention_levels=(0, 1)), UNet),
                       (NoisyClassifier(num_classes=30, widths=(8, 16)), NoisyClassifier)]:
        randomise_head(model) if cls is UNet else None
        save_model(model, tmp_path / cls.__name__, kind=cls.__name__)
        loaded = load_model(tmp_path / cls.__name__, cls, expected_kind=cls.__name__)
        assert loaded.config == model.config
        args = (torch.randn(2, 3, 32, 32), torch.tensor([3, 700]))
        cond = (torch.randn(2, 6),) if cls is UNet else ()
        assert torch.equal(loaded(*args, *cond), model(*args, *cond))


def test_tiny_unet_overfits_one_batch_on_eps_mse():
    """eps-prediction on 8 fixed images: the loss must fall well below its starting value of ~1."""
    torch.manual_seed(0)
    T = 1000
    alpha_bar = torch.cos((torch.arange(T) / T + 0.008) / 1.008 * math.pi / 2) ** 2   # cosine schedule
    x0 = torch.zeros(8, 3, 32, 32)
    x0[:, :, 8:20, 10:22] = torch.rand(8, 3, 1, 1) * 2 - 1                             # flat coloured squares
    model = UNet(widths=(16, 32), patch_size=2, num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    eps, t = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, T, (8,), generator=g)
    labels = torch.arange(8) % 4
    for step in range(100):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps                      # q_sample: sqrt(ab) x0 + sqrt(1-ab) eps
        loss = (model(x_t, t, labels) - eps).pow(2).mean()
        if step == 0:
            first = loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first == pytest.approx(1.0, abs=0.1)                        # zero head: the loss starts at E[eps^2]
    assert loss.item() < 0.3 * first
