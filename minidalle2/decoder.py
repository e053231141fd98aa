"""
unCLIP's decoder (Ramesh et al., 2022, section 2.1): a CLIP image embedding -> an image. It is GLIDE (a
text-conditioned diffusion U-Net) with the CLIP image embedding added in two places:

    emb     = time_mlp(t) + cond_mlp(z)                       every ResBlock reads emb (FiLM): the embedding
                                                              steers the whole network, at every resolution
    context = [ W z -> 4 tokens ;  CLIP text token states ]   the attention layers (<= 8x8) attend to these
                                                              beside the image positions (GLIDE's encoder_kv)

    decoder = Decoder(embed_dim=64, text_width=128).bind(clip)
    loss, logs = decoder_loss(decoder, batch)          # batch: image, image_embed, text (prior.text_condition)
    images = decoder.decode(clip, clip.encode_image(real))            # (B, 3, 32, 32): "decode this embedding"
    images = decoder.decode(clip, z, captions, guidance=3.0, guide="both")

Classifier-free guidance with two conditions, as in the paper: in training the embedding is replaced by its
learned null 10% of the time and the caption 50% of the time, independently; the null covers every path the
condition enters (the part added to emb, the 4 tokens; a dropped caption becomes one learned null token).
At sampling, pred = pred_u + w (pred_c - pred_u), where pred_u nulls the conditions named by `guide`:

    "both" (default, the paper's): embedding and caption      "embed": the embedding only, the caption kept
    "text": the caption only, the embedding kept

The embedding is the CLIP's own unit-length image embedding; the checkpoint records which CLIP (clip.CLIPBound)
so that a decoder never draws from another CLIP's embeddings. The network and the sampler stay apart
(diffusion_model.DiffusionModel around DecoderNet); chapter 14 joins prior, decoder and upsampler.
"""

import math

import torch
from torch import nn

from .clip import CLIPBound
from .data import check_images
from .diffusion_model import SAMPLE_STEPS, DiffusionModel
from .prior import check_captions, split_text, text_condition
from .unet import UNet

P_DROP_EMBED = 0.1      # the paper's: the CLIP embedding is dropped for 10% of the training rows ...
P_DROP_TEXT = 0.5       # ... and the caption for 50%
EMBED_TOKENS = 4        # the embedding projected into 4 extra context tokens
GUIDES = {"both": ("image_embed", "text"), "embed": ("image_embed",), "text": ("text",)}
NORM_TOLERANCE = 1e-2   # a CLIP embedding is unit length; bfloat16 rounding stays well inside this


def check_embeddings(z, dim, who="Decoder"):
    """z: (B, dim) float CLIP image embeddings, each row unit length or all NaN (CFG's null); a clear error if not."""
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != dim or not z.is_floating_point():
        got = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"{who} expects CLIP image embeddings (B, {dim}) (float), got {got}"
                         + (f": this decoder reads a CLIP with embed_dim {dim}" if isinstance(z, torch.Tensor)
                            and z.ndim == 2 else ""))
    nan = z.isnan()
    dropped = nan.all(1)
    if (nan.any(1) & ~dropped).any():
        raise ValueError(f"{who}: embedding rows must be all finite or all NaN (= no embedding); some are partly NaN")
    norms = z[~dropped].float().norm(dim=1)
    if len(norms) and ((norms - 1).abs() > NORM_TOLERANCE).any():
        raise ValueError(f"{who} expects unit-length CLIP image embeddings (clip.encode_image returns them), got "
                         f"norms in [{norms.min().item():.3g}, {norms.max().item():.3g}]; normalise them first "
                         "(torch.nn.functional.normalize(z, dim=-1))")
    return dropped


