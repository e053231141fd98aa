"""Checks of the exercises of chapters 02 (auto-encoder) and 03 (denoising auto-encoder).

    from minidalle2.checks import autoencoder as checks
    checks.autoencoder_module(MyAutoencoder)
    checks.reconstruction_loss(reconstruction_loss)
    checks.add_gaussian_noise(add_gaussian_noise)
    checks.mask_patches(mask_patches)
    checks.denoising_loss(denoising_loss)
"""

import torch

from ... import autoencoder as ref
from ...layers import ConvDecoder, ConvEncoder
from .core import CheckFailed, call, expect_close, expect_scalar, expect_shape, passed


def _images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def autoencoder_module(cls, latent_dim=8):
    """cls(latent_dim) must hold .encoder (ConvEncoder to latent_dim features) and .decoder (its mirror);
    encode(x) -> z (B, latent_dim), decode(z) -> images, forward(x) = decode(encode(x))."""
    name = "MyAutoencoder"
    model = call(cls, latent_dim, name=f"{name}({latent_dim})")
    for part, kind in (("encoder", ConvEncoder), ("decoder", ConvDecoder)):
        if not isinstance(getattr(model, part, None), kind):
            raise CheckFailed(f"{name}: self.{part} should be a {kind.__name__}, got "
                              f"{type(getattr(model, part, None)).__name__}")
    torch.manual_seed(0)
    encoder, decoder = ConvEncoder(out_features=latent_dim), ConvDecoder(in_features=latent_dim)
    x = _images(2)
    z = call(model.encode, x, name=f"{name}.encode")
    if isinstance(z, torch.Tensor) and z.shape == (2, 128) and latent_dim != 128:
        raise CheckFailed(f"{name}.encode: z has 128 features, expected latent_dim={latent_dim}. "
                          "Hint: pass out_features=latent_dim to ConvEncoder (and in_features=latent_dim to ConvDecoder)")
    expect_shape(z, (2, latent_dim), f"{name}.encode(x) (the bottleneck z)")
    try:  # same weights as the reference, so the outputs must agree
        model.encoder.load_state_dict(encoder.state_dict())
        model.decoder.load_state_dict(decoder.state_dict())
    except RuntimeError as e:
        raise CheckFailed(f"{name}: encoder/decoder do not have the expected layers "
                          f"(use ConvEncoder(out_features=latent_dim), ConvDecoder(in_features=latent_dim)): {e}") from None
    with torch.no_grad():
        z_ref = encoder(x)
        expect_close(call(model.encode, x, name=f"{name}.encode"), z_ref, f"{name}.encode(x)")
        x_hat = call(model.decode, z_ref, name=f"{name}.decode")
        expect_shape(x_hat, x.shape, f"{name}.decode(z)")
        expect_close(x_hat, decoder(z_ref), f"{name}.decode(z)")
        out = call(model, x, name=f"{name}(x)")
        if isinstance(out, torch.Tensor) and out.shape == z_ref.shape:
            raise CheckFailed(f"{name}(x) returned z; forward should return the reconstruction decode(encode(x))")
        expect_close(out, decoder(z_ref), f"{name}(x) = decode(encode(x))")
    return passed(name, f"encode -> z of {latent_dim} numbers -> decode, same outputs as the reference")


def reconstruction_loss(fn):
    """fn(x_hat, x) must be the mean squared error per pixel, differentiable in x_hat."""
    name = "reconstruction_loss"
    x = _images(4, 1)
    x_hat = (x + 0.1 * _images(4, 2)).requires_grad_(True)
    loss = expect_scalar(call(fn, x_hat, x, name=name), name)
    expected = ref.reconstruction_loss(x_hat, x)
    value, want = float(loss.detach()), float(expected.detach())
    hints = {"you summed the squared errors; take the mean (the LR should not depend on the image size)": want * x.numel(),
             "that is the root of the MSE (RMSE); the loss is the mean of the squared errors": want ** 0.5,
             "you averaged |x_hat - x| (L1); square the errors instead": float((x_hat - x).detach().abs().mean())}
    for hint, wrong in hints.items():
        if abs(value - wrong) < 1e-4 * max(1.0, abs(wrong)) and abs(value - want) > 1e-6:
            raise CheckFailed(f"{name}: got {value:.6g}, expected {want:.6g}: {hint}")
    expect_close(loss.reshape(()), expected.reshape(()), name)
    if not loss.requires_grad:
        raise CheckFailed(f"{name}: the loss has no gradient; do not detach x_hat or call .item()")
    grad, = torch.autograd.grad(loss, x_hat)
    expect_close(grad, 2 * (x_hat - x).detach() / x.numel(), f"gradient of {name} w.r.t. x_hat")
    return passed(name, "mean squared error per pixel: value and gradient")


