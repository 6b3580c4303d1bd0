"""Sample-quality metrics on features and pixels, in float64 (docs/METRICS.md)."""

import warnings

import numpy as np
import torch

from tools.cli import UserError

KID_SUBSET_SIZE = 1000
CHUNK = 1024  # rows of distances held at once: CHUNK x N float64


def feature_stats(feats):
    """Mean and unbiased covariance (ddof = 1, as pytorch-fid) of features [n, d], float64 numpy."""
    x = _numpy(feats).astype(np.float64)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017), in float64."""
    import scipy.linalg  # lazy: a second of start-up
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # S1 S2 is singular when n < d
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps  # as pytorch-fid
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # real eigenvalues: imaginary parts are round-off
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(S1 S2) has an imaginary part of {np.abs(covmean.imag).max():.3g}: covariances not PSD?")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kid(feats_a, feats_b, num_subsets=100, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID (Binkowski et al. 2018): (mean, std) of the unbiased MMD^2, k(x, y) = (x.y / d + 1)^3, over random subsets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m, d = min(subset_size, len(a), len(b)), a.shape[1]
    rng = np.random.default_rng(seed)
    mmd = np.empty(num_subsets)
    for i in range(num_subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3  # less diagonals: unbiased
        mmd[i] = ((k_xx.sum() - np.trace(k_xx)) + (k_yy.sum() - np.trace(k_yy))) / (m * (m - 1)) - 2 * k_xy.mean()
    return float(mmd.mean()), float(mmd.std())


def precision_recall(real, fake, k=3):
    """The fractions of fake points in real points' k-NN balls and vice versa (Kynkaanniemi et al. 2019)."""
    real, fake = (_float_rows(torch.as_tensor(x)) for x in (real, fake))
    if real.shape[1] != fake.shape[1] or min(len(real), len(fake)) <= k:
        raise UserError(f"precision/recall needs two feature sets of one dimension with more than k = {k} points each, "
                        f"got real {tuple(real.shape)} and fake {tuple(fake.shape)}")
    fake = fake.to(real.device)
    return dict(precision=_fraction_inside(fake, real, _knn_radii(real, k)), recall=_fraction_inside(real, fake, _knn_radii(fake, k)))


def _knn_radii(x, k):
    radii = torch.empty(len(x), dtype=torch.float64, device=x.device)
    for start, d in _distance_chunks(x, x):
        rows = torch.arange(len(d), device=x.device)
        d[rows, start + rows] = float("inf")  # a point is not its own neighbour (its copies are)
        radii[start:start + len(d)] = d.kthvalue(k, dim=1).values
    return radii


def _fraction_inside(points, centres, radii):
    return sum(int((d <= radii).any(1).sum()) for _, d in _distance_chunks(points, centres)) / len(points)


def class_coverage(probs):
    """Entropy of the predicted-class histogram of softmax outputs [N, K], its maximum log K, the mean top probability."""
    p = _numpy(probs).astype(np.float64)
    freq = np.bincount(p.argmax(1), minlength=p.shape[1]) / len(p)
    freq = freq[freq > 0]
    return dict(class_entropy=float(-(freq * np.log(freq)).sum()), class_entropy_max=float(np.log(p.shape[1])), confidence=float(p.max(1).mean()))


def nearest_distances(queries, references, chunk=CHUNK):
    """(distance, index) of each image's nearest reference image, Euclidean on the uint8 values, numpy."""
    q = _float_rows(torch.as_tensor(queries))
    nearest = [d.min(1) for _, d in _distance_chunks(q, _float_rows(torch.as_tensor(references)).to(q.device), chunk)]
    if not nearest:
        return np.zeros(0), np.zeros(0, np.int64)
    return torch.cat([n.values for n in nearest]).cpu().numpy(), torch.cat([n.indices for n in nearest]).cpu().numpy()


def memorisation(sample_dists, heldout_dists, percentile=5):
    """The fraction of samples nearer to the training set than the `percentile`-th percentile of held-out images."""
    threshold = float(np.percentile(np.asarray(heldout_dists, np.float64), percentile))
    return dict(memorised_fraction=float(np.mean(np.asarray(sample_dists, np.float64) < threshold)), threshold=threshold)


def _numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _float_rows(x):
    return x.to(torch.float64).flatten(1)


def _distance_chunks(x, y, chunk=CHUNK):
    """(start, distances [<= chunk, len(y)]): ||x||^2 + ||y||^2 - 2 x.y, exact on uint8 pixels."""
    y_sq = (y * y).sum(1)
    for start in range(0, len(x), chunk):
        xc = x[start:start + chunk]
        yield start, ((xc * xc).sum(1)[:, None] + y_sq[None] - 2 * xc @ y.T).clamp_min_(0).sqrt_()
