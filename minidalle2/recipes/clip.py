"""Chapter 07's recipe: a tiny CLIP, frozen afterwards for the chapters that build on it."""

from .. import clip, data
from ..lab.zoo import Recipe

# share of two-object scenes in training. Among random captions, colours and positions alone tell a batch's
# pairs apart, so two-object scenes teach little about shape or relations (notebook 07); each scene's twin in
# the same batch (data.twin_scenes: colours, shapes, sizes or cells swapped) makes the binding the only way
P_TWO = 0.5


def twin_train(size, p_two=P_TWO):
    """`size` train scenes, each batched beside its hard-negative twin (a batch of B indices holds 2B pairs)."""
    return data.TwinShapesDataset(size, "train", seed=0, p_two=p_two)

CLIP = Recipe(
    "clip", "clip", clip.CLIP,
    description="tiny CLIP (open_clip ViT + text transformer), contrastive on Shapes captions",
    model={"smoke": dict(embed_dim=32, patch_size=8, image_width=32, image_layers=1, text_width=32, text_layers=1),
           "cpu": dict(embed_dim=64, patch_size=8, image_width=128, image_layers=4, text_width=128, text_layers=2),
           "full": dict(embed_dim=128, patch_size=4, image_width=256, image_layers=6, text_width=256,
                        text_layers=4)},
    loss=clip.clip_loss, dataset=twin_train,
    data={"smoke": dict(size=2_000, p_two=P_TWO), "cpu": dict(size=50_000, p_two=P_TWO),
          "full": dict(size=100_000, p_two=P_TWO)},
    # AdamW betas (0.9, 0.98) and decay 0.1 as CLIP; decay skips gains, biases and the temperature
    # (train.make_optimizer). batch_size counts scenes; each comes with its twin, so a cpu batch holds 256 pairs.
    # cpu: 1,000 steps, ~9 minutes on 2 cores; what twins and steps change: results/clip_two_object_cpu*.json
    training={
        "smoke": dict(steps=20, batch_size=32, lr=2e-3, betas=(0.9, 0.98), warmup_steps=5, log_every=5),
        "cpu": dict(steps=1000, batch_size=128, lr=2e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=50,
                    lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=25),
        "full": dict(steps=5000, batch_size=256, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), warmup_steps=250,
                     lr_schedule="cosine", grad_clip=1.0, bf16=True, log_every=100),
    },
    report=lambda model: {**clip.evaluate(model), **clip.two_object_report(model)},
    version=2)   # 2: each scene batched beside its twin (TwinShapesDataset)

RECIPES = [CLIP]
