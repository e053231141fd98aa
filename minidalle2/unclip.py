"""
unCLIP, the whole pipeline (Ramesh et al., 2022): inference only, like a diffusers pipeline -- it joins models
trained elsewhere (chapters 07, 12, 13) and trains nothing.

    caption --CLIP text encoder--> (tokens (L, W), text embedding z_t (D))
            --prior-------------->  image embedding z_i (D)        best-of-2 candidates, the one nearest z_t
            --decoder------------>  32x32 image                     CFG on the embedding and the caption
            --upsampler---------->  64x64 image                     its input noised at a known level

    pipe = UnCLIP(clip, prior, decoder, upsampler)                   # recipes.unclip.load_unclip("cpu") loads all four
    images = pipe(["a big red circle above a small blue square"], n=4)             # (4, 3, 64, 64) in [-1, 1]
    stages = pipe.generate(captions, n=4, return_stages=True)        # every stage's output and its seconds

What only a model with a CLIP-embedding bottleneck can do (section 3 of the paper):

    pipe.variations(images, n=4)                        same embedding, fresh noise: what the embedding keeps
    pipe.variations(images, n=4, invert=True, eta=0.5)  the "bipartite" latent: DDIM-invert the decoder for the
                                                        image's own noise x_T, then decode with eta > 0
    pipe.interpolate(a, b, frames=9)                    slerp(z_a, z_b, s), one starting noise along the path
    pipe.text_diff(images, "a red circle", "a blue circle", thetas=(0, .25, .5))
                                                        z = slerp(z_i, normalize(z_t(target) - z_t(source)), theta),
                                                        decoded from the image's inverted noise
"""

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import data
from .clip import encode_images
from .decoder import Decoder, check_embeddings
from .prior import ARPrior, DiffusionPrior, Prior, check_captions
from .upsampler import Upsampler

# the defaults, each from its chapter's cpu sweep (results/prior_cpu.json, results/decoder_cpu.json)
BEST_OF = 2               # the paper's; best-of-4 bought nothing over it (kNN accuracy 76.4% vs 77.0%) for twice the time
PRIOR_GUIDANCE = 1.0      # guiding the prior collapsed its diversity for no accuracy (as the paper found)
DECODER_GUIDANCE = 2.0    # the decoder's best caption accuracy; validity and diversity fall above it
DECODER_STEPS = 50
UPSAMPLER_NOISE = 0.1     # the level the augmented upsampler is told at sampling
UPSAMPLER_STEPS = 16
VARIATION_ETA = 0.5       # decoding an inverted noise with eta > 0: close to the image, yet not a copy
MAX_THETA = 1.0           # slerp's fraction: 0 is the image's embedding, 1 the direction itself


def slerp(a, b, s):
    """Spherical interpolation between unit vectors a, b (..., D) at fractions s (a float or a 1-D tensor (K,);
    then the result gains a leading K axis):

        slerp(a, b, s) = sin((1 - s) omega) / sin(omega) a + sin(s omega) / sin(omega) b,   cos(omega) = <a, b>

    the great-circle path: every point is unit length, as CLIP embeddings are. Parallel ends fall back to a lerp."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"slerp expects two unit-vector tensors of one shape (..., D), got "
                         f"{getattr(a, 'shape', type(a).__name__)} and {getattr(b, 'shape', type(b).__name__)}")
    batched = isinstance(s, torch.Tensor) and s.ndim == 1
    s = torch.as_tensor(s, dtype=torch.float32)
    if s.ndim > 1 or not torch.isfinite(s).all():
        raise ValueError(f"slerp's fractions must be a number or a 1-D tensor of finite numbers, got {s}")
    s = s.view(-1, *[1] * a.ndim) if batched else s
    a, b = a.float(), b.float()
    cos = (a * b).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    small = sin.abs() < 1e-6                     # (anti)parallel: the plane of the arc is undefined
    safe = torch.where(small, torch.ones_like(sin), sin)
    out = (torch.sin((1 - s) * omega) * a + torch.sin(s * omega) * b) / safe
    return torch.where(small, (1 - s) * a + s * b, out)


def text_diff_direction(text_from, text_to):
    """The paper's text diff: the normalised difference of two captions' CLIP text embeddings (B, D) -> (B, D)."""
    if text_from.shape != text_to.shape:
        raise ValueError(f"the two text embeddings differ in shape: {tuple(text_from.shape)} and {tuple(text_to.shape)}")
    diff = text_to.float() - text_from.float()
    if (diff.norm(dim=-1) < 1e-6).any():
        raise ValueError("the two captions have the same CLIP text embedding: there is no direction between them")
    return F.normalize(diff, dim=-1)


def check_thetas(thetas, maximum=MAX_THETA):
    """thetas: a non-empty sequence of numbers in [0, maximum] -> a float tensor (K,)."""
    values = torch.as_tensor(thetas, dtype=torch.float32).reshape(-1) if not isinstance(thetas, str) else None
    if values is None or not len(values) or not torch.isfinite(values).all() or (values < 0).any() \
            or (values > maximum).any():
        raise ValueError(f"theta must be numbers in [0, {maximum}] (the slerp fraction from the image's embedding "
                         f"towards the text direction; the paper goes up to ~0.5), got {thetas!r}")
    return values


@dataclass
class Stages:
    """What generate(..., return_stages=True) returns: every stage's output, in pipeline order, and its seconds."""
    captions: list
    text_embed: torch.Tensor          # (B * n, D) the captions' CLIP text embeddings
    image_embed: torch.Tensor         # (B * n, D) the prior's image embeddings
    low_res: torch.Tensor             # (B * n, 3, 32, 32) the decoder's images
    images: torch.Tensor              # (B * n, 3, 64, 64) the upsampler's (= low_res without an upsampler)
    seconds: dict = field(default_factory=dict)


