"""
Variational auto-encoder (Kingma & Welling, 2014): the encoder predicts a distribution, not a point.

    model = VAE(latent_dim=32)
    mu, logvar = model.encode(x)                   # q(z|x) = N(mu, diag(exp(logvar)))
    z = reparameterize(mu, logvar)                 # z = mu + sigma * eps, eps ~ N(0, I)
    mean, log_scale = model.decode(z)              # p(x|z): a discretized logistic per pixel
    loss, logs = vae_loss(model, {"image": x})     # -ELBO per image, averaged over the batch
    images = model.sample(16, seed=0)              # z ~ N(0, I) -> decoder mean: new images

The objective is the evidence lower bound, for each image x:

    log p(x) >= ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),      p(z) = N(0, I)

Both terms are SUMMED over their dimensions (3*32*32 pixels, latent_dim latents) per image and
then averaged over the batch: reducing one by a mean and the other by a sum silently reweights
the KL by 1/3072 and turns the VAE into a plain auto-encoder with an unusable prior.

The decoder likelihood. Shapes pixels are 8-bit numbers (256 levels mapped to [-1, 1]); images
are mostly flat black with flat-coloured shapes and 1-pixel anti-aliased edges. We use the
discretized logistic of PixelCNN++ (Salimans et al., 2017): the probability of the pixel's
256-level bin under a logistic with a mean and a LEARNED log-scale per pixel (the decoder
outputs 6 channels). Why not MSE? A fixed-variance Gaussian makes "MSE + KL" an ELBO only up to
an arbitrary constant, and the chosen variance silently sets the weight of the KL (the
sigma-VAE paper, Rybkin et al. 2021, shows that learning it calibrates the balance). A
discretized likelihood is a real probability mass (<= 1 per pixel, no degenerate infinite
density), so -ELBO / (3072 ln 2) is a true upper bound on the bits/dim of the data, and a
per-pixel scale can be sure on flat areas and unsure on edges. (scale="channel" learns one
scale per colour channel instead: 0.577 vs 0.547 bits/dim for per-pixel after the same 600 steps.)

KL warm-up: the KL weight beta ramps linearly 0 -> 1 over the first `kl_warmup_steps` training
steps, so the decoder learns to use z before the KL can pull q(z|x) onto the prior (the classic
cure of posterior collapse). The step count lives in a buffer of the model, exactly like
BatchNorm's `num_batches_tracked`: it is saved in checkpoints, so a resumed run continues the ramp.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import check_seed
from .layers import ConvDecoder, ConvEncoder, expect_images, expect_latents, in_batches

PIXEL_LEVELS = 256
HALF_BIN = 1.0 / (PIXEL_LEVELS - 1)   # [-1, 1] holds 256 levels 2/255 apart: each bin is +-1/255
MIN_LOG_SCALE = -7.0                  # PixelCNN++'s floor: exp(-7) ~ 1e-3, well below one bin


# ----------------------------------------------------------------------------- the two key formulas

def reparameterize(mu, logvar, generator=None):
    """A sample of N(mu, exp(logvar)) as a differentiable function of mu and logvar."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps    # z = mu + sigma * eps,  sigma = exp(logvar / 2)


def gaussian_kl(mu, logvar):
    """KL( N(mu, sigma^2) || N(0, 1) ) for every dimension (same shape as mu), in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)   # 1/2 (mu^2 + sigma^2 - 1 - log sigma^2)


# ----------------------------------------------------------------------------- the decoder likelihood

def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) per pixel, where x is on the 256-level grid of [-1, 1] and P is the mass of the
    bin [x - 1/255, x + 1/255] under Logistic(mean, exp(log_scale)); the end bins extend to -inf
    and +inf, so the 256 probabilities sum to exactly 1."""
    x, mean, log_scale = x.float(), mean.float(), log_scale.float().clamp_min(MIN_LOG_SCALE)
    inv_scale = torch.exp(-log_scale)
    upper = inv_scale * (x - mean + HALF_BIN)
    lower = inv_scale * (x - mean - HALF_BIN)
    log_cdf_upper = F.logsigmoid(upper)                  # log sigma(u): the bin of x = -1 (0 .. upper)
    log_sf_lower = -F.softplus(lower)                    # log (1 - sigma(l)): the bin of x = +1
    mass = torch.sigmoid(upper) - torch.sigmoid(lower)   # sigma(u) - sigma(l): an interior bin
    # when the mass underflows, use density * bin width: log pdf(centre) + log(2/255)
    centre = inv_scale * (x - mean)
    log_pdf_width = centre - log_scale - 2 * F.softplus(centre) + math.log(2 * HALF_BIN)
    interior = torch.where(mass > 1e-5, torch.log(mass.clamp_min(1e-12)), log_pdf_width)
    return torch.where(x < -1 + HALF_BIN, log_cdf_upper, torch.where(x > 1 - HALF_BIN, log_sf_lower, interior))


