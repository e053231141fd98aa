"""
GAN: a generator and a discriminator trained against each other (Goodfellow et al. 2014).

    gan = GAN()                                  # G: z (B, 64) -> image;  D: image -> logit
    loss, logs = gan_loss(gan, {"image": real})  # one simultaneous step's loss (kind="nonsaturating")
    images = gan.sample(64, seed=0)                # the recipe (recipes/gan.py) samples the EMA copy of G

The two-player game, with D(x) = sigmoid(logit(x)) the probability that x is real:

    D maximises  E_x log D(x) + E_z log(1 - D(G(z)))
    G minimises  E_z log(1 - D(G(z)))            ("saturating": no gradient when D wins early)
          or     E_z -log D(G(z))                ("non-saturating": the same fixed point, strong gradients)

What the field learned since DCGAN, all used here: the networks output logits and the losses
are written with softplus (log(1 + e^t)), which is BCE-with-logits and never takes log(0);
the non-saturating G loss (or the hinge loss of SAGAN/BigGAN as an option); spectral
normalisation in D (each layer 1-Lipschitz, so D cannot become arbitrarily sharp); Adam with
beta1 = 0; and an exponential moving average of G's weights for sampling.

One optimizer, one backward, a *simultaneous* update. The textbook loop alternates: a D step on
D's loss, then a G step on G's loss through the just-updated D. Here one step computes

    loss = L_D(D(x), D(G(z).detach()))  +  L_G(D_sg(G(z)))

where D_sg is D evaluated with *detached* parameters (torch.func.functional_call). The first
term cannot reach G (its fake input is detached), the second cannot reach D (its parameters are
detached), so the sum's gradient is exactly dL_D/dθ_D for D and dL_G/dθ_G for G, both taken at
the same point: simultaneous gradient descent. That keeps GAN training inside the course's one
training loop (determinism, resume, EMA, bf16, DDP) at the cost of one extra D forward.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import spectral_norm

from . import data, layers

LOSSES = ("nonsaturating", "saturating", "hinge")


# ----------------------------------------------------------------------------- the losses

def _check_kind(kind):
    if kind not in LOSSES:
        raise ValueError(f"GAN loss must be one of {', '.join(LOSSES)}, got {kind!r}")


def discriminator_loss(real_logits, fake_logits, kind="nonsaturating"):
    """D's loss from its logits on real and on generated images (a scalar, averaged over the batch)."""
    _check_kind(kind)
    if kind == "hinge":
        # L_D = E max(0, 1 - D(x)) + E max(0, 1 + D(G(z)))
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    # L_D = -log sigmoid(l_real) - log(1 - sigmoid(l_fake)) = softplus(-l_real) + softplus(l_fake)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits, kind="nonsaturating"):
    """G's loss from D's logits on generated images."""
    _check_kind(kind)
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()      # L_G = -log D(G(z)) = softplus(-l)
    if kind == "saturating":
        return -F.softplus(fake_logits).mean()      # L_G = log(1 - D(G(z))) = -softplus(l)
    return -fake_logits.mean()                      # hinge: L_G = -E D(G(z))


# ----------------------------------------------------------------------------- the networks

def _group_norm(channels):
    return nn.GroupNorm(min(8, channels), channels)


