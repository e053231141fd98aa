"""
CLIP (Radford et al., 2021): a text encoder and an image encoder trained so that a caption and
its image land on the same point of one shared embedding space. DALL-E reranks its samples with
it, and unCLIP is built on it: the prior maps a CLIP text embedding to a CLIP image embedding,
the decoder draws an image from that. Once trained, both encoders are frozen.

    model = CLIP(**MODEL["cpu"])                        # a tiny open_clip.CLIP, random weights
    t = model.encode_text(["a big red circle at the top left"])   # (1, D), unit length
    v = model.encode_image(images)                      # (B, 3, 32, 32) in [-1, 1] -> (B, D), unit length
    states, mask = model.text_states(captions)          # (B, T, W) per-token states, for unCLIP's prior
    loss, logs = clip_loss(model, batch)                # the contrastive objective, via open_clip's ClipLoss
    clip = load_pretrained("ViT-B-32", "weights.safetensors")   # real open_clip weights, same interface

The objective. For a batch of N (image, caption) pairs with unit embeddings v_i and t_j and a
learned temperature tau (stored as logit_scale = log(1/tau)):

    logits_ij = <v_i, t_j> / tau                    the N x N similarity matrix, pairs on the diagonal
    L = 1/2 [ CE(logits, diag) + CE(logits^T, diag) ]   image -> text and text -> image (InfoNCE)

Every other caption of the batch is a negative for image i, and every other image a negative for
caption j. What the field learned, kept here: L2-normalised features (cosine similarity); tau
learned, initialised at 0.07 (logit_scale = log(1/0.07)) and clamped so that 1/tau <= 100 (else it
grows until training is unstable); no weight decay on gains, biases and the temperature (train.py
decays only matrices); linear warm-up then cosine decay of the learning rate.

The model is open_clip's own CLIP class at toy scale: a ViT with 8x8 patches over 32x32 images
(a 4x4 grid of patches + a class token) and a causal text transformer, with open_clip's BPE
tokenizer (its 49,408-token vocabulary ships inside the package). At text width 128 that vocabulary
is 6.3M of the cpu model's 7.6M parameters, though Shapes captions use only 32 tokens. We keep it:
measured on this 2-core machine (batch 256, one thread), a step took 3.71 s with it and 3.65 s with
a 64-token vocabulary (AdamW update 67 vs 13 ms): ~60 ms, under 10% of the cpu model's ~0.8 s step.
In exchange any English prompt tokenizes, and real open_clip weights drop into the same interface.

Captions longer than the context (24 tokens; Shapes captions take at most 15) are truncated,
with a warning, the way CLIP does it (the end-of-text token is kept last).
"""

import hashlib
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .layers import expect_images, in_batches

INIT_LOGIT_SCALE = math.log(1 / 0.07)   # tau = 0.07 at the start (CLIP)
MAX_LOGIT_SCALE = math.log(100)         # 1 / tau <= 100
CONTEXT_LENGTH = 24                     # tokens, start and end included; Shapes captions need <= 15

_TOKENIZER = None


