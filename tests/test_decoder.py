"""Chapter 13 (unCLIP's decoder and the 32 -> 64 upsampler): the embedding's two paths and their nulls, two-condition
CFG, the drop rates, context attention that ignores padding, checkpoints that record their CLIP, a tiny overfit; the
upsampler's convolutional network, its blur and corruption, its crops; and the binding-error count.
Everything runs on a tiny random CLIP, in one thread, in seconds on a CPU."""
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from minidalle2 import clip as clip_module
from minidalle2 import data, decoder, diffusion, prior, upsampler
from minidalle2.lab import scoreboard
from minidalle2.lab.checkpoint import load_model, save_model
from minidalle2.layers import SpatialSelfAttention

D, W = 32, 32          # the tiny CLIP's embedding size and text width (the tiny_clip fixture of tests/conftest.py)
CAPTIONS = ["a big red circle", "a small blue square at the top left", "a green triangle above a yellow cross"]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def batch(tiny_clip):
    """8 train scenes through the tiny CLIP, with their images: the decoder's training batch."""
    dataset = prior.EmbeddingDataset(tiny_clip, data.sample_scenes(8, "train", seed=0), keep_images=True)
    return dataset.get_batch(torch.arange(8))


def tiny_decoder(seed=0, live_head=True, **changes):
    """A small decoder; live_head: its zero-initialised convs given random weights (live), so that the untrained
    network's output depends on its inputs (a zero head outputs 0 whatever it reads)."""
    torch.manual_seed(seed)
    model = decoder.Decoder(**{**dict(embed_dim=D, text_width=W, widths=(16, 32), attention_levels=(1,)), **changes})
    return (live(model) if live_head else model).eval()


def live(model):
    """Random weights for every zero-initialised conv (the head, the residual branches, the attention outputs)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            torch.nn.init.normal_(module.weight, std=0.05)
    return model


def inputs(n=3, seed=1, resolution=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, resolution, resolution, generator=g), torch.randint(0, 1000, (n,), generator=g)


def unit(n, seed=2):
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def text_for(tiny_clip, captions=CAPTIONS):
    with torch.no_grad():
        return prior.text_condition(*tiny_clip.text_states(captions, with_embedding=True))


# ----------------------------------------------------------------------------- 1. the two paths and their nulls

def test_the_image_embedding_changes_the_output_through_both_paths(tiny_clip):
    model, (x, t), text = tiny_decoder(), inputs(), text_for(tiny_clip)
    net = model.diffusion.net
    with torch.no_grad():
        a, b = net(x, t, unit(3, 2), text), net(x, t, unit(3, 3), text)
        assert (a - b).abs().max() > 1e-3, "the embedding is not ignored"
        # the part added to the timestep embedding alone: freeze the tokens (same null tokens for both)
        tokens = net.embed_tokens.weight.clone()
        net.embed_tokens.weight.zero_()
        net.embed_tokens.bias.zero_()
        a2, b2 = net(x, t, unit(3, 2), text), net(x, t, unit(3, 3), text)
        net.embed_tokens.weight.copy_(tokens)
        assert (a2 - b2).abs().max() > 1e-3, "the embedding reaches the timestep embedding"
        # the tokens alone: the FiLM path's projection zeroed
        last = net.unet.embed.cond[-1]
        saved = last.weight.clone(), last.bias.clone()
        last.weight.zero_()
        last.bias.zero_()
        a3, b3 = net(x, t, unit(3, 2), text), net(x, t, unit(3, 3), text)
        last.weight.copy_(saved[0])
        last.bias.copy_(saved[1])
        assert (a3 - b3).abs().max() > 1e-3, "the embedding reaches the attention through its tokens"


def test_the_null_covers_every_path_and_guidance_zero_is_the_unconditional_call(tiny_clip):
    model, (x, t), text = tiny_decoder(), inputs(), text_for(tiny_clip)
    net, z = model.diffusion.net, unit(3)
    null_z, null_text = diffusion.null_condition(z), diffusion.null_condition(text)
    with torch.no_grad():
        unconditional = net(x, t, null_z, null_text)
        # a NaN row means "no embedding" on both paths: nothing of the original embedding can leak in
        assert torch.equal(net(x, t, null_z, null_text), unconditional)
        guided = diffusion.guided_prediction(model.diffusion, x, t, {"image_embed": z, "text": text}, guidance=0.0)
        torch.testing.assert_close(guided, unconditional)
        # guide "embed" nulls the embedding only: the caption stays
        only_embed = diffusion.guided_prediction(model.diffusion, x, t, {"image_embed": z, "text": text}, 0.0,
                                                 null=decoder.GUIDES["embed"])
        torch.testing.assert_close(only_embed, net(x, t, null_z, text))
        assert (only_embed - unconditional).abs().max() > 1e-4, "the caption is read"
        # w = 3: pred_u + 3 (pred_c - pred_u), the two-condition combination
        cond = net(x, t, z, text)
        w3 = diffusion.guided_prediction(model.diffusion, x, t, {"image_embed": z, "text": text}, 3.0)
        torch.testing.assert_close(w3, unconditional + 3 * (cond - unconditional), atol=1e-5, rtol=1e-5)


def test_a_dropped_caption_is_one_learned_token_and_padding_is_ignored(tiny_clip):
    model, (x, t), text = tiny_decoder(), inputs(), text_for(tiny_clip)
    net, z = model.diffusion.net, unit(3)
    with torch.no_grad():
        longer = torch.cat([text[:, :-1], torch.full((3, 4, text.shape[2]), float("nan")), text[:, -1:]], 1)
        torch.testing.assert_close(net(x, t, z, longer), net(x, t, z, text), atol=1e-5, rtol=1e-5)
        dropped = diffusion.null_condition(text)
        assert not torch.allclose(net(x, t, z, dropped), net(x, t, z, text)), "no caption is not the caption"
        assert net.null_text.requires_grad, "the dropped caption's token is learned"


def test_context_attention_ignores_masked_tokens():
    torch.manual_seed(0)
    attention = SpatialSelfAttention(32, context_dim=16)
    torch.nn.init.normal_(attention.proj.weight, std=0.1)
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, False, False, True], [True, False, False, False, False]])
    changed = context.clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(attention(x, changed, mask), attention(x, context, mask))
    assert not torch.allclose(attention(x, context, mask), attention(x, context, torch.ones_like(mask)))


def test_the_drop_shares_match_ten_and_fifty_percent_independently():
    """diffusion_loss with the decoder's conditions, on 20,000 rows: the shares of NaN (dropped) rows."""
    model = tiny_decoder(live_head=False, resolution=8, widths=(8,), attention_levels=())
    seen = {}

    def spy(x, t, image_embed, text=None):
        seen["embed"], seen["text"] = image_embed.isnan().all(1), text.flatten(1).isnan().all(1)
        return torch.zeros_like(x)

    model.diffusion.net.forward = spy
    n = 20_000
    batch = {"image": torch.zeros(n, 3, 8, 8), "image_embed": unit(1).expand(n, -1).clone(),
             "text": torch.zeros(n, 3, max(W, D))}
    model.diffusion.loss(batch, generator=torch.Generator().manual_seed(0))
    e, t = seen["embed"].float(), seen["text"].float()
    assert abs(e.mean().item() - 0.1) < 0.01 and abs(t.mean().item() - 0.5) < 0.015
    assert abs((e * t).mean().item() - 0.05) < 0.01, "each condition is dropped on its own"


