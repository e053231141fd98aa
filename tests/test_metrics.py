"""Tests for minidalle2.metrics: FID, KID, the real-vs-real floor and diversity metrics."""

import math

import numpy as np
import pytest
import torch

from minidalle2.lab.metrics import (
    coverage,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    kernel_distance,
    mean_pairwise_distance,
    mmd2_unbiased,
    normalized_entropy,
    real_floor,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- FID

def test_fid_identical_sets_is_zero():
    feats = torch.randn(500, 16, generator=gen())
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)


def test_gaussian_stats_match_numpy():
    feats = torch.randn(300, 5, generator=gen(1))
    mu, cov = gaussian_stats(feats)
    np.testing.assert_allclose(mu.numpy(), feats.double().numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(feats.double().numpy(), rowvar=False), atol=1e-12)


def test_fid_from_stats_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    expected = (mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()  # |mu1-mu2|^2 + sum (s1 - s2)^2
    fid = frechet_distance_from_stats(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert fid == pytest.approx(expected.item(), rel=1e-10)


def test_fid_from_stats_non_diagonal_matches_numpy_sqrtm():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # independent computation: sqrtm(S1 S2) from the general (non-symmetric) eigendecomposition
    eigvals, eigvecs = np.linalg.eig(cov1 @ cov2)
    sqrt_product = eigvecs @ np.diag(np.sqrt(eigvals.astype(complex))) @ np.linalg.inv(eigvecs)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(sqrt_product).real
    fid = frechet_distance_from_stats(torch.from_numpy(mu1), torch.from_numpy(cov1), torch.from_numpy(mu2), torch.from_numpy(cov2))
    assert fid == pytest.approx(expected, rel=1e-8)
    # symmetric in its two arguments
    fid_swapped = frechet_distance_from_stats(torch.from_numpy(mu2), torch.from_numpy(cov2), torch.from_numpy(mu1), torch.from_numpy(cov1))
    assert fid_swapped == pytest.approx(fid, rel=1e-8)


def test_fid_rank_deficient_covariance_is_finite():
    cov = torch.diag(torch.tensor([1.0, 0.0, 0.0]))  # singular: a plain sqrtm would struggle
    fid = frechet_distance_from_stats(torch.zeros(3), cov, torch.zeros(3), cov)
    assert fid == pytest.approx(0.0, abs=1e-10)


def test_fid_on_samples_matches_closed_form():
    g = gen(2)
    n = 20_000
    mu1, mu2 = torch.tensor([0.0, 0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 1.5, 1.0])
    a = mu1 + s1 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    b = mu2 + s2 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    expected = ((mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()).item()  # = 2.25 + 2.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


# ----------------------------------------------------------------------------- KID

def test_kid_matches_double_loop():
    g = gen(3)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64) + 1
    d = x.shape[1]

    def k(u, v):
        return (float(u @ v) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    expected = xx + yy - 2 * xy
    assert expected > 0
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    # both sets have 5 rows, subset_size is capped at 5: every subset is all rows (permuted), and
    # MMD^2 does not depend on row order, so every subset gives the exact full-set estimate
    y5 = y[:5]
    mean, std = kernel_distance(x, y5, subsets=3, subset_size=100, generator=gen(4))
    assert mean == pytest.approx(mmd2_unbiased(x, y5), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_same_distribution_near_zero_and_shift_positive():
    g = gen(5)
    a, b = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    same_mean, same_std = kernel_distance(a, b, subsets=50, subset_size=500, generator=gen(6))
    shifted_mean, _ = kernel_distance(a, b + 0.5, subsets=50, subset_size=500, generator=gen(6))
    assert abs(same_mean) < 0.02
    assert same_std > 0
    assert shifted_mean > 0.5
    assert kernel_distance(a, b, subsets=5, subset_size=100, generator=gen(7)) == kernel_distance(
        a, b, subsets=5, subset_size=100, generator=gen(7))  # seeded -> reproducible


def test_kid_is_unbiased_at_tiny_n():
    # many independent pairs of 20-sample sets from one distribution: the unbiased estimate averages
    # to ~0, while the biased (V-statistic, diagonal kept) version is clearly positive.
    g = gen(8)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
        unbiased.append(mmd2_unbiased(x, y))
        kx, ky, kxy = ((p @ q.T / 4 + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        biased.append((kx.mean() + ky.mean() - 2 * kxy.mean()).item())
    unbiased, biased = torch.tensor(unbiased), torch.tensor(biased)
    stderr = unbiased.std() / math.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 4 * stderr
    assert biased.mean() > 10 * stderr


# ----------------------------------------------------------------------------- floor

def test_real_floor_below_shifted_fid():
    g = gen(9)
    pool = torch.randn(1000, 8, generator=g)
    floor = real_floor(pool, 200, subsets=10, subset_size=100, generator=gen(10))
    assert set(floor) == {"n", "fid", "kid", "kid_std"} and floor["n"] == 200
    fake = torch.randn(200, 8, generator=g) + 0.5
    assert 0 < floor["fid"] < frechet_distance(pool[:200], fake)
    assert floor["kid"] < kernel_distance(pool[:200], fake, subsets=10, subset_size=100, generator=gen(11))[0]


def test_real_floor_needs_two_disjoint_draws():
    with pytest.raises(ValueError, match="2n = 200"):
        real_floor(torch.randn(150, 4), 100)


# ----------------------------------------------------------------------------- diversity

def test_mean_pairwise_distance_hand_computed():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    # pairs: |(0,0)-(3,4)| = 5, |(0,0)-(0,4)| = 4, |(3,4)-(0,4)| = 3 -> mean 4
    assert mean_pairwise_distance(feats) == pytest.approx(4.0)
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 1.0], [99.0, 99.0]])
    groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one member: skipped
    assert mean_pairwise_distance(feats, groups) == pytest.approx((5.0 + 1.0) / 2)


def test_coverage_and_entropy_hand_computed():
    fraction, counts = coverage(torch.tensor([0, 0, 2, 3, 3, 3]), num_classes=5)
    assert fraction == pytest.approx(3 / 5)
    assert counts.tolist() == [2, 0, 1, 3, 0]
    assert normalized_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([7, 0, 0])) == pytest.approx(0.0)
    expected = -(0.5 * math.log(0.5) * 2) / math.log(4)  # two of four classes, evenly
    assert normalized_entropy(torch.tensor([3, 3, 0, 0])) == pytest.approx(expected)


# ----------------------------------------------------------------------------- errors

def test_input_validation_messages():
    with pytest.raises(ValueError, match="must be 2-D"):
        frechet_distance(torch.randn(10), torch.randn(10, 1))
    with pytest.raises(ValueError, match="feature dims differ"):
        kernel_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        frechet_distance(bad, torch.randn(10, 3))
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance_from_stats(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        coverage(torch.tensor([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match="integer"):
        coverage(torch.tensor([0.0, 1.0]), num_classes=3)
    with pytest.raises(ValueError, match="no group has at least 2 members"):
        mean_pairwise_distance(torch.randn(3, 2), groups=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="positive total"):
        normalized_entropy(torch.tensor([0, 0]))


def test_psnr_closed_form():
    from minidalle2.lab.metrics import psnr
    targets = torch.zeros(3, 3, 8, 8)
    images = targets + torch.tensor([0.2, 0.02, 2.0]).view(3, 1, 1, 1)
    # MSE 0.04, 0.0004, 4 with peak-to-peak 2: 10 log10(4 / MSE) = 20, 40, 0 dB
    torch.testing.assert_close(psnr(images, targets), torch.tensor([20.0, 40.0, 0.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(images, targets[:2])