class DecoderNet(nn.Module):
    """net(x_t, t, image_embed, text=None) -> prediction. image_embed: (B, D) CLIP image embeddings (NaN rows: dropped);
    text: prior.text_condition's tensor (B, L + 1, P), all-NaN rows: dropped; use_text=False: no text pathway."""

    def __init__(self, embed_dim=64, text_width=128, resolution=32, widths=(32, 64, 128), patch_size=2,
                 attention_levels=(1, 2), blocks_per_level=1, embed_tokens=EMBED_TOKENS, use_text=True,
                 dropout=0.0, num_timesteps=1000):
        super().__init__()
        widths = [int(w) for w in widths]
        self.config = dict(embed_dim=embed_dim, text_width=text_width, resolution=resolution, widths=widths,
                           patch_size=patch_size, attention_levels=list(attention_levels),
                           blocks_per_level=blocks_per_level, embed_tokens=embed_tokens, use_text=use_text,
                           dropout=dropout, num_timesteps=num_timesteps)
        self.embed_dim, self.text_width, self.use_text, self.n_tokens = embed_dim, text_width, use_text, embed_tokens
        width = widths[-1]                                                       # the context tokens' width
        self.unet = UNet(3, resolution, widths, blocks_per_level, attention_levels, num_classes=None,
                         cond_dim=embed_dim, patch_size=patch_size, dropout=dropout, num_timesteps=num_timesteps,
                         context_dim=width)
        self.embed_tokens = nn.Linear(embed_dim, embed_tokens * width)          # z -> 4 tokens
        self.null_tokens = nn.Parameter(torch.randn(embed_tokens, width) * 0.02)
        if use_text:
            self.text_in = nn.Linear(text_width, width)
            self.null_text = nn.Parameter(torch.randn(width) * 0.02)            # "no caption": one learned token
        self.context_norm = nn.LayerNorm(width)

    def forward(self, x, t, image_embed, text=None):
        embed = image_embed
        dropped = check_embeddings(embed, self.embed_dim, "DecoderNet")
        # unit vectors have coordinates ~ 1/sqrt(D): scaled to unit variance before the linear maps
        z = torch.where(dropped[:, None], 0.0, embed.float()) * math.sqrt(self.embed_dim)
        tokens = self.embed_tokens(z.to(x.dtype)).view(len(x), self.n_tokens, -1)
        tokens = torch.where(dropped[:, None, None], self.null_tokens.to(tokens.dtype), tokens)
        cond = torch.where(dropped[:, None], float("nan"), z)                  # the UNet's own null for emb
        mask = torch.ones(len(x), self.n_tokens, dtype=torch.bool, device=x.device)
        if self.use_text:
            if text is None:
                raise ValueError("this decoder reads captions (use_text=True): give text (prior.text_condition), "
                                 "or its null (diffusion.null_condition) for none")
            states, token_mask, _, no_text = split_text(text, self.text_width, self.embed_dim)
            words = self.text_in(states.to(x.dtype))
            null = self.null_text.to(words.dtype).expand(len(x), 1, -1)
            tokens = torch.cat([tokens, null, words], 1)
            mask = torch.cat([mask, no_text[:, None], token_mask & ~no_text[:, None]], 1)
        elif text is not None:
            raise ValueError("this decoder was built without a text pathway (use_text=False): leave text=None")
        return self.unet(x, t, cond=cond, context=self.context_norm(tokens), context_mask=mask)