# ----------------------------------------------------------------------------- 2. sampling, checkpoints, training

def test_decode_is_seeded_and_uses_the_caption(tiny_clip):
    model = tiny_decoder().bind(tiny_clip)
    z = unit(3)
    a = model.decode(tiny_clip, z, steps=3, seed=5)
    assert a.shape == (3, 3, 32, 32) and a.abs().max() <= 1
    assert torch.equal(a, model.decode(tiny_clip, z, steps=3, seed=5))
    assert not torch.equal(a, model.decode(tiny_clip, z, steps=3, seed=6))
    assert not torch.equal(a, model.decode(tiny_clip, z, CAPTIONS, steps=3, seed=5))
    b = model.decode(tiny_clip, z, CAPTIONS, guidance=2.0, guide="text", steps=3, seed=5)
    assert not torch.equal(b, model.decode(tiny_clip, z, CAPTIONS, guidance=2.0, guide="both", steps=3, seed=5))


def test_a_decoder_without_text_takes_no_caption(tiny_clip):
    model = tiny_decoder(use_text=False).bind(tiny_clip)
    assert set(model.diffusion.conditions) == {"image_embed"}
    assert model.decode(tiny_clip, unit(2), guidance=2.0, steps=2).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="no text pathway"):
        model.decode(tiny_clip, unit(3), CAPTIONS, steps=2)
    with pytest.raises(ValueError, match="nulls the caption, but this decoder has no text pathway"):
        model.decode(tiny_clip, unit(2), guidance=2.0, guide="text", steps=2)


def test_checkpoints_record_the_clip_they_need(tmp_path, tiny_clip):
    model = tiny_decoder().bind(tiny_clip)
    path = tmp_path / "decoder"
    save_model(model, path, kind="decoder")
    loaded = load_model(path, decoder.Decoder, expected_kind="decoder").eval()
    assert torch.equal(loaded.clip_id, clip_module.signature(tiny_clip))
    z = unit(2)
    assert torch.equal(loaded.decode(tiny_clip, z, steps=2), model.decode(tiny_clip, z, steps=2))
    torch.manual_seed(3)
    other = clip_module.CLIP(embed_dim=D, patch_size=8, image_width=32, image_layers=1, text_width=W, text_layers=1)
    with pytest.raises(ValueError, match="trained on another CLIP"):
        loaded.decode(other, z, steps=2)


