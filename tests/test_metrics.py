"""Sample-quality metrics against independent computations: closed forms, brute-force loops, numpy."""


import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import pytorch_fid_distance, random_images, random_stats
from tools import fid, metrics
from tools.cli import UserError

# ---------------------------------------------------------------------------------------------
# FID and KID.

def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-10)


def test_frechet_distance_of_general_gaussians_matches_symmetric_sqrtm():
    """Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2): the same trace from a symmetric PSD matrix."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((24, 48)), rng.standard_normal((24, 48))
    s1, s2 = a @ a.T / 48, b @ b.T / 48 + 0.5 * np.eye(24)
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    root1 = scipy.linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_stats_match_streaming_stats_and_give_zero_self_fid():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 32)) * rng.uniform(0.5, 3, 32) + 5
    mu, sigma = metrics.feature_stats(torch.from_numpy(x))
    mu_ref, sigma_ref = fid.FeatureStats(dim=32).update(x).mu_sigma()
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def brute_force_mmd2(x, y):
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, pair by pair."""
    k = lambda u, v: (np.dot(u, v) / len(u) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_single_subset_matches_brute_force_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((40, 6)) + 0.4
    mean, std = metrics.kid(x, y, num_subsets=1, subset_size=40)  # the subset is all of each set, reordered
    assert mean == pytest.approx(brute_force_mmd2(x, y), rel=1e-10) and std == 0


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((4000, 16))
    same_mean, same_std = metrics.kid(a[:2000], a[2000:], num_subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std
    shifted_mean, shifted_std = metrics.kid(a[:2000], a[2000:] + 0.5, num_subsets=20, subset_size=500)
    assert shifted_mean > 10 * shifted_std and shifted_mean > 100 * abs(same_mean)


# ---------------------------------------------------------------------------------------------
# Precision and recall.

def brute_force_precision_recall(real, fake, k):
    def radii(x):
        return [sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def inside(points, centres):
        r = radii(centres)
        return np.mean([any(np.linalg.norm(p - c) <= r[j] for j, c in enumerate(centres)) for p in points])

    return inside(fake, real), inside(real, fake)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real, fake = rng.standard_normal((40, 5)), rng.standard_normal((30, 5)) + 1
    r = metrics.precision_recall(real, fake, k=k)
    precision, recall = brute_force_precision_recall(real, fake, k)
    assert (r["precision"], r["recall"]) == (precision, recall)
    assert 0 < precision < 1 and 0 < recall < 1  # the sets overlap partly, so both counts are exercised


def test_precision_recall_extremes():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((50, 8))
    assert metrics.precision_recall(real, torch.from_numpy(real)) == dict(precision=1.0, recall=1.0)
    assert metrics.precision_recall(real, real + 100) == dict(precision=0.0, recall=0.0)
    # Mode collapse: every fake is one real point, so its balls have radius 0 and reach at most that point.
    collapsed = metrics.precision_recall(real, np.repeat(real[:1], 20, axis=0))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] <= 1 / len(real)


def test_precision_recall_rejects_bad_sets_in_one_line():
    rng = np.random.default_rng(7)
    for real, fake in ((rng.standard_normal((10, 4)), rng.standard_normal((10, 5))),
                       (rng.standard_normal((10, 4)), rng.standard_normal((3, 4)))):
        with pytest.raises(UserError) as e:
            metrics.precision_recall(real, fake, k=3)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Class coverage.

def test_class_coverage():
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=1000)
    probs = probs[np.argsort(probs.argmax(1), kind="stable")]
    even = np.concatenate([probs[probs.argmax(1) == c][:50] for c in range(10)])  # 50 predictions of each class
    r = metrics.class_coverage(even)
    assert r["class_entropy"] == pytest.approx(np.log(10), rel=1e-12) and r["class_entropy_max"] == pytest.approx(np.log(10))
    assert r["confidence"] == pytest.approx(np.mean([max(p) for p in even]), rel=1e-12)

    one_class = np.full((100, 10), 0.05)
    one_class[:, 3] = 0.55
    r = metrics.class_coverage(torch.from_numpy(one_class))
    assert r["class_entropy"] == 0 and r["confidence"] == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------
# Memorisation.


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(9)
    queries, refs = random_images(37, rng), random_images(53, rng)
    dist, index = metrics.nearest_distances(torch.from_numpy(queries), refs, chunk=10)  # several chunks
    expected = [[np.linalg.norm(q.astype(np.float64) - r.astype(np.float64)) for r in refs] for q in queries]
    np.testing.assert_array_equal(index, np.argmin(expected, axis=1))
    np.testing.assert_array_equal(dist, np.min(expected, axis=1))  # exact: uint8 sums stay integers in float64
    assert dist.dtype == np.float64 and index.dtype == np.int64


def test_memorisation_flags_copies_and_calibrates_on_heldout_images():
    rng = np.random.default_rng(10)
    train, heldout, fresh = random_images(300, rng, (1, 4, 4)), random_images(2000, rng, (1, 4, 4)), random_images(2000, rng, (1, 4, 4))
    heldout_dists, _ = metrics.nearest_distances(heldout, train)
    copies_dists, copies_index = metrics.nearest_distances(train[::3], train)
    assert metrics.memorisation(copies_dists, heldout_dists)["memorised_fraction"] == 1.0
    np.testing.assert_array_equal(copies_index, np.arange(0, 300, 3))

    r = metrics.memorisation(heldout_dists, heldout_dists, percentile=5)
    assert r["threshold"] == np.percentile(heldout_dists, 5)
    assert r["memorised_fraction"] == np.mean(heldout_dists < r["threshold"]) and 0.03 <= r["memorised_fraction"] <= 0.07
    fresh_dists, _ = metrics.nearest_distances(fresh, train)
    assert 0.03 <= metrics.memorisation(fresh_dists, heldout_dists)["memorised_fraction"] <= 0.07  # same distribution


@pytest.mark.parametrize("d", [64, 256])
def test_frechet_distance_matches_pytorch_fid(d):
    rng = np.random.default_rng(d)
    (mu1, sigma1), (mu2, sigma2) = random_stats(d, rng), random_stats(d, rng)
    mu2 = 0.1 * mu2  # the trace term, not the mean term, dominates
    ours = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(pytorch_fid_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert ours > 0


def test_fid_of_a_set_with_itself_is_zero():
    """|FID| < 1e-9 tr(S) for a full-rank covariance, < 1e-6 tr(S) for a singular one (n < d, as with few images)."""
    rng = np.random.default_rng(3)
    mu, sigma = random_stats(128, rng)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    mu, sigma = fid.FeatureStats(dim=128).update(rng.standard_normal((40, 128))).mu_sigma()
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def cubic_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1) ** 3


def test_kid_is_unbiased():
    """Subsets drawn without replacement from finite sets A, B: the mean of the unbiased estimate is the U-statistic of
    the full sets, computed exactly here; the plain V-statistic is off by more than 10 standard errors."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)) + 0.3
    k_aa, k_bb, k_ab = cubic_kernel(a, a), cubic_kernel(b, b), cubic_kernel(a, b)
    off = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))
    exact = off(k_aa) + off(k_bb) - 2 * k_ab.mean()

    m, num_subsets = 10, 4000
    mean, std = metrics.kid(a, b, num_subsets=num_subsets, subset_size=m, seed=0)
    stderr = std / np.sqrt(num_subsets)
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    v_statistic_bias = (np.diag(k_aa).mean() - off(k_aa) + np.diag(k_bb).mean() - off(k_bb)) / m
    assert v_statistic_bias > 10 * stderr

    assert metrics.kid(a, b, num_subsets=num_subsets, subset_size=m, seed=0) == (mean, std)
    full_mean, full_std = metrics.kid(a, b, num_subsets=3, subset_size=10 ** 6)  # clipped to 50: every subset of b is b
    assert full_mean != pytest.approx(exact, rel=1e-3)  # ... but only 50 of a's 60
    assert metrics.kid(a[:50], b, num_subsets=3, subset_size=10 ** 6)[0] == pytest.approx(
        off(k_aa[:50, :50]) + off(k_bb) - 2 * k_ab[:50].mean(), rel=1e-10)