def tokenizer():
    """open_clip's BPE tokenizer (its vocabulary file ships inside the package: no download)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from open_clip.tokenizer import SimpleTokenizer
        _TOKENIZER = SimpleTokenizer()
    return _TOKENIZER


def _check_captions(captions, who):
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        raise TypeError(f"{who} expects a list of caption strings, got {type(captions).__name__}")
    if len(captions) == 0:
        raise ValueError(f"{who} got an empty list of captions; give at least one")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{who}: caption {bad[0]} is a {type(captions[bad[0]]).__name__}, not a string")
    return list(captions)


def tokenize(captions, context_length=CONTEXT_LENGTH, tok=None, who="tokenize"):
    """Captions -> token ids (B, context_length): [start, BPE tokens..., end, 0 padding].
    A caption with more tokens than fit is truncated (end token kept) with a warning."""
    captions = _check_captions(captions, who)
    tok = tok or tokenizer()
    if hasattr(tok, "encode"):
        too_long = [(c, n + 2) for c in captions if (n := len(tok.encode(c))) + 2 > context_length]
        if too_long:
            c, n = too_long[0]
            warnings.warn(f"{who}: {len(too_long)} caption(s) longer than the context of {context_length} "
                          f"tokens were truncated, e.g. {c!r:.80} ({n} tokens)", stacklevel=3)
    return tok(captions, context_length=context_length)


# ----------------------------------------------------------------------------- the objective

def contrastive_logits(image_features, text_features, logit_scale):
    """logits[i, j] = exp(logit_scale)-scaled cosine of image i and caption j (features unit length)."""
    return logit_scale * image_features @ text_features.T


def contrastive_loss(image_features, text_features, logit_scale):
    """The symmetric InfoNCE loss, written out: matching pairs sit on the diagonal.
    logit_scale here is the multiplier 1/tau (already exponentiated), as open_clip's ClipLoss takes it."""
    logits = contrastive_logits(image_features, text_features, logit_scale)   # (N, N): rows images
    labels = torch.arange(len(logits), device=logits.device)                  # pair i is column i
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def clip_loss(model, batch):
    """The training loss: open_clip's ClipLoss on the batch's (image, caption) pairs."""
    from open_clip.loss import ClipLoss
    if model.training:  # open_clip clamps after every optimizer step; clamping before each one is the same
        with torch.no_grad():
            model.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    tokens = model.tokenize(batch["caption"]).to(batch["image"].device)
    image_features = model.model.encode_image(batch["image"], normalize=True)
    text_features = model.model.encode_text(tokens, normalize=True)
    scale = model.logit_scale
    loss = ClipLoss()(image_features, text_features, scale)
    with torch.no_grad():  # in-batch accuracy of image -> text: how often the diagonal wins its row
        logits = contrastive_logits(image_features.float(), text_features.float(), 1.0)
        acc = (logits.argmax(1) == torch.arange(len(logits), device=logits.device)).float().mean()
    return loss, {"logit_scale": scale.detach(), "batch_accuracy": acc}


# ----------------------------------------------------------------------------- the encoders

class Encoders(nn.Module):
    """The interface later chapters use, around any open_clip model in `self.model`:
    tokenize, encode_text, encode_image, text_states, logit_scale, logits. Subclasses say how images
    are prepared (`prepare_images`)."""

    def __init__(self, model, tok, context_length):
        super().__init__()
        self.model, self._tok, self.context_length = model, tok, context_length

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def logit_scale(self):
        """1 / tau, clamped to [1, 100]."""
        return self.model.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()

    def tokenize(self, captions):
        return tokenize(captions, self.context_length, self._tok, f"{type(self).__name__}.tokenize")

    def prepare_images(self, images):
        raise NotImplementedError

    def encode_image(self, images):
        """Images (B, 3, R, R) in [-1, 1] -> (B, D) unit-length embeddings."""
        x = self.prepare_images(images).to(self.device)
        return self.model.encode_image(x, normalize=True).float()

    def encode_text(self, captions):
        """Captions (list of str) -> (B, D) unit-length embeddings."""
        return self.text_states(captions, with_embedding=True)[2]

    def text_states(self, captions, with_embedding=False):
        """Per-token states of the text transformer's last layer (after its final LayerNorm), (B, T, W),
        and a mask (B, T), True from the start token to the end token (the rest is padding).
        The embedding is the end token's state, projected and normalised (with_embedding=True: also returned)."""
        tokens = self.tokenize(captions).to(self.device)
        tower = self.model.text if hasattr(self.model, "text") else self.model  # CustomTextCLIP vs CLIP
        seen = []
        hook = tower.ln_final.register_forward_hook(lambda module, inputs, out: seen.append(out))
        try:
            embedding = self.model.encode_text(tokens, normalize=True).float()
        finally:
            hook.remove()
        eot = getattr(self._tok, "eot_token_id", None)
        end = (tokens == eot).int().argmax(1) if eot is not None else tokens.argmax(1)  # CLIP: end = largest id
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= end[:, None]
        return (seen[0].float(), mask, embedding) if with_embedding else (seen[0].float(), mask)

    def forward(self, images, captions):
        """The contrastive logits (B_images, B_captions): 1/tau times cosine similarity."""
        return contrastive_logits(self.encode_image(images), self.encode_text(captions), self.logit_scale)

    logits = forward