def test_the_decoder_overfits_one_batch(batch):
    """One fixed draw of (t, noise, dropout) on 8 images: the network can memorise it."""
    model = tiny_decoder(live_head=False).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_at = lambda: model.diffusion.loss(batch, generator=torch.Generator().manual_seed(0))[0]
    first = loss_at().item()
    for _ in range(120):
        loss = loss_at()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_at().item() < 0.3 * first, (first, loss_at().item())


# ----------------------------------------------------------------------------- 3. the upsampler

def tiny_upsampler(**changes):
    torch.manual_seed(0)
    return live(upsampler.Upsampler(**{**dict(widths=(8, 16)), **changes})).eval()


def test_the_upsampler_is_convolutional_and_runs_at_32_and_64_px():
    model = tiny_upsampler()
    net = model.diffusion.net
    for size in (32, 64, 16):
        x, t = inputs(2, resolution=size)
        assert net(x, t, x.clone(), torch.tensor([0.0, 0.2])).shape == (2, 3, size, size)
    out = model.upsample(data.render(data.sample_scenes(2, "test", seed=0)), steps=2)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1


def test_the_noise_level_is_read():
    net = tiny_upsampler().diffusion.net
    x, t = inputs(2, resolution=32)
    with torch.no_grad():
        assert not torch.allclose(net(x, t, x, torch.tensor([0.0, 0.0])), net(x, t, x, torch.tensor([0.3, 0.3])))


def test_gaussian_blur_matches_torchvision_and_sigma_zero_is_the_identity():
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    sigma = torch.tensor([0.0, 0.6, 1.0])
    out = upsampler.gaussian_blur(images, sigma)
    torch.testing.assert_close(out[0], images[0])
    for i in (1, 2):
        radius = max(1, -(-3 * float(sigma.max()) // 1))
        ref = TF.gaussian_blur(images[i:i + 1], kernel_size=2 * int(radius) + 1, sigma=float(sigma[i]))
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean((2, 3)), images.mean((2, 3)), atol=0.05, rtol=0)   # a blur moves no mass


def test_corruption_levels_and_the_no_augmentation_variant():
    low = torch.rand(500, 3, 8, 8) * 2 - 1
    torch.manual_seed(0)
    corrupted, level = tiny_upsampler().corrupt(low)
    assert level.min() >= 0 and level.max() <= upsampler.MAX_NOISE and level.std() > 0.05
    clean, zero = tiny_upsampler(augment=False).corrupt(low)
    assert torch.equal(clean, low) and not zero.any()
    # the noise is as strong as the level says: residual std ~ level for the rows left unblurred
    residual = (corrupted - low).flatten(1).std(1)
    loud = level > 0.2
    assert (residual[loud] > 0.15).all()


def test_random_crops_cut_the_same_place_from_every_tensor():
    a = torch.arange(2 * 1 * 8 * 8, dtype=torch.float).view(2, 1, 8, 8)
    ca, cb = upsampler.random_crops([a, -a], 4, torch.Generator().manual_seed(0))
    assert ca.shape == (2, 1, 4, 4) and torch.equal(cb, -ca)
    loss, _ = upsampler.upsampler_loss(tiny_upsampler(crop=32).train(), {"image": torch.rand(2, 3, 64, 64) * 2 - 1})
    assert loss.isfinite()


# ----------------------------------------------------------------------------- 4. binding errors

@pytest.mark.parametrize("read, expected", [
    ([("circle", "red", "big"), ("square", "blue", "small")], False),     # right
    ([("circle", "blue", "big"), ("square", "red", "small")], True),      # colours swapped between the shapes
    ([("square", "red", "big"), ("circle", "blue", "small")], True),      # shapes swapped
    ([("circle", "red", "small"), ("square", "blue", "big")], True),      # sizes swapped
    ([("circle", "red", "big"), ("square", "green", "small")], False),    # a wrong colour is not a binding error
    ([("circle", "red", "big")], False),                                  # one object
])
def test_binding_errors_are_right_attributes_on_the_wrong_objects(read, expected):
    prompt = data.parse_caption("a big red circle to the left of a small blue square")
    rows = [[data.SHAPES.index(s), data.COLORS.index(c), data.SIZES.index(z), cell]
            for (s, c, z), cell in zip(read, (3, 5))]
    objects = torch.tensor(rows + [[-1] * 4] * (2 - len(rows)))
    assert scoreboard.binding_error(prompt, objects) is expected