def add_gaussian_noise(fn):
    """fn(x, sigma) = x + sigma * eps with sigma a float or one per image (B,)."""
    name = "add_gaussian_noise"
    torch.manual_seed(0)
    x = _images(5, 3)
    x_before = x.clone()
    sigma = torch.tensor([0.0, 0.05, 0.3, 0.5, 1.0])
    noisy = expect_shape(call(fn, x, sigma, name=name), x.shape, f"{name}(x, sigma)")
    if not torch.equal(x, x_before):
        raise CheckFailed(f"{name}: modified x in place; return a new tensor (x + sigma * eps)")
    std = (noisy - x).flatten(1).std(1)     # 3072 draws per image: the std is known to ~1.3%
    mean = (noisy - x).flatten(1).mean(1)
    if torch.allclose(std, torch.ones(5), atol=0.05):
        raise CheckFailed(f"{name}: the noise has std 1 in every image; multiply eps by sigma")
    if torch.allclose(std[1:], sigma[1:] ** 2, rtol=0.06, atol=0.005):
        raise CheckFailed(f"{name}: the noise std is sigma**2; sigma is the standard deviation, "
                          "so multiply eps by sigma (not by the variance sigma**2)")
    if not torch.allclose(std, sigma, rtol=0.06, atol=0.005):
        raise CheckFailed(f"{name}: per-image noise std {[round(s, 3) for s in std.tolist()]}, expected sigma = "
                          f"{sigma.tolist()}; use sigma.view(-1, 1, 1, 1) * torch.randn_like(x)")
    if mean.abs().max() > 0.1:
        raise CheckFailed(f"{name}: the noise mean is {mean.tolist()}, expected ~0 (use torch.randn, not torch.rand)")
    again = call(fn, x, sigma, name=name)
    if torch.equal(again, noisy):
        raise CheckFailed(f"{name}: two calls gave the same noise; draw fresh eps each call")
    one = expect_shape(call(fn, x, 0.3, name=name), x.shape, f"{name}(x, 0.3)")
    std_one = (one - x).std().item()
    if abs(std_one - 0.3) > 0.01:
        raise CheckFailed(f"{name}: with one float sigma=0.3 the noise std is {std_one:.3f}, expected 0.3")
    return passed(name, "noise std = sigma per image (float or tensor), mean 0, fresh each call")


def mask_patches(fn):
    """fn(x, ratio, patch_size) -> (masked, keep): keep (B, 1, H, W) in {0, 1}, constant per patch,
    masked = x * keep, P(masked patch) = ratio."""
    name = "mask_patches"
    torch.manual_seed(0)
    x = _images(16, 4).abs() + 0.1           # no pixel is 0, so a 0 means "masked"
    for ratio, patch in ((0.25, 4), (0.6, 1)):
        out = call(fn, x, ratio, patch, name=name)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise CheckFailed(f"{name}: return a pair (masked, keep), got {type(out).__name__}")
        masked, keep = out
        expect_shape(masked, x.shape, f"{name}: masked")
        if isinstance(keep, torch.Tensor) and keep.shape == x.shape:
            raise CheckFailed(f"{name}: keep has shape {tuple(keep.shape)}: mask whole pixels (all channels at once), "
                              "so draw the mask with shape (B, 1, H/p, W/p)")
        expect_shape(keep, (16, 1, 32, 32), f"{name}: keep")
        if not ((keep == 0) | (keep == 1)).all():
            raise CheckFailed(f"{name}: keep must hold only 0 (masked) and 1 (kept)")
        expect_close(masked, x * keep, f"{name}: masked should be x * keep (masked pixels 0)")
        blocks = keep.unfold(2, patch, patch).unfold(3, patch, patch).flatten(-2)
        if not (blocks == blocks[..., :1]).all():
            raise CheckFailed(f"{name}: with patch_size={patch} the mask must be constant on each {patch}x{patch} "
                              "patch; draw (B, 1, H/p, W/p) and repeat_interleave it p times along H and W")
        frac = 1 - keep.mean().item()
        if abs(frac - (1 - ratio)) < 0.08 and abs(frac - ratio) > 0.08:
            raise CheckFailed(f"{name}: with ratio={ratio} you masked {frac:.0%} of the pixels: "
                              "ratio is the share HIDDEN; keep a patch when rand >= ratio")
        if abs(frac - ratio) > 0.08:
            raise CheckFailed(f"{name}: with ratio={ratio} you masked {frac:.0%} of the pixels, expected ~{ratio:.0%}")
    masked, keep = call(fn, x, 0.0, 4, name=name)
    expect_close(masked, x, f"{name}: with ratio=0 nothing is masked")
    return passed(name, "whole pixels/patches masked to 0 at the requested ratio; kept pixels unchanged")


def denoising_loss(fn):
    """fn(model, clean, corrupted) = mean (model(corrupted) - clean)^2."""
    name = "denoising_loss"
    torch.manual_seed(0)
    model = ref.Autoencoder(latent_dim=8, widths=(8, 8, 8)).eval()
    clean = _images(3, 5)
    corrupted = clean + 0.3 * _images(3, 6)
    loss = expect_scalar(call(fn, model, clean, corrupted, name=name), name)
    want = ref.denoising_loss(model, clean, corrupted)
    with torch.no_grad():
        wrong = {"you compared with the corrupted input; the target is the CLEAN image":
                 ref.reconstruction_loss(model(corrupted), corrupted),
                 "you fed the clean image to the model; feed the corrupted one (that is the denoising task)":
                 ref.reconstruction_loss(model(clean), clean),
                 "you fed the clean image and compared with the corrupted one; swap them":
                 ref.reconstruction_loss(model(clean), corrupted)}
    for hint, w in wrong.items():
        if abs(float(loss.detach()) - float(w)) < 1e-6 and abs(float(w) - float(want.detach())) > 1e-4:
            raise CheckFailed(f"{name}: got {float(loss.detach()):.6g}, expected {float(want.detach()):.6g}: {hint}")
    expect_close(loss.reshape(()), want.reshape(()), name)
    if not loss.requires_grad:
        raise CheckFailed(f"{name}: the loss has no gradient; do not wrap it in torch.no_grad() or call .item()")
    return passed(name, "MSE between model(corrupted) and the clean image")