class CLIP(Encoders):
    """A tiny CLIP built by open_clip: ViT image tower over 32x32 images, causal text transformer."""

    def __init__(self, embed_dim=64, patch_size=8, image_width=128, image_layers=4, text_width=128,
                 text_layers=2, head_width=32, context_length=CONTEXT_LENGTH, resolution=32):
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg
        resnet = isinstance(image_layers, (list, tuple))   # open_clip's convention: a tuple of stages = ResNet
        if resnet and (len(image_layers) != 4 or resolution % 32):
            raise ValueError(f"a ResNet image tower takes 4 stages and a resolution divisible by 32, got "
                             f"image_layers={image_layers}, resolution={resolution}")
        if not resnet and resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not a multiple of patch_size {patch_size}")
        if (not resnet and image_width % head_width) or text_width % head_width:
            raise ValueError(f"widths ({image_width}, {text_width}) must be multiples of head_width {head_width}")
        vision = CLIPVisionCfg(layers=tuple(image_layers) if resnet else image_layers, width=image_width,
                               head_width=head_width, patch_size=patch_size, image_size=resolution)
        text = CLIPTextCfg(context_length=context_length, vocab_size=tokenizer().vocab_size, width=text_width,
                           heads=text_width // head_width, layers=text_layers)
        super().__init__(open_clip.CLIP(embed_dim, vision, text, init_logit_scale=INIT_LOGIT_SCALE),
                         tokenizer(), context_length)
        self.config = dict(embed_dim=embed_dim, patch_size=patch_size, image_width=image_width,
                           image_layers=list(image_layers) if resnet else image_layers, text_width=text_width, text_layers=text_layers,
                           head_width=head_width, context_length=context_length, resolution=resolution)
        self.embed_dim, self.resolution = embed_dim, resolution

    def prepare_images(self, images):
        images = expect_images(images, 3, self.resolution, "CLIP.encode_image")  # trained on [-1, 1] as is
        # NaN gives NaN embeddings and 0-255 pixels meaningless ones: one min/max per batch refuses both
        data.check_pixel_range(images, slack=0.05, name="CLIP.encode_image images")  # the oracle's slack
        return images


class PretrainedCLIP(Encoders):
    """Any open_clip model (e.g. real OpenAI / LAION weights) behind the same interface. Shapes images
    (B, 3, R, R) in [-1, 1] are resized to the model's input size and normalised its way."""

    def __init__(self, model, tok=None, context_length=None):
        import open_clip
        tok = tok or open_clip.get_tokenizer("ViT-B-32")
        super().__init__(model, tok, context_length or getattr(tok, "context_length", None) or 77)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.register_buffer("mean", torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1), False)
        self.embed_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else None

    def prepare_images(self, images):
        images = data.check_images(images, channels=(3,), name="PretrainedCLIP.encode_image images")
        x = (images + 1) / 2                                          # [-1, 1] -> [0, 1], any size
        x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (x.to(self.mean.device) - self.mean) / self.std


def signature(clip):
    """16 bytes that identify a CLIP's weights (its text and image projections): a model trained on one CLIP's
    embeddings (a prior, a decoder) records it, since those embeddings mean nothing in another CLIP's space."""
    m = clip.model
    parts = [m.text_projection, getattr(m.visual, "proj", None), m.logit_scale]
    h = hashlib.sha256()
    for p in parts:
        if p is not None:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return torch.tensor(list(h.digest()[:16]), dtype=torch.uint8)


class CLIPBound:
    """For an nn.Module that reads one frozen CLIP's embeddings and text (unCLIP's prior and decoder): the CLIP's
    signature in a buffer `clip_id` (so it is saved with the weights), bind(clip) to record it, check_clip(clip)
    to refuse another. The module sets self.embed_dim and self.text_width and calls register_clip_id()."""

    def register_clip_id(self):
        self.register_buffer("clip_id", torch.zeros(16, dtype=torch.uint8))   # all zero: not bound yet

    def bind(self, clip):
        """Record the CLIP this model is trained on (its dimensions must fit)."""
        self._check_dims(clip)
        self.clip_id.copy_(signature(clip))
        return self

    def _check_dims(self, clip):
        width = clip.model.text_projection.shape[0] if hasattr(clip.model, "text_projection") else None
        if clip.embed_dim != self.embed_dim or (width is not None and width != self.text_width):
            raise ValueError(f"this {type(self).__name__} reads a CLIP with embed_dim {self.embed_dim} and text width "
                             f"{self.text_width}; this CLIP has {clip.embed_dim} and {width}")

    def check_clip(self, clip):
        if not isinstance(clip, Encoders):
            raise ValueError(f"{type(self).__name__} needs the CLIP it was trained with (a minidalle2.clip model), "
                             f"got {type(clip).__name__}")
        self._check_dims(clip)
        if int(self.clip_id.sum()) and not torch.equal(self.clip_id.cpu(), signature(clip)):
            raise ValueError(f"this {type(self).__name__} was trained on another CLIP than the one given (the "
                             "checkpoint records its CLIP's signature): its embeddings would mean nothing here; use "
                             "the CLIP it was trained with, or train it on this one")


