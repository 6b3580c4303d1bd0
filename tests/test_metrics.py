"""Sample-quality metrics against independent computations: closed forms, brute-force loops, numpy."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

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
    assert fid.frechet_distance is metrics.frechet_distance and fid.kid is metrics.kid  # old callers keep working


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

def random_images(n, rng, shape=(3, 6, 5)):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


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


def test_save_nearest_pairs_grid(tmp_path):
    rng = np.random.default_rng(11)
    samples, train = random_images(6, rng, (3, 5, 4)), random_images(9, rng, (3, 5, 4))
    index, dists = np.array([8, 0, 3, 1, 2, 5]), np.array([9.0, 7.0, 1.0, 8.0, 3.0, 2.0])
    path = metrics.save_nearest_pairs(str(tmp_path / "pairs.png"), torch.from_numpy(samples), train, index, dists, num=4)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 * (5 + 2) + 2, 2 * (4 + 2) + 2, 3)
    first, second = grid[2:7, 2:6], grid[2:7, 8:12]  # row 0: the closest sample (2) and its training image (3)
    np.testing.assert_array_equal(first, samples[2].transpose(1, 2, 0))
    np.testing.assert_array_equal(second, train[3].transpose(1, 2, 0))
    np.testing.assert_array_equal(grid[9:14, 2:6], samples[5].transpose(1, 2, 0))  # row 1: the next closest
    assert (grid[:2] == 128).all() and (grid[7:9] == 128).all() and (grid[:, 6:8] == 128).all()

    gray = metrics.save_nearest_pairs(str(tmp_path / "gray.png"), samples[:, :1], train[:, :1], index, dists)
    assert np.asarray(Image.open(gray)).shape == (6 * 7 + 2, 14)  # num clipped to the 6 samples
