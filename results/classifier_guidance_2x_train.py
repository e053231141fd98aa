"""Stop 14 ad-hoc: (a) the ddpm cpu recipe at 2x its steps, (b) the noisy classifier cpu recipe at 2x its steps
(its cosine lr stretched to fit). Each saved as safetensors + JSON under /tmp/s14/."""
import sys
from minidalle2 import ddpm, guidance
from minidalle2.checkpoint import save_model
from minidalle2.presets import train_config
from minidalle2.train import derive_seed, seed_everything, train

which = sys.argv[1]
if which == "ddpm":
    seed_everything(derive_seed("ddpm", "cpu", "init"))
    model = ddpm.build("cpu")
    result = train(model, ddpm.ddpm_loss, ddpm.shapes_dataset("cpu"),
                   train_config("ddpm", "cpu", steps=2 * train_config("ddpm", "cpu").steps), kind="diffusion", progress=False)
    save_model(result.ema_model, "/tmp/s14/ddpm2x", "diffusion", {"seconds": result.seconds})
else:
    seed_everything(derive_seed("classifier_guidance", "cpu", "init"))
    model = guidance.build_classifier("cpu")
    loss = lambda m, b: guidance.noisy_classifier_loss(m, b, guidance.classifier_schedule())
    result = train(model, loss, ddpm.shapes_dataset("cpu"),
                   train_config("noisy_classifier", "cpu", steps=2 * train_config("noisy_classifier", "cpu").steps),
                   kind="noisy_classifier", progress=False)
    save_model(result.model, "/tmp/s14/classifier2x", "noisy_classifier", {"seconds": result.seconds})
print(which, "done in", result.seconds, "s", flush=True)
