"""Chapter 07's recipe: a tiny CLIP, frozen afterwards for the chapters that build on it."""

from .. import clip
from ..lab.zoo import Recipe
from .common import shapes_train

# share of two-object scenes in training: in a batch of 256 two-object captions, colours and positions alone
# tell the pairs apart, so they teach little about shape (notebook 07); two-object captions stay in, since
# later chapters prompt with them
P_TWO = 0.2

CLIP = Recipe(
    "clip", "clip", clip.CLIP,
    description="tiny CLIP (open_clip ViT + text transformer), contrastive on Shapes captions",
    model={"smoke": dict(embed_dim=32, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1),
           "cpu": dict(embed_dim=64, patch_size=8, image_width=128, image_layers=4, text_width=128, text_layers=2),
           "full": dict(embed_dim=128, patch_size=4, image_width=256, image_layers=6, text_width=256,
                        text_layers=4)},
    loss=clip.clip_loss, dataset=shapes_train,
    data={"smoke": dict(size=2_000, p_two=P_TWO), "cpu": dict(size=50_000, p_two=P_TWO),
          "full": dict(size=100_000, p_two=P_TWO)},
    # AdamW betas (0.9, 0.98) and decay 0.1 as CLIP; decay skips gains, biases and the temperature
    # (train.make_optimizer). cpu: 500 steps of 256, ~7 minutes on 2 cores (measured: notebook 07)
    training={
        "smoke": dict(steps=20, batch_size=64, lr=2e-3, betas=(0.9, 0.98), warmup_steps=5, log_every=5),
        "cpu": dict(steps=500, batch_size=256, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=50,
                    lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=25),
        "full": dict(steps=5000, batch_size=512, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=250,
                     lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=100),
    },
    report=lambda model: {**clip.evaluate(model), **clip.two_object_report(model)})

RECIPES = [CLIP]