# ----------------------------------------------------------------------------- the model

class VAE(nn.Module):
    """ConvEncoder -> (mu, logvar) of q(z|x); ConvDecoder -> (mean, log_scale) of p(x|z)."""

    def __init__(self, latent_dim=32, widths=(32, 64, 128), scale="pixel", kl_warmup_steps=0,
                 free_bits=0.0, channels=3, resolution=32, log_scale_init=None):
        super().__init__()
        if scale not in ("pixel", "channel"):
            raise ValueError(f"scale must be 'pixel' (the decoder predicts it) or 'channel' (one learned "
                             f"number per colour channel), got {scale!r}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        self.config = dict(latent_dim=latent_dim, widths=list(widths), scale=scale,
                           kl_warmup_steps=kl_warmup_steps, free_bits=free_bits, channels=channels,
                           resolution=resolution, log_scale_init=log_scale_init)
        self.latent_dim, self.channels, self.resolution = latent_dim, channels, resolution
        self.scale, self.kl_warmup_steps, self.free_bits = scale, kl_warmup_steps, free_bits
        self.encoder = ConvEncoder(channels, resolution, tuple(widths), out_features=2 * latent_dim)
        out = 2 * channels if scale == "pixel" else channels
        self.decoder = ConvDecoder(latent_dim, out, resolution, tuple(widths))
        self.channel_log_scale = nn.Parameter(torch.full((channels,), -2.0)) if scale == "channel" else None
        if log_scale_init is not None and scale == "pixel":
            # start sure of every pixel (exp(-4) ~ 0.02, a few of the 256 levels) instead of at a scale of ~1:
            # flat black areas are most of the image, and the net no longer spends its first steps shrinking it
            with torch.no_grad():
                self.decoder.net[-1].bias[channels:].fill_(log_scale_init)
        self.register_buffer("train_step", torch.zeros(()))  # steps trained: drives the KL warm-up

    def encode(self, x):
        """Images (B, C, R, R) in [-1, 1] -> mu, logvar, each (B, latent_dim)."""
        x = expect_images(x, self.channels, self.resolution, "VAE.encode")
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)   # keeps exp(logvar) finite while the net is young

    def decode(self, z):
        """Latents (B, latent_dim) -> mean (B, C, R, R) and log_scale (same shape) of p(x|z)."""
        expect_latents(z, self.latent_dim, "VAE.decode")
        out = self.decoder(z).float()
        if self.scale == "pixel":
            mean, log_scale = out.chunk(2, dim=1)
        else:
            mean, log_scale = out, self.channel_log_scale.view(1, -1, 1, 1).expand_as(out)
        return mean, log_scale.clamp_min(MIN_LOG_SCALE)

    def forward(self, x):
        """The deterministic reconstruction: decoder mean at the posterior mean, clamped to [-1, 1]."""
        return self.decode(self.encode(x)[0])[0].clamp(-1, 1)

    reconstruct = forward

    @property
    def beta(self):
        """The KL weight now: a linear ramp from 0 to 1 over kl_warmup_steps steps."""
        if self.kl_warmup_steps <= 0:
            return 1.0
        return min(1.0, float(self.train_step) / self.kl_warmup_steps)

    @torch.no_grad()
    def sample(self, n, seed=0, temperature=1.0):
        """n new images: z ~ N(0, temperature^2 I) (the prior), decoded to the mean, in [-1, 1]."""
        if not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive number of samples, got {n!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=torch.Generator().manual_seed(check_seed(seed))) * temperature
        return self.decode(z.to(device))[0].clamp(-1, 1)


# ----------------------------------------------------------------------------- the objective

def elbo_terms(model, x, generator=None):
    """Per-image reconstruction NLL (B,) and per-dimension KL (B, latent_dim), both in nats."""
    mu, logvar = model.encode(x)
    z = reparameterize(mu, logvar, generator)
    mean, log_scale = model.decode(z)
    nll = -discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)   # -log p(x|z), summed
    return nll, gaussian_kl(mu, logvar)


def negative_elbo(log_px_z, kl, beta=1.0):
    """-ELBO averaged over the batch, from log p(x|z) per pixel (B, C, H, W) and KL per dimension (B, L)."""
    return (-log_px_z.flatten(1).sum(1) + beta * kl.sum(1)).mean()   # mean_b[ -sum log p(x|z) + beta sum KL ]


