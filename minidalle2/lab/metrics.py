"""
Distribution and diversity metrics on feature vectors.

Every function here takes plain tensors: features of shape (N, D) (in this project, the oracle's
penultimate-layer features) or integer label tensors. Nothing is specific to any network.

- FID  (Heusel et al. 2017): fit a Gaussian to each feature set and take the Frechet distance
  between the two Gaussians. Biased at small N, so always report it beside `real_floor`.
- KID  (Binkowski et al. 2018): an unbiased estimate of the squared MMD with a cubic polynomial
  kernel, averaged over random subsets. Its expected value is 0 for two samples of the same
  distribution, whatever N.
- diversity: mean pairwise feature distance (per prompt), class coverage, normalized entropy.

All distances are computed in float64.
"""

import math

import torch


def _as_features(feats, name="feats"):
    """Validate a (N, D) feature matrix and return it as float64."""
    feats = torch.as_tensor(feats)
    if feats.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(feats.shape)}")
    if feats.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {feats.shape[0]}")
    feats = feats.detach().to(dtype=torch.float64, device="cpu")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats


def _as_pair(feats_a, feats_b):
    feats_a, feats_b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a has D={feats_a.shape[1]}, feats_b has D={feats_b.shape[1]}")
    return feats_a, feats_b


# -----------------------------------------------------------------------------
# FID

def gaussian_stats(feats):
    """Mean and (unbiased, 1/(N-1)) covariance of (N, D) features; cache these for a reference set."""
    feats = _as_features(feats)
    mu = feats.mean(dim=0)
    centered = feats - mu
    cov = centered.T @ centered / (feats.shape[0] - 1)  # S = 1/(N-1) sum_i (x_i - mu)(x_i - mu)^T
    return mu, cov