class Generator(nn.Module):
    """z (B, latent_dim) -> images (B, 3, R, R) in [-1, 1], DCGAN-style: a linear map to a 4x4 grid,
    then per stage a nearest-neighbour 2x upsample, a 3x3 conv, GroupNorm and ReLU; tanh at the end."""

    def __init__(self, latent_dim=64, widths=(32, 64, 128), resolution=32):
        super().__init__()
        self.latent_dim, self.start, self.top = latent_dim, resolution // 2 ** len(widths), widths[-1]
        if self.start < 1 or resolution % 2 ** len(widths):
            raise ValueError(f"resolution {resolution} cannot be halved {len(widths)} times")
        self.project = nn.Linear(latent_dim, widths[-1] * self.start ** 2)
        layers, width = [_group_norm(widths[-1]), nn.ReLU()], widths[-1]
        for w in reversed(widths[:-1]):             # e.g. 128@4x4 -> 64@8x8 -> 32@16x16
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, w, 3, padding=1), _group_norm(w), nn.ReLU()]
            width = w
        layers += [nn.Upsample(scale_factor=2), nn.Conv2d(width, width // 2, 3, padding=1),  # -> 16@32x32
                   _group_norm(width // 2), nn.ReLU(), nn.Conv2d(width // 2, 3, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        layers.expect_latents(z, self.latent_dim, "Generator")
        return self.net(self.project(z).view(len(z), self.top, self.start, self.start))


class Discriminator(nn.Module):
    """images (B, 3, R, R) -> one logit each, DCGAN-style: stride-2 4x4 convs and LeakyReLU(0.2),
    every layer spectrally normalised (so D is 1-Lipschitz per layer and cannot get arbitrarily sharp)."""

    def __init__(self, widths=(32, 64, 128), resolution=32, spectral=True):
        super().__init__()
        self.resolution = resolution
        final = resolution // 2 ** len(widths)
        sn = (lambda layer: spectral_norm(layer)) if spectral else (lambda layer: layer)
        layers, width = [], 3
        for w in widths:                            # 32x32 -> 16 -> 8 -> 4
            layers += [sn(nn.Conv2d(width, w, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            width = w
        layers += [nn.Flatten(), sn(nn.Linear(width * final * final, 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, images):
        return self.net(layers.expect_images(images, 3, self.resolution, "GAN discriminator")).squeeze(1)


class ResNetDiscriminator(nn.Module):
    """The shared ConvEncoder (ResBlocks at every resolution), one logit out, no norm, LeakyReLU."""

    def __init__(self, widths=(16, 32, 64), resolution=32, spectral=True):
        super().__init__()
        self.encoder = layers.ConvEncoder(3, resolution, widths, out_features=1, norm=None, spectral=spectral,
                                       activation=lambda: nn.LeakyReLU(0.2))

    def forward(self, images):
        return self.encoder(images).squeeze(1)


class GAN(nn.Module):
    """An unconditional GAN: `generator` G and `discriminator` D (one logit per image, spectral norm)."""

    def __init__(self, latent_dim=64, g_widths=(64, 128, 256), d_widths=(32, 64, 128), resolution=32,
                 spectral=True, d_resnet=False):
        super().__init__()
        self.config = {"latent_dim": latent_dim, "g_widths": list(g_widths), "d_widths": list(d_widths),
                       "resolution": resolution, "spectral": spectral, "d_resnet": d_resnet}
        self.latent_dim, self.resolution = latent_dim, resolution
        self.generator = Generator(latent_dim, g_widths, resolution)
        if d_resnet:
            self.discriminator = ResNetDiscriminator(d_widths, resolution, spectral)
        else:
            self.discriminator = Discriminator(d_widths, resolution, spectral)

    def discriminate(self, images):
        """D's logits (B,) on images (B, 3, R, R); a clear error for a wrong size."""
        return self.discriminator(images)

    def latents(self, n, seed=None, device=None):
        """z ~ N(0, I) of shape (n, latent_dim); from a seeded generator if `seed` is given."""
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"number of samples n must be a positive int, got {n!r}")
        device = device or next(self.parameters()).device
        g = torch.Generator().manual_seed(data.check_seed(seed)) if seed is not None else None
        return torch.randn(n, self.latent_dim, generator=g).to(device)

    @torch.no_grad()
    def sample(self, n, seed=0, batch_size=500):
        """n images in [-1, 1]; the same seed gives the same images."""
        z = self.latents(n, seed)
        return layers.in_batches(self.generator, z, z.device, batch_size)


# ----------------------------------------------------------------------------- one training step

def _with_detached_parameters(module, x):
    """module(x) where gradients flow to x but not to module's parameters."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, (x,))


def gan_loss(model, batch, kind="nonsaturating"):
    """One simultaneous step: L_D(D(x), D(G(z).detach())) + L_G(D_sg(G(z))); logs D(x), D(G(z))."""
    real = batch["image"]
    fake = model.generator(model.latents(len(real)))      # z from the global RNG: train() seeds it per step
    real_logits = model.discriminate(real)
    fake_logits = model.discriminate(fake.detach())       # D's term: no gradient into G
    d_loss = discriminator_loss(real_logits, fake_logits, kind)
    g_logits = _with_detached_parameters(model.discriminator, fake)  # G's term: none into D
    g_loss = generator_loss(g_logits, kind)
    metrics = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
               "d_real": torch.sigmoid(real_logits.detach().float()).mean(),   # D(x): should stay < 1
               "d_fake": torch.sigmoid(fake_logits.detach().float()).mean()}   # D(G(z)): should stay > 0
    return d_loss + g_loss, metrics