def load_pretrained(model_name, checkpoint, device="cpu"):
    """open_clip model `model_name` (e.g. "ViT-B-32", or one you registered with open_clip.add_model_config)
    with its weights from a LOCAL file (.safetensors, .bin or .pt): nothing is downloaded."""
    import open_clip
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no open_clip checkpoint at {checkpoint}; download the weights of "
                                f"{model_name!r} once (e.g. from the open_clip model hub) and pass the file")
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models(), or register "
                         "a config with open_clip.add_model_config")
    model = open_clip.create_model(model_name, pretrained=str(checkpoint), device=device)
    return PretrainedCLIP(model, open_clip.get_tokenizer(model_name)).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- retrieval and zero-shot

def retrieval(image_features, text_features, labels=None):
    """R@1 both ways for N (image, caption) pairs. Exact: the top hit is the pair itself. With labels
    (N, ...), also 'same scene': the top hit has the same labels as the pair (images with equal labels
    differ only by jitter, and their captions cannot tell them apart), and the exact-pair ceiling of
    a perfect reader of labels, mean over pairs of 1 / (number of items with the same labels)."""
    sim = image_features.float() @ text_features.float().T                 # (N images, N captions)
    n = len(sim)
    i2t, t2i, target = sim.argmax(1), sim.argmax(0), torch.arange(n, device=sim.device)
    out = {"r1_image_to_text": (i2t == target).float().mean().item(),
           "r1_text_to_image": (t2i == target).float().mean().item()}
    if labels is not None:
        labels = labels.reshape(n, -1)
        same = (labels[:, None] == labels[None]).all(-1)                    # (N, N) indistinguishable pairs
        out["r1_image_to_text_same_scene"] = same[target, i2t].float().mean().item()
        out["r1_text_to_image_same_scene"] = same[t2i, target].float().mean().item()
        out["r1_exact_ceiling"] = (1 / same.sum(1).float()).mean().item()
    return out


def zero_shot_classify(image_features, class_features, logit_scale=None):
    """Predicted class per image: the nearest class embedding by cosine. class_features is (K, D), or
    (K, P, D) for P prompts per class: averaged, then renormalised (prompt ensembling, Radford et al.).
    With logit_scale (1/tau), a class scores instead the log of the summed probabilities of its prompts,
    logsumexp_p(cos(v, t_kp) / tau): the model's belief in 'some caption of class k', which marginalises
    the attributes a class leaves open rather than averaging their embeddings."""
    if class_features.ndim == 3 and logit_scale is not None:
        return torch.logsumexp(logit_scale * torch.einsum("nd,kpd->nkp", image_features, class_features), 2).argmax(1)
    if class_features.ndim == 3:
        class_features = F.normalize(class_features.mean(1), dim=-1)
    return (image_features @ class_features.T).argmax(1)


def _describe(shape, color, size, pos):
    return f"a {data.object_phrase(shape, color, size)} at the {data.POSITIONS[pos]}"


def class_prompts(attribute):
    """Prompts for each class of an attribute ("shape", "color", "size" or "triple"): every full
    description ("a big red circle at the top left") that has that class, i.e. ensembled over the
    attributes the class does not fix. Returns a list (one per class) of lists of prompts."""
    every = [(s, c, z, p) for s in range(len(data.SHAPES)) for c in range(len(data.COLORS))
             for z in range(len(data.SIZES)) for p in range(len(data.POSITIONS))]
    key = {"shape": lambda o: o[0], "color": lambda o: o[1], "size": lambda o: o[2],
           "triple": lambda o: data.triple_id(o[0], o[1], o[2])}
    if attribute not in key:
        raise ValueError(f"attribute must be one of {', '.join(key)}, got {attribute!r}")
    k = len({key[attribute](o) for o in every})
    return [[_describe(*o) for o in every if key[attribute](o) == i] for i in range(k)]


@torch.no_grad()
def class_embeddings(model, attribute):
    """(K, P, D) text embeddings of class_prompts(attribute)."""
    prompts = class_prompts(attribute)
    flat = model.encode_text([p for ps in prompts for p in ps])
    return flat.view(len(prompts), len(prompts[0]), -1)