def _sqrt_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix via eigh (tiny negative eigenvalues -> 0)."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigvecs @ torch.diag(eigvals.clamp(min=0).sqrt()) @ eigvecs.T  # S^{1/2} = V diag(sqrt(l)) V^T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2):
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = (torch.as_tensor(mu, dtype=torch.float64).reshape(-1) for mu in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(cov, dtype=torch.float64) for cov in (cov1, cov2))
    d = mu1.shape[0]
    if mu2.shape[0] != d or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}")
    # Tr((S1 S2)^{1/2}) computed symmetrically: (S1 S2)^{1/2} is similar to (S1^{1/2} S2 S1^{1/2})^{1/2},
    # a symmetric PSD matrix, so its trace is the sum of square roots of that matrix's eigenvalues.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few-hundred-dim eigh: 1 thread takes ms; 2 busy threads took seconds
    try:
        sqrt_cov1 = _sqrt_psd(cov1)
        middle = sqrt_cov1 @ cov2 @ sqrt_cov1
        trace_sqrt_product = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    finally:
        torch.set_num_threads(threads)
    # FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})
    fid = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_sqrt_product
    return max(fid.item(), 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_distance(feats_a, feats_b):
    """FID between two feature sets (N_a, D) and (N_b, D)."""
    feats_a, feats_b = _as_pair(feats_a, feats_b)
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


# -----------------------------------------------------------------------------
# KID

def polynomial_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3 for every pair of rows: (N, D), (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x, y):
    """Unbiased estimate of MMD^2 between samples x (m, D) and y (n, D) with the polynomial kernel."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    # MMD^2 = 1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j) - 2/(mn) sum_{i,j} k(x_i,y_j)
    sum_xx = k_xx.sum() - k_xx.diagonal().sum()  # drop i == j: that is what makes it unbiased
    sum_yy = k_yy.sum() - k_yy.diagonal().sum()
    return (sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2 * k_xy.sum() / (m * n)).item()


def kernel_distance(feats_a, feats_b, subsets=100, subset_size=1000, generator=None):
    """KID: mean and std of the unbiased MMD^2 over `subsets` random subsets of `subset_size` rows of each set.

    subset_size is capped at the smaller set's size (so small sets use all their rows every time).
    """
    feats_a, feats_b = _as_pair(feats_a, feats_b)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(subset_size, feats_a.shape[0], feats_b.shape[0])
    if size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    estimates = []
    for _ in range(subsets):
        pick_a = torch.randperm(feats_a.shape[0], generator=generator)[:size]
        pick_b = torch.randperm(feats_b.shape[0], generator=generator)[:size]
        estimates.append(mmd2_unbiased(feats_a[pick_a], feats_b[pick_b]))
    estimates = torch.tensor(estimates, dtype=torch.float64)
    return estimates.mean().item(), estimates.std(unbiased=False).item()


# -----------------------------------------------------------------------------
# the real-vs-real floor

def real_floor(real_feats_pool, n, subsets=100, subset_size=1000, generator=None):
    """FID and KID between two disjoint random draws of n real samples each.

    Why: FID is biased upwards at small n. Even perfect samples (more real images) score well above
    0, because a covariance estimated from n samples is noisy and the noise adds to the distance
    (the bias shrinks roughly like 1/n). So an FID of, say, 3.0 at n=500 means nothing on its own;
    beside the floor at the same n ("real vs real: 2.7") it says "nearly as good as real data".
    KID is unbiased, so its floor should be ~0 (its spread shows the noise at this n).

    Pass the same subsets/subset_size you use for the generator's KID (subset_size < n, or kid_std is 0).
    Returns a dict: {"n", "fid", "kid", "kid_std"}.
    """
    pool = _as_features(real_feats_pool, "real_feats_pool")
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if pool.shape[0] < 2 * n:
        raise ValueError(f"real_floor needs 2n = {2 * n} real samples for two disjoint draws, got {pool.shape[0]}")
    order = torch.randperm(pool.shape[0], generator=generator)
    draw_a, draw_b = pool[order[:n]], pool[order[n:2 * n]]
    kid, kid_std = kernel_distance(draw_a, draw_b, subsets=subsets, subset_size=subset_size, generator=generator)
    return {"n": n, "fid": frechet_distance(draw_a, draw_b), "kid": kid, "kid_std": kid_std}


# -----------------------------------------------------------------------------
# diversity

def _mean_distinct_pair_distance(feats):
    distances = torch.cdist(feats, feats)  # d_ij = ||x_i - x_j||_2
    n = feats.shape[0]
    return (distances.sum() / (n * (n - 1))).item()  # the diagonal is 0, each pair counted twice


def mean_pairwise_distance(feats, groups=None):
    """Mean L2 distance over distinct pairs of rows.

    With groups (N,) of ids (e.g. one id per prompt), the mean is taken within each group that has at
    least 2 members, then averaged over those groups: "how different are the samples for one prompt".
    """
    feats = _as_features(feats)
    if groups is None:
        return _mean_distinct_pair_distance(feats)
    groups = torch.as_tensor(groups).reshape(-1)
    if groups.shape[0] != feats.shape[0]:
        raise ValueError(f"groups has {groups.shape[0]} entries, feats has {feats.shape[0]} rows")
    per_group = [_mean_distinct_pair_distance(feats[groups == g]) for g in groups.unique() if (groups == g).sum() >= 2]
    if not per_group:
        raise ValueError("no group has at least 2 members")
    return sum(per_group) / len(per_group)


def coverage(labels, num_classes):
    """Fraction of the num_classes classes that appear at least once in labels, and the per-class counts."""
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError("labels is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return (counts > 0).double().mean().item(), counts


def normalized_entropy(counts):
    """Entropy of the class histogram divided by its maximum log(K): 1 = perfectly even, 0 = one class only."""
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if counts.numel() < 2:
        raise ValueError("normalized_entropy needs at least 2 classes")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("counts must be non-negative with a positive total")
    p = counts / counts.sum()
    p = p[p > 0]  # 0 log 0 = 0
    entropy = -(p * p.log()).sum()  # H = -sum_k p_k log p_k
    return (entropy / math.log(counts.numel())).item()


def psnr(images, targets, peak_to_peak=2.0):
    """Per-image peak signal-to-noise ratio in dB, 10 log10(peak^2 / MSE), for images in [-1, 1]
    (peak-to-peak 2). Returns a tensor (N,); average it for a report."""
    if images.shape != targets.shape:
        raise ValueError(f"psnr: images {tuple(images.shape)} and targets {tuple(targets.shape)} differ in shape")
    mse = (images.float() - targets.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak_to_peak ** 2 / mse.clamp_min(1e-12))
