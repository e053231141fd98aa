"""Stop 14 ad-hoc: (a) the ddpm cpu recipe at 2x its steps, (b) the noisy classifier cpu recipe at 2x its steps
(its cosine lr stretched to fit). Each saved as safetensors + JSON under /tmp/s14/."""
import sys
from minidalle2 import guidance
from minidalle2.lab.checkpoint import save_model
from minidalle2.lab.train import derive_seed, seed_everything, train
from minidalle2.recipes.diffusion import CLASSIFIER_GUIDANCE, DDPM, classifier_schedule

which = sys.argv[1]
if which == "ddpm":
    seed_everything(derive_seed("ddpm", "cpu", "init"))
    model = DDPM.build_model("cpu")
    result = train(model, DDPM.loss, DDPM.make_dataset("cpu"),
                   DDPM.train_config("cpu", steps=2 * DDPM.train_config("cpu").steps), kind="diffusion", progress=False)
    save_model(result.ema_model, "/tmp/s14/ddpm2x", "diffusion", {"seconds": result.seconds})
else:
    seed_everything(derive_seed("classifier_guidance", "cpu", "init"))
    model = CLASSIFIER_GUIDANCE.build_model("cpu")
    loss = lambda m, b: guidance.noisy_classifier_loss(m, b, classifier_schedule())
    result = train(model, loss, CLASSIFIER_GUIDANCE.make_dataset("cpu"),
                   CLASSIFIER_GUIDANCE.train_config("cpu", steps=2 * CLASSIFIER_GUIDANCE.train_config("cpu").steps),
                   kind="noisy_classifier", progress=False)
    save_model(result.model, "/tmp/s14/classifier2x", "noisy_classifier", {"seconds": result.seconds})
print(which, "done in", result.seconds, "s", flush=True)
