"""Chapter 01 (GAN): shapes, loss formulas, gradient separation, learning, determinism, zoo, checks."""
import pytest
import torch
import torch.nn.functional as F

from minidalle2 import gan, recipes

from minidalle2.course.checks import CheckFailed
from minidalle2.course.checks import gan as checks
from minidalle2.data import ShapesDataset


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return gan.GAN(latent_dim=8, g_widths=(8, 16, 16), d_widths=(8, 16, 16))


def test_shapes_and_range(small):
    x = small.generator(torch.randn(5, 8))
    assert x.shape == (5, 3, 32, 32) and x.abs().max() <= 1
    assert small.discriminate(x).shape == (5,)
    assert small.sample(7, seed=0).shape == (7, 3, 32, 32)
    resnet_d = gan.GAN(latent_dim=8, g_widths=(8, 16, 16), d_widths=(8, 16, 16), d_resnet=True)
    assert resnet_d.discriminate(x).shape == (5,)


def test_bad_inputs(small):
    with pytest.raises(ValueError, match="positive int"):
        small.sample(0)
    with pytest.raises(ValueError, match=r"latents z of shape \(B, 8\)"):
        small.generator(torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        small.discriminate(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="single image"):
        small.discriminate(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="nonsaturating, saturating, hinge"):
        gan.gan_loss(small, {"image": torch.zeros(2, 3, 32, 32)}, "wasserstein")
    with pytest.raises(ValueError, match="unconditional"):
        recipes.get("gan").sample(small, ["a red circle at the top"], 1, 0)


def test_loss_formulas():
    real, fake = 4 * torch.randn(32), 4 * torch.randn(32)
    d = -(torch.log(torch.sigmoid(real)) + torch.log(1 - torch.sigmoid(fake))).mean()  # BCE, the textbook way
    assert torch.allclose(gan.discriminator_loss(real, fake), d, atol=1e-5)
    assert torch.allclose(gan.discriminator_loss(real, fake),
                          F.binary_cross_entropy_with_logits(real, torch.ones(32))
                          + F.binary_cross_entropy_with_logits(fake, torch.zeros(32)), atol=1e-6)
    assert torch.allclose(gan.generator_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), atol=1e-5)
    assert torch.allclose(gan.generator_loss(fake, "saturating"), torch.log(1 - torch.sigmoid(fake)).mean(), atol=1e-5)
    assert torch.allclose(gan.discriminator_loss(real, fake, "hinge"),
                          torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    assert torch.allclose(gan.generator_loss(fake, "hinge"), -fake.mean())
    # confident logits stay finite (no log(0))
    assert torch.isfinite(gan.discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0])))
    # the point of the non-saturating loss: a strong gradient where D rejects the fakes
    l = torch.tensor([-10.0], requires_grad=True)
    gan.generator_loss(l, "saturating").backward()
    weak = l.grad.abs().item()
    l.grad = None
    gan.generator_loss(l, "nonsaturating").backward()
    assert l.grad.abs().item() > 1000 * weak


def test_gradients_are_separated(small):
    """One backward of L_D + L_G gives D exactly dL_D/dθ_D and G exactly dL_G/dθ_G."""
    batch = {"image": torch.rand(6, 3, 32, 32) * 2 - 1}
    small.train()

    def grads(which_loss):
        small.zero_grad()
        torch.manual_seed(3)   # same z; spectral norm's power iteration is a no-grad buffer update
        state = {k: v.clone() for k, v in small.state_dict().items()}
        loss, _ = gan.gan_loss(small, batch)
        if which_loss != "sum":
            torch.manual_seed(3)
            small.load_state_dict(state)
            real, fake = batch["image"], small.generator(small.latents(6))
            if which_loss == "d":
                loss = gan.discriminator_loss(small.discriminate(real), small.discriminate(fake.detach()))
            else:
                small.discriminate(real), small.discriminate(fake.detach())  # same power iterations as gan_loss
                loss = gan.generator_loss(small.discriminate(fake))
        loss.backward()
        small.load_state_dict(state)
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in small.named_parameters()}

    both, d_only, g_only = grads("sum"), grads("d"), grads("g")
    for name in both:
        ref = d_only[name] if name.startswith("discriminator") else g_only[name]
        assert torch.allclose(both[name], ref, atol=1e-6, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for n, g in both.items() if n.startswith("generator"))
    assert any(g.abs().sum() > 0 for n, g in both.items() if n.startswith("discriminator"))


def test_metrics_logged(small):
    loss, m = gan.gan_loss(small, {"image": torch.zeros(4, 3, 32, 32)})
    assert loss.ndim == 0 and set(m) == {"d_loss", "g_loss", "d_real", "d_fake"}
    assert 0 < float(m["d_real"]) < 1 and 0 < float(m["d_fake"]) < 1


def test_discriminator_learns_real_from_noise():
    torch.manual_seed(0)
    model = gan.GAN(latent_dim=8, g_widths=(8, 16, 16), d_widths=(8, 16, 16))
    real = ShapesDataset(64, seed=0).get_batch(torch.arange(64))["image"]
    noise = torch.rand(64, 3, 32, 32) * 2 - 1
    opt = torch.optim.Adam(model.discriminator.parameters(), lr=2e-3, betas=(0.0, 0.99))
    for _ in range(30):
        loss = gan.discriminator_loss(model.discriminate(real), model.discriminate(noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (model.discriminate(real) > 0).float().mean() > 0.9
        assert (model.discriminate(noise) < 0).float().mean() > 0.9


def test_sampling_is_deterministic(small):
    small.eval()
    a, b, c = small.sample(4, seed=1), small.sample(4, seed=1), small.sample(4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(recipes.get("gan").sample(small, None, 4, 1), a)


def test_recipe_round_trip(tmp_path):
    first = recipes.load("gan", "smoke", cache=tmp_path, progress=False)
    again = recipes.load("gan", "smoke", cache=tmp_path, progress=False)   # a load from the cache
    for (k, v), (_, w) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    recipe = recipes.get("gan")
    images = recipe.sample(again, None, 3, 0)
    assert images.shape == (3, 3, 32, 32) and not recipe.conditional
    assert torch.equal(images, recipe.sample(first, None, 3, 0))


def test_checks_pass_reference_and_fail_wrong_answers():
    checks.discriminator_loss(gan.discriminator_loss)
    checks.generator_loss(gan.generator_loss)
    wrong_d = [lambda r, f: F.softplus(r).mean() + F.softplus(-f).mean(),                   # swapped
               lambda r, f: -(torch.log(torch.sigmoid(r)) + torch.log(1 - torch.sigmoid(f))).mean(),  # unstable
               lambda r, f: F.softplus(-r).mean() + F.softplus(f).mean().detach()]           # no gradient
    for fn in wrong_d:
        with pytest.raises(CheckFailed):
            checks.discriminator_loss(fn)
    with pytest.raises(CheckFailed, match="saturating"):
        checks.generator_loss(lambda f: -F.softplus(f).mean())
    with pytest.raises(CheckFailed, match="underflows"):
        checks.generator_loss(lambda f: -torch.log(torch.sigmoid(f)).mean())
    with pytest.raises(CheckFailed, match="scalar"):
        checks.generator_loss(lambda f: F.softplus(-f))
    with pytest.raises(NotImplementedError, match="not written yet"):
        checks.generator_loss(lambda f: (_ for _ in ()).throw(NotImplementedError()))