def bits_per_dim(nats, dims):
    """Nats per image -> bits per dimension: nats / (D ln 2)."""
    return nats / (dims * math.log(2))


def vae_loss(model, batch):
    """The training loss: mean over the batch of [ -log p(x|z) + beta * KL ], each summed per image.
    With free_bits > 0, each latent dimension's batch-mean KL counts as at least free_bits nats."""
    x = batch["image"]
    if model.training:
        model.train_step += 1
    nll, kl = elbo_terms(model, x)
    kl_per_dim = kl.mean(0)                                             # (latent_dim,), batch mean
    kl_term = kl_per_dim.clamp_min(model.free_bits).sum() if model.free_bits > 0 else kl_per_dim.sum()
    loss = nll.mean() + model.beta * kl_term
    dims = x[0].numel()
    return loss, {"nll": nll.mean().detach(), "kl": kl_per_dim.sum().detach(), "beta": model.beta,
                  "bits_per_dim": bits_per_dim(nll.mean() + kl_per_dim.sum(), dims).detach()}


# ----------------------------------------------------------------------------- held-out measurements

@torch.no_grad()
def evaluate(model, images, batch_size=250, seed=0):
    """Held-out numbers: ELBO in bits/dim (one z per image, fixed seed), its two parts, the KL
    of every latent dimension, and active units (Burda et al. 2016: Cov_x(E_q[z|x]) > 0.01)."""
    images = expect_images(images, model.channels, model.resolution, "vae.evaluate")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(check_seed(seed))
    nlls, kls, mus = [], [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device)
        nll, kl = elbo_terms(model, x, generator)
        nlls.append(nll.cpu()), kls.append(kl.cpu()), mus.append(model.encode(x)[0].cpu())
    nll, kl, mu = torch.cat(nlls), torch.cat(kls), torch.cat(mus)
    dims = images[0].numel()
    activity = mu.var(0)                               # Cov_x(E_q[z|x]) per dimension
    return {"elbo_bits_per_dim": bits_per_dim(nll.mean() + kl.sum(1).mean(), dims).item(),
            "nll_bits_per_dim": bits_per_dim(nll.mean(), dims).item(),
            "kl_bits_per_dim": bits_per_dim(kl.sum(1).mean(), dims).item(),
            "kl_nats": kl.sum(1).mean().item(),
            "active_units": int((activity > 0.01).sum()),
            "kl_per_dim": kl.mean(0).tolist(), "activity": activity.tolist()}