def encode_images(model, images, batch_size=500):
    return in_batches(model.encode_image, images, model.device, batch_size)


@torch.no_grad()
def encode_texts(model, captions, batch_size=500):
    return torch.cat([model.encode_text(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]).cpu()


REPORT_IMAGES = 256   # the bar's batch: held-out one-object test images


@torch.no_grad()
def two_object_report(model, n=REPORT_IMAGES, seed=1000):
    """Can the embedding read two-object scenes, as unCLIP's prior and decoder will need? On n two-object test
    scenes: same-scene R@1 both ways (their captions, random templates), and how often an image is closer to its
    own caption than to a twin that differs only in the colours of the two objects swapped (scenes with two
    colours) or in the relation (the objects' cells swapped: "above" <-> "below"); chance is 0.5 for twins."""
    was_training = model.training
    model.eval()
    scenes = data.sample_scenes(n, "test", seed=seed, num_objects=2)
    img = encode_images(model, data.render(scenes))
    out = {f"two_object_{k}": v for k, v in retrieval(img, encode_texts(model, scenes.captions),
                                                       scenes.objects.flatten(1)).items()}
    objects = scenes.objects.tolist()
    own = [data.caption(o) for o in objects]                       # one template for own and twins alike
    color_twin = [data.caption([[a[0], b[1], a[2], a[3]], [b[0], a[1], b[2], b[3]]]) for a, b in objects]
    relation_twin = [data.caption([[a[0], a[1], a[2], b[3]], [b[0], b[1], b[2], a[3]]]) for a, b in objects]
    own_sim = (img * encode_texts(model, own)).sum(1)
    two_colors = torch.tensor([a[1] != b[1] for a, b in objects])
    for name, twins, keep in (("color_swap", color_twin, two_colors), ("relation_swap", relation_twin, None)):
        wins = own_sim > (img * encode_texts(model, twins)).sum(1)
        out[f"two_object_{name}_accuracy"] = (wins[keep] if keep is not None else wins).float().mean().item()
    model.train(was_training)
    return out


def evaluate(model, n=REPORT_IMAGES, seed=1000):
    """The chapter's numbers, on n one-object images of the test split (never trained on) and n of the
    holdout split (the (shape, colour, size) triples left out of training):
    R@1 both ways (exact pair, and same scene), zero-shot shape / colour / size accuracy, and triple
    accuracy (60-way) on seen and on held-out combinations. Zero-shot classes score by the marginal rule
    (logsumexp over their prompts, see zero_shot_classify): averaging the prompt embeddings instead gave
    0.34 on shape (1.00 on colour) for the cpu model that the marginal rule reads at 0.95."""
    was_training = model.training
    model.eval()
    scale = model.logit_scale.item()
    test = data.ShapesDataset(n, "test", seed=seed, num_objects=1)
    held = data.ShapesDataset(n, "holdout", seed=seed, num_objects=1)
    images = test.get_batch(torch.arange(n))["image"]
    img = encode_images(model, images)
    out = retrieval(img, encode_texts(model, test.scenes.captions), test.scenes.objects[:, 0])
    labels = test.scenes.objects[:, 0]
    for i, attribute in enumerate(("shape", "color", "size")):
        pred = zero_shot_classify(img, class_embeddings(model, attribute).cpu(), scale)
        out[f"zero_shot_{attribute}"] = (pred == labels[:, i]).float().mean().item()
    triples = class_embeddings(model, "triple").cpu()
    triple_id = lambda o: data.triple_id(o[:, 0], o[:, 1], o[:, 2])
    out["triple_accuracy_seen"] = (zero_shot_classify(img, triples, scale) == triple_id(labels)).float().mean().item()
    held_img = encode_images(model, held.get_batch(torch.arange(n))["image"])
    held_labels = held.scenes.objects[:, 0]
    out["triple_accuracy_heldout"] = (zero_shot_classify(held_img, triples, scale) == triple_id(held_labels)).float().mean().item()
    for i, attribute in enumerate(("shape", "color")):
        pred = zero_shot_classify(held_img, class_embeddings(model, attribute).cpu(), scale)
        out[f"zero_shot_{attribute}_heldout"] = (pred == held_labels[:, i]).float().mean().item()
    out["temperature"] = 1 / model.logit_scale.item()
    model.train(was_training)
    return out
