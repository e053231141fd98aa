"""Shared blocks: shapes, options and the clear errors on bad input."""
import pytest
import torch

from minidalle2.layers import ConvDecoder, ConvEncoder, ResBlock, expect_images


def test_encoder_decoder_shapes_and_gradients():
    encoder, decoder = ConvEncoder(widths=(8, 16), out_features=12), ConvDecoder(in_features=12, widths=(8, 16))
    x = torch.randn(5, 3, 32, 32)
    z = encoder(x)
    assert z.shape == (5, 12)
    y = decoder(z)
    assert y.shape == x.shape
    y.pow(2).mean().backward()
    assert all(p.grad is not None for p in [*encoder.parameters(), *decoder.parameters()])


def test_options_grayscale_64px_spectral_and_no_norm():
    encoder = ConvEncoder(channels=1, resolution=64, widths=(4, 8, 8, 8), out_features=3, norm=None, spectral=True)
    assert encoder(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in encoder.modules())
    assert any("parametrizations" in name for name, _ in encoder.named_parameters())
    assert ConvDecoder(in_features=3, channels=1, resolution=64, widths=(4, 8, 8, 8))(torch.randn(2, 3)).shape == (2, 1, 64, 64)
    block = ResBlock(4, 6)
    assert block(torch.randn(1, 4, 8, 8)).shape == (1, 6, 8, 8)


def test_bad_inputs_are_named():
    encoder, decoder = ConvEncoder(widths=(8, 16), out_features=12), ConvDecoder(in_features=12, widths=(8, 16))
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 32, 32\), got \(2, 1, 28, 28\)"):
        encoder(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="single image"):
        encoder(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        expect_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latents z of shape \(B, 12\), got \(2, 7\)"):
        decoder(torch.randn(2, 7))
    with pytest.raises(ValueError, match="cannot be halved"):
        ConvEncoder(resolution=20, widths=(8, 16, 32))
    with pytest.raises(ValueError, match="norm must be"):
        ConvEncoder(norm="batch")