class UnCLIP:
    """clip -> prior -> decoder -> upsampler (optional): the models must share one CLIP (each records its signature)
    and the upsampler must enlarge the decoder's resolution. Every knob of generate() has the default its chapter
    chose; see the module docstring for the manipulations."""

    def __init__(self, clip, prior, decoder, upsampler=None):
        if not isinstance(prior, Prior):
            raise ValueError(f"prior must be a minidalle2.prior.Prior (DiffusionPrior, ARPrior, ...), got "
                             f"{type(prior).__name__}")
        if not isinstance(decoder, Decoder):
            raise ValueError(f"decoder must be a minidalle2.decoder.Decoder, got {type(decoder).__name__}")
        if upsampler is not None and not isinstance(upsampler, Upsampler):
            raise ValueError(f"upsampler must be a minidalle2.upsampler.Upsampler or None, got {type(upsampler).__name__}")
        for name, model in (("prior", prior), ("decoder", decoder)):
            try:
                model.check_clip(clip)
            except ValueError as e:
                raise ValueError(f"the {name} does not belong to this CLIP (are the models from different presets?): "
                                 f"{e}") from None
        if upsampler is not None and upsampler.low != decoder.resolution:
            raise ValueError(f"the upsampler enlarges {upsampler.low}-px images but the decoder draws "
                             f"{decoder.resolution}-px ones (are the models from different presets?)")
        self.clip, self.prior, self.decoder, self.upsampler = clip, prior, decoder, upsampler
        self.resolution = upsampler.high if upsampler is not None else decoder.resolution

    def __call__(self, captions, n=4, **options):
        return self.generate(captions, n, **options)

    # ------------------------------------------------------------------------- text -> image

    def check_captions(self, captions):
        """A caption or a list of them, each non-empty, of words the models know, short enough for the CLIP."""
        captions = [captions] if isinstance(captions, str) else captions
        return check_captions(captions, self.clip.tokenize)

    @torch.no_grad()
    def generate(self, captions, n=4, seed=0, best_of=BEST_OF, prior_guidance=PRIOR_GUIDANCE, prior_steps=None,
                 decoder_guidance=DECODER_GUIDANCE, guide="both", use_captions=True, decoder_steps=DECODER_STEPS,
                 upsample=True, noise_level=UPSAMPLER_NOISE, upsampler_steps=UPSAMPLER_STEPS, rerank=1,
                 return_stages=False):
        """n images per caption, caption by caption: (B * n, 3, 64, 64) in [-1, 1] (32 px if upsample=False or there
        is no upsampler). use_captions: the decoder also reads the caption (its text pathway), as in the paper.
        prior_steps: the diffusion prior's DDIM steps (default: its own, prior.SAMPLE_STEPS). rerank=k: draw k
        candidates (embedding and image) for every image and keep the one whose CLIP image embedding is closest to
        the caption's text embedding (DALL-E's reranking, by the CLIP the models share; k times the cost)."""
        captions = self.check_captions(captions)
        for name, value in (("n", n), ("rerank", rerank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of images per caption, got {value!r}")
        seed = data.check_seed(seed)
        rows = [c for c in captions for _ in range(n)]
        candidates = [c for c in rows for _ in range(rerank)]
        seconds = {}
        start = time.perf_counter()
        text_embed = self.clip.encode_text(rows).float().cpu()
        seconds["clip"] = time.perf_counter() - start
        start = time.perf_counter()
        image_embed = self.prior.sample(self.clip, candidates, seed=seed,
                                        **self._prior_options(best_of, prior_guidance, prior_steps))
        seconds["prior"] = time.perf_counter() - start
        start = time.perf_counter()
        low = self.decoder.decode(self.clip, image_embed, candidates if use_captions and self.decoder.use_text else None,
                                  guidance=decoder_guidance, guide=guide, steps=decoder_steps, seed=seed)
        seconds["decoder"] = time.perf_counter() - start
        if rerank > 1:
            start = time.perf_counter()
            scores = (self.encode_image(low) * text_embed.repeat_interleave(rerank, 0)).sum(-1).view(len(rows), rerank)
            keep = torch.arange(len(rows)) * rerank + scores.argmax(1)
            low, image_embed = low[keep], image_embed[keep]
            seconds["rerank"] = time.perf_counter() - start
        images = low
        if upsample and self.upsampler is not None:
            start = time.perf_counter()
            images = self.upsampler.upsample(low, noise_level=noise_level, steps=upsampler_steps, seed=seed)
            seconds["upsampler"] = time.perf_counter() - start
        if return_stages:
            return Stages(rows, text_embed, image_embed, low, images, seconds)
        return images

    def _prior_options(self, best_of, guidance, steps):
        if steps is not None and not isinstance(self.prior, DiffusionPrior):
            raise ValueError(f"prior_steps is the diffusion prior's; this pipeline's prior is a {type(self.prior).__name__}")
        if isinstance(self.prior, (DiffusionPrior, ARPrior)):
            return {"best_of": best_of, "guidance": guidance, **({"steps": steps} if steps is not None else {})}
        return {}   # the regressor and the "no prior" rows have no knobs

    # ------------------------------------------------------------------------- image -> embedding -> images

    def _low_res(self, images, who):
        """Images the decoder can read: at its resolution, or the upsampler's output size (area-downsampled)."""
        images = data.check_images(images, channels=(3,), name=who)
        size = images.shape[-1]
        if images.shape[-2] == size and size == self.decoder.resolution:
            return images
        if self.upsampler is not None and images.shape[-2] == size == self.upsampler.high:
            return data.downsample(images, self.decoder.resolution)
        sizes = sorted({self.decoder.resolution, self.resolution})
        raise ValueError(f"{who}: expected square RGB images of {' or '.join(f'{s}x{s}' for s in sizes)} pixels, got "
                         f"{tuple(images.shape[-2:])}")

    def encode_image(self, images, who="images"):
        """(B, D) CLIP image embeddings of images at the decoder's (or the pipeline's output) resolution."""
        return encode_images(self.clip, self._low_res(images, who))

    def _finish(self, low, upsample, seed):
        if upsample and self.upsampler is not None:
            return self.upsampler.upsample(low, noise_level=UPSAMPLER_NOISE, steps=UPSAMPLER_STEPS, seed=seed)
        return low

    def decode_embeddings(self, embeds, seed=0, guidance=DECODER_GUIDANCE, x_T=None, eta=0.0, upsample=True,
                          steps=DECODER_STEPS):
        """Unit CLIP image embeddings (B, D) -> images, no caption: the step every manipulation ends with."""
        check_embeddings(embeds, self.decoder.embed_dim, "UnCLIP")
        low = self.decoder.decode(self.clip, embeds, guidance=guidance, steps=steps, eta=eta, seed=seed, x_T=x_T)
        return self._finish(low, upsample, seed)

    @torch.no_grad()
    def invert(self, images, guidance=DECODER_GUIDANCE, steps=DECODER_STEPS):
        """DDIM inversion of the decoder: the noise (B, 3, 32, 32) from which decoding the images' own embeddings
        with eta = 0 (same guidance and steps) draws the images again."""
        low = self._low_res(images, "images to invert")
        return self.decoder.invert(self.clip, low, self.encode_image(low), guidance=guidance, steps=steps)

    @torch.no_grad()
    def variations(self, images, n=4, seed=0, invert=False, eta=None, guidance=DECODER_GUIDANCE, upsample=True):
        """n variations of each image (B * n images, image by image): its CLIP embedding decoded again. invert=False:
        fresh noise (DDIM, eta = 0); invert=True: the image's own inverted noise decoded with eta (default
        VARIATION_ETA) > 0, so that the n differ only by the sampler's noise."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive number of variations per image, got {n!r}")
        low = self._low_res(images, "images for variations")
        z = self.encode_image(low).repeat_interleave(n, 0)
        x_T = self.decoder.invert(self.clip, low, z[::n], guidance=guidance).repeat_interleave(n, 0) if invert else None
        eta = (VARIATION_ETA if invert else 0.0) if eta is None else eta
        # one draw for the whole batch: the copies of an image get different noise (fresh, or the sampler's with eta)
        return self.decode_embeddings(z, seed=seed, guidance=guidance, eta=eta, upsample=upsample, x_T=x_T)

    @torch.no_grad()
    def interpolate(self, images_a, images_b, frames=9, seed=0, guidance=DECODER_GUIDANCE, upsample=True):
        """(B, frames, 3, R, R): decodings of slerp(z_a, z_b, s), s = 0 .. 1 in `frames` steps, each path from one
        starting noise (the seed's), so that only the embedding changes along it."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an int >= 2 (the path's two ends included), got {frames!r}")
        za, zb = self.encode_image(images_a, "images_a"), self.encode_image(images_b, "images_b")
        if za.shape != zb.shape:
            raise ValueError(f"give as many images_b as images_a, got {len(za)} and {len(zb)}")
        path = slerp(za, zb, torch.linspace(0, 1, frames))                        # (frames, B, D)
        g = torch.Generator().manual_seed(data.check_seed(seed))
        noise = torch.randn(len(za), 3, self.decoder.resolution, self.decoder.resolution, generator=g)
        x_T = noise.repeat(frames, 1, 1, 1)                                       # the same noise at every frame
        out = self.decode_embeddings(path.flatten(0, 1), seed=seed, guidance=guidance, x_T=x_T, upsample=upsample)
        return out.view(frames, len(za), *out.shape[1:]).transpose(0, 1)

    @torch.no_grad()
    def text_diff(self, images, source, target, thetas=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5), guidance=DECODER_GUIDANCE,
                  invert=True, seed=0, upsample=True):
        """(B, K, 3, R, R): each image moved towards the caption change source -> target (one caption each, or one
        for all), z_theta = slerp(z_i, normalize(z_t(target) - z_t(source)), theta) for the K thetas, decoded from
        the image's inverted noise (invert=True, as in the paper; theta = 0 then gives the image back)."""
        thetas = check_thetas(thetas)
        low = self._low_res(images, "images to edit")
        B = len(low)
        sources, targets = ([c] * B if isinstance(c, str) else list(c) for c in (source, target))
        if len(sources) != B or len(targets) != B:
            raise ValueError(f"give one source and one target caption for all images, or one per image ({B}), got "
                             f"{len(sources)} and {len(targets)}")
        self.check_captions(sources + targets)
        direction = text_diff_direction(self.clip.encode_text(sources).float().cpu(),
                                        self.clip.encode_text(targets).float().cpu())
        z_image = self.encode_image(low)
        z = slerp(z_image, direction, thetas)                                      # (K, B, D)
        if invert:   # the image's own noise, from the embedding already at hand
            x_T = self.decoder.invert(self.clip, low, z_image, guidance=guidance).repeat(len(thetas), 1, 1, 1)
        else:
            g = torch.Generator().manual_seed(data.check_seed(seed))
            x_T = torch.randn(B, *low.shape[1:], generator=g).repeat(len(thetas), 1, 1, 1)
        out = self.decode_embeddings(z.flatten(0, 1), seed=seed, guidance=guidance, x_T=x_T, upsample=upsample)
        return out.view(len(thetas), B, *out.shape[1:]).transpose(0, 1)
