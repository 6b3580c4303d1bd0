"""Sample-quality metrics on feature vectors and pixels, in float64.

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium"):
  Frechet distance between Gaussians fitted to two feature sets.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with a cubic polynomial kernel.
- Precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models"): how much of each set lies in the k-NN balls of the other.
- Class coverage of a classifier's predictions on samples, and memorisation as nearest-training-image distances.

Pairwise distances are ||x||^2 + ||y||^2 - 2 x.y with BLAS, `CHUNK` rows at a time against the whole other set, so
memory is CHUNK x N float64 (80 MB at N = 10,000). The expansion is exact for uint8 pixel values (every sum is an
integer below 2^53); on float features its round-off (~1e-16 of the squared norms) only matters at exact ties.
"""

import warnings

import numpy as np
import torch

from tools.cli import UserError

KID_SUBSET_SIZE = 1000
CHUNK = 1024          # rows of distances held at once


# ---------------------------------------------------------------------------------------------
# FID and KID.

def feature_stats(feats):
    """Mean and unbiased covariance (ddof = 1, as pytorch-fid) of an in-memory feature set [n, d], float64 numpy."""
    x = _numpy(feats).astype(np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise UserError(f"feature statistics need a feature set [n >= 2, d], got shape {x.shape}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), in float64."""
    import scipy.linalg  # lazy: a second of start-up for every script that imports the metrics, most of which never call this
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():
        # S1 S2 is singular whenever n < d (few images); the result is checked below instead.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps  # regularise as pytorch-fid does
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # The eigenvalues of S1 S2 are real and >= 0; imaginary parts are rounding noise unless large.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary part of {np.abs(covmean.imag).max():.3g}: covariances not PSD?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(feats_a, feats_b, num_subsets=100, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over random subsets -> (mean, std)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise UserError(f"KID needs two feature sets [n, d] of one dimension, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs at least 2 features in each set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    mmd = np.empty(num_subsets)
    for i in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        # U-statistic: the diagonals k(x_i, x_i) are what bias the plain (V-statistic) estimate upwards.
        mmd[i] = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2 * k_xy.mean()
    return float(mmd.mean()), float(mmd.std())


# ---------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019).

def precision_recall(real, fake, k=3):
    """Feature sets [n, d] of any sizes -> dict(precision, recall).

    precision = fraction of fake points inside (distance <= radius) some real point's ball, recall = fraction of real
    points inside some fake point's ball; a point's radius is the distance to its k-th nearest neighbour within its own
    set, itself excluded.
    """
    real, fake = _features(real), _features(fake)
    if real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall needs two feature sets of one dimension with more than k = {k} points each, "
                        f"got real {tuple(real.shape)} and fake {tuple(fake.shape)}")
    fake = fake.to(real.device)
    return dict(precision=_fraction_inside(fake, real, _knn_radii(real, k)),
                recall=_fraction_inside(real, fake, _knn_radii(fake, k)))


def _knn_radii(x, k):
    radii = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start, d in _distance_chunks(x, x):
        rows = torch.arange(len(d), device=x.device)
        d[rows, start + rows] = float("inf")  # a point is not its own neighbour (its copies are)
        radii[start:start + len(d)] = d.kthvalue(k, dim=1).values
    return radii


def _fraction_inside(points, centres, radii):
    inside = sum(int((d <= radii).any(1).sum()) for _, d in _distance_chunks(points, centres))
    return inside / len(points)


# ---------------------------------------------------------------------------------------------
# Class coverage.

def class_coverage(probs):
    """Entropy (nats) of the histogram of predicted classes, its maximum log(num_classes), and the mean top probability,
    from a classifier's softmax outputs [N, num_classes] on generated samples.

    A generator that covers all classes evenly reaches the maximum entropy; mode collapse lowers it. Low confidence
    flags images the classifier cannot read.
    """
    p = _numpy(probs).astype(np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise UserError(f"class coverage needs probabilities [N, num_classes], got shape {p.shape}")
    freq = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
    freq = freq[freq > 0]
    return dict(class_entropy=float(-(freq * np.log(freq)).sum()), class_entropy_max=float(np.log(p.shape[1])),
                confidence=float(p.max(1).mean()))


# ---------------------------------------------------------------------------------------------
# Memorisation in pixel space.

def nearest_distances(queries, references, chunk=CHUNK):
    """Euclidean distance of each query image [N, C, H, W] to its nearest reference image, on the uint8 values as
    float64, and that image's index -> (dist float64 [Nq], index int64 [Nq]) numpy."""
    q, r = torch.as_tensor(queries), torch.as_tensor(references)
    if q.ndim != 4 or r.ndim != 4 or q.shape[1:] != r.shape[1:] or len(r) == 0:
        raise UserError(f"nearest distances need query and reference images [N, C, H, W] of one shape, "
                        f"got {tuple(q.shape)} and {tuple(r.shape)}")
    q, r = _float_rows(q), _float_rows(r).to(q.device)
    nearest = [d.min(1) for _, d in _distance_chunks(q, r, chunk)]
    if not nearest:
        return np.zeros(0), np.zeros(0, np.int64)
    return torch.cat([n.values for n in nearest]).cpu().numpy(), torch.cat([n.indices for n in nearest]).cpu().numpy()


def memorisation(sample_dists, heldout_dists, percentile=5):
    """Fraction of samples closer to the training set than the `percentile`-th percentile of held-out real images'
    nearest-training distances (both from nearest_distances against the training set).

    Held-out real images are by construction not copies, so about `percentile`% of them fall below the threshold. A
    generator that copies training images scores far above that, one that never does scores near 0; well below
    `percentile`% is normal, since generated images usually lie farther from the training set than real held-out ones.
    """
    samples, heldout = np.asarray(sample_dists, np.float64), np.asarray(heldout_dists, np.float64)
    if samples.size == 0 or heldout.size == 0:
        raise UserError(f"memorisation needs sample and held-out distances, got {samples.size} and {heldout.size}")
    threshold = float(np.percentile(heldout, percentile))
    return dict(memorised_fraction=float(np.mean(samples < threshold)), threshold=threshold)


# ---------------------------------------------------------------------------------------------
# Helpers.

def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _features(x):
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise UserError(f"expected features [n, d], got shape {tuple(x.shape)}")
    return _float_rows(x)


def _float_rows(x):
    """float64 [n, d] on the input's device; images [N, C, H, W] are flattened."""
    return torch.as_tensor(x).to(torch.float64).flatten(1)


def _distance_chunks(x, y, chunk=CHUNK):
    """(start, Euclidean distances [<= chunk, len(y)]) for `chunk` rows of x at a time."""
    y_sq = (y * y).sum(1)
    for start in range(0, len(x), chunk):
        xc = x[start:start + chunk]
        sq = (xc * xc).sum(1)[:, None] + y_sq[None] - 2 * xc @ y.T
        yield start, sq.clamp_min_(0).sqrt_()