class Decoder(CLIPBound, nn.Module):
    """DiffusionModel(DecoderNet) with the two conditions "image_embed" (dropped p_drop_embed) and "text" (dropped
    p_drop_text), bound to the CLIP it is trained on. decode() draws images from CLIP image embeddings."""

    def __init__(self, embed_dim=64, text_width=128, resolution=32, widths=(32, 64, 128), patch_size=2,
                 attention_levels=(1, 2), blocks_per_level=1, embed_tokens=EMBED_TOKENS, use_text=True, dropout=0.0,
                 p_drop_embed=P_DROP_EMBED, p_drop_text=P_DROP_TEXT, schedule="cosine", T=1000, prediction="v",
                 weighting="min_snr"):
        super().__init__()
        net = DecoderNet(embed_dim, text_width, resolution, widths, patch_size, attention_levels, blocks_per_level,
                         embed_tokens, use_text, dropout, T)
        self.config = dict(net.config, p_drop_embed=p_drop_embed, p_drop_text=p_drop_text, schedule=schedule, T=T,
                           prediction=prediction, weighting=weighting)
        del self.config["num_timesteps"]
        self.embed_dim, self.text_width, self.use_text, self.resolution = embed_dim, text_width, use_text, resolution
        conditions = {"image_embed": p_drop_embed, **({"text": p_drop_text} if use_text else {})}
        self.diffusion = DiffusionModel(net, (3, resolution, resolution), schedule, T, prediction, weighting,
                                        conditions=conditions)
        self.register_clip_id()

    def conditions(self, clip, embeds, captions=None):
        """The network's conditions for `embeds` (B, D) and optional captions: {"image_embed", "text"}, the text's rows
        nulled where there is no caption (captions=None: none at all)."""
        dropped = check_embeddings(embeds, self.embed_dim, "Decoder.decode")
        if dropped.any():
            raise ValueError("Decoder.decode: embeddings must be finite; the unconditional rows are the guidance's job")
        conds = {"image_embed": embeds.float()}
        if not self.use_text:
            if captions is not None:
                raise ValueError("this decoder has no text pathway (use_text=False): leave captions=None")
            return conds
        if captions is None:    # every caption nulled: text_condition's shape, all NaN
            text = torch.full((len(embeds), clip.context_length + 1, max(self.text_width, self.embed_dim)), float("nan"))
        else:
            captions = check_captions(captions, clip.tokenize)
            if len(captions) != len(embeds):
                raise ValueError(f"got {len(embeds)} embeddings but {len(captions)} captions; give one caption per "
                                 "embedding (or captions=None)")
            states, mask, pooled = clip.text_states(captions, with_embedding=True)
            text = text_condition(states, mask, pooled)
        return {**conds, "text": text.cpu()}

    @torch.no_grad()
    def decode(self, clip, embeds, captions=None, guidance=None, guide="both", steps=SAMPLE_STEPS, eta=None, seed=0,
               batch_size=500, progress=False, x_T=None):
        """Images (B, 3, R, R) in [-1, 1] drawn from CLIP image embeddings (B, D) (and their captions, if given),
        with DDIM (`steps`, `eta`; DiffusionModel.generate's defaults) and CFG scale `guidance` (None or 1:
        conditional) nulling the conditions named by `guide` (see the module docstring). x_T: the starting noise
        (B, 3, R, R) instead of the seed's (invert()'s, or one noise held fixed across embeddings)."""
        conds, null = self._guided(clip, embeds, captions, guide)
        return self.diffusion.generate(len(embeds), cond=conds, guidance=None if guidance in (None, 1) else guidance,
                                       null=null, steps=steps, eta=eta, seed=seed, batch_size=batch_size,
                                       progress=progress, x_T=x_T)

    @torch.no_grad()
    def invert(self, clip, images, embeds=None, captions=None, guidance=None, guide="both", steps=SAMPLE_STEPS):
        """DDIM inversion (diffusion.ddim_invert): the noise x_T (B, 3, R, R) from which decode(clip, embeds, captions,
        guidance, guide, steps, eta=0, x_T=x_T) returns to `images`. embeds: default the images' own CLIP embeddings."""
        images = check_images(images, channels=(3,), name="images to invert")
        if images.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"this decoder inverts {self.resolution}x{self.resolution} images, got "
                             f"{tuple(images.shape[-2:])}; resize them first (data.downsample)")
        if embeds is None:
            self.check_clip(clip)
            embeds = clip.encode_image(images.to(clip.device)).float().cpu()
        conds, null = self._guided(clip, embeds, captions, guide)
        if len(embeds) != len(images):
            raise ValueError(f"got {len(images)} images but {len(embeds)} embeddings; give one embedding per image")
        return self.diffusion.invert(images.to(self.clip_id.device), cond=conds,
                                     guidance=None if guidance in (None, 1) else guidance, null=null, steps=steps).cpu()

    def _guided(self, clip, embeds, captions, guide):
        """(the conditions on this decoder's device, the names the unconditional pass nulls), all checked."""
        self.check_clip(clip)
        if guide not in GUIDES:
            raise ValueError(f"unknown guidance mode guide={guide!r}: choose one of {sorted(GUIDES)} (the "
                             "conditions the unconditional pass nulls)")
        null = tuple(name for name in GUIDES[guide] if name in self.diffusion.conditions)
        if not null:
            raise ValueError(f"guide={guide!r} nulls the caption, but this decoder has no text pathway")
        device = self.clip_id.device
        return {k: v.to(device) for k, v in self.conditions(clip, embeds, captions).items()}, null

    def forward(self, x_t, t, **conditions):
        return self.diffusion(x_t, t, **conditions)


def decoder_loss(model, batch):
    """The diffusion loss of the decoder on batch["image"], conditioned on batch["image_embed"] (the image's own CLIP
    embedding) and batch["text"], each dropped at its own rate (DiffusionModel.loss)."""
    return model.diffusion.loss(batch)