@torch.no_grad()
def importance_log_likelihood(model, x, k=64, seed=0):
    """log p(x) per image, estimated with k importance samples from q(z|x) (Burda et al., 2016):
    log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x). It is >= the ELBO on average, and tends to log p(x)."""
    x = expect_images(x, model.channels, model.resolution, "vae.importance_log_likelihood")
    generator = torch.Generator(device=x.device).manual_seed(check_seed(seed))
    mu, logvar = model.encode(x)
    log_w = []
    for _ in range(k):
        z = reparameterize(mu, logvar, generator)
        mean, log_scale = model.decode(z)
        log_px_z = discretized_logistic_log_prob(x, mean, log_scale).flatten(1).sum(1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        log_qz = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(1)
        log_w.append(log_px_z + log_pz - log_qz)
    return torch.logsumexp(torch.stack(log_w), 0) - math.log(k)


@torch.no_grad()
def interpolate(model, x_a, x_b, steps=8):
    """Decode the straight line between the posterior means of two images: (steps, C, R, R)."""
    mu = model.encode(torch.stack([x_a, x_b]))[0]
    t = torch.linspace(0, 1, steps, device=mu.device)[:, None]
    return model.decode((1 - t) * mu[0] + t * mu[1])[0].clamp(-1, 1)


@torch.no_grad()
def traverse(model, z, dims, values):
    """Vary one latent dimension at a time around z (latent_dim,): one row of len(values) images
    per dimension in `dims`, returned as (len(dims) * len(values), C, R, R)."""
    if not isinstance(z, torch.Tensor) or z.shape != (model.latent_dim,):
        raise ValueError(f"traverse: z must have shape ({model.latent_dim},), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    rows = z.repeat(len(dims) * len(values), 1)
    for i, d in enumerate(dims):
        rows[i * len(values):(i + 1) * len(values), d] = torch.as_tensor(values, dtype=z.dtype)
    return model.decode(rows)[0].clamp(-1, 1)


# ----------------------------------------------------------------------------- a learned prior

class MixturePrior(nn.Module):
    """A prior fitted AFTER training to where the encoder actually puts images (the "aggregate posterior"):

        p(z) = sum_k w_k N(z; m_k, diag(v_k)),   fitted by EM to the posterior means of training images.

    N(0, I) and the aggregate posterior never match exactly: between the clusters of real codes lie
    "holes" that no training image maps to, and the decoder draws nonsense there. Sampling z from a
    density fitted to real codes avoids the holes (Ghosh et al. 2020 call it ex-post density
    estimation). DALL-E 2 has the same problem and solution at scale: its *prior* is a model of where
    real CLIP image embeddings lie."""

    def __init__(self, log_weights, means, variances):
        super().__init__()
        k, d = means.shape
        if log_weights.shape != (k,) or variances.shape != (k, d):
            raise ValueError(f"MixturePrior: log_weights {tuple(log_weights.shape)}, means {tuple(means.shape)} and "
                             f"variances {tuple(variances.shape)} do not describe one mixture of (k, d) = ({k}, {d})")
        self.register_buffer("log_weights", log_weights.float())
        self.register_buffer("means", means.float())
        self.register_buffer("variances", variances.float())

    def component_log_probs(self, z):
        """log w_k + log N(z_n; m_k, diag(v_k)) for every code and component: (N, k)."""
        expect_latents(z, self.means.shape[1], "MixturePrior")
        z, m, inv_v = z.double(), self.means.double(), 1 / self.variances.double()
        # sum_d (z - m)^2 / v, expanded into matrix products: no (N, k, d) tensor
        squared = z.pow(2) @ inv_v.T - 2 * z @ (m * inv_v).T + (m.pow(2) * inv_v).sum(1)
        log_normal = -0.5 * (squared - inv_v.log().sum(1) + m.shape[1] * math.log(2 * math.pi))
        return (self.log_weights.double() + log_normal).float()                  # (N, k)

    def log_prob(self, z):
        """log p(z) for codes z (N, d)."""
        return torch.logsumexp(self.component_log_probs(z), 1)

    @classmethod
    def fit(cls, z, k=256, iters=40, seed=0, min_variance=1e-4):
        """EM for a diagonal Gaussian mixture on codes z (N, d), started from k random codes."""
        if not isinstance(z, torch.Tensor) or z.ndim != 2:
            raise ValueError(f"MixturePrior.fit: codes must be a (N, d) tensor, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if not 1 <= k <= len(z):
            raise ValueError(f"MixturePrior.fit: k must be between 1 and the number of codes ({len(z)}), got {k}")
        z = z.float()
        start = torch.randperm(len(z), generator=torch.Generator().manual_seed(check_seed(seed)))[:k]
        prior = cls(torch.full((k,), -math.log(k)), z[start].clone(), z.var(0).expand(k, -1).clone())
        for _ in range(iters):
            r = torch.softmax(prior.component_log_probs(z), 1)                   # E: responsibilities (N, k)
            n_k = r.sum(0) + 1e-8                                                # M: weighted counts, means, variances
            means = r.T @ z / n_k[:, None]
            variances = (r.T @ z.pow(2) / n_k[:, None] - means.pow(2)).clamp_min(min_variance)
            prior = cls((n_k / len(z)).log(), means, variances)
        return prior

    @torch.no_grad()
    def sample(self, n, seed=0):
        """n codes: pick a component with probability w_k, then z = m_k + sqrt(v_k) * eps."""
        g = torch.Generator().manual_seed(check_seed(seed))
        k = torch.multinomial(self.log_weights.exp().cpu(), n, replacement=True, generator=g)
        eps = torch.randn(n, self.means.shape[1], generator=g)
        return (self.means.cpu()[k] + self.variances.cpu()[k].sqrt() * eps).to(self.means.device)


@torch.no_grad()
def posterior_means(model, images, batch_size=500):
    """The codes mu(x) of images (N, C, R, R): (N, latent_dim) CPU floats."""
    return in_batches(lambda x: model.encode(x)[0], images, next(model.parameters()).device, batch_size)


def fit_mixture_prior(model, images, k=256, seed=0):
    """A MixturePrior fitted to the posterior means of `images` (N, C, R, R) under `model`."""
    return MixturePrior.fit(posterior_means(model, images), k=k, seed=seed)


@torch.no_grad()
def sample_with_prior(model, prior, n, seed=0):
    """n images decoded (mean, in [-1, 1]) from codes drawn from a learned prior instead of N(0, I)."""
    z = prior.sample(n, seed).to(next(model.parameters()).device)
    return in_batches(lambda c: model.decode(c)[0].clamp(-1, 1), z, z.device, 500)
