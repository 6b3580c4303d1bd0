"""Class labels and guidance: W = 1 is unguided sampling bit for bit; on a two-class Gaussian toy with exact
denoisers, classifier-free guidance and autoguidance move the samples as the math says; a conditional digits run
trains, loads in sample.py and probe.py, samples its requested classes, and bad --class / --guidance flags end
in one line."""


import pytest
import torch

from conftest import COND
from tools.config import build_network, load_config
from tools.edm import Denoiser
from tools.rng import SeedNoise
from tools.sampler import GuidedDenoiser, one_hot, sample, seed_classes

# --- the Gaussian toy ------------------------------------------------------------------------------------------

def mixture_denoiser(means, s):
    """Exact D(x; sigma, c) for data whose class k, of equal prior, is N(mu_k, s^2 I) (x: [N, d, 1, 1], means [K, d]).

    Conditional (one-hot c): the posterior mean of one Gaussian, mu_k + s^2 / (s^2 + sigma^2) (x - mu_k).
    Unconditional (c a zero vector, the dropped label, or None): the mixture's posterior mean
    sum_k p(k | x; sigma) D(x; sigma, k), with p(k | x; sigma) proportional to N(x; mu_k, (s^2 + sigma^2) I)."""
    mu = torch.as_tensor(means, dtype=torch.float64)

    def D(x, sigma, class_labels=None, dropout_keys=None):
        y = x.reshape(len(x), -1).to(torch.float64)
        var = s ** 2 + sigma.reshape(-1, 1).to(torch.float64) ** 2
        per_class = mu + (s ** 2 / var)[:, :, None] * (y[:, None] - mu)             # [N, K, d]
        if class_labels is None or not class_labels.any():
            weights = (-((y[:, None] - mu) ** 2).sum(-1) / (2 * var)).softmax(dim=1)  # p(k | x; sigma)
        else:
            weights = class_labels.to(torch.float64)
        return (weights[:, :, None] * per_class).sum(1).reshape(x.shape)
    return D


def toy_samples(denoiser, n, dim, labels, steps=32):
    return sample(denoiser, SeedNoise(range(n), "cpu"), (dim, 1, 1), labels, steps=steps).reshape(n, dim).to(torch.float64)


def test_classifier_free_guidance_moves_samples_toward_the_requested_class():
    """Two overlapping classes in 2-D, N((-1, 0), I) and N((1, 0), I); class 1 requested. W = 0 samples the
    mixture, W = 1 the class itself; up to W = 1 the mean distance to the class mean falls. For every W the mean
    moves further toward class 1 along the axis of the two means and more samples lie nearer mu_1 than mu_0.
    (Past W ~ 1.5 the mean distance rises again: CFG pushes away from the other class, past the class mean, as the
    probability p(c | x) it sharpens says. Measured: 1.77, 1.44, 1.26 at W = 0, 0.5, 1; 1.21, 1.24, 1.41 at 1.5, 2, 3.)"""
    means, n = [[-1.0, 0.0], [1.0, 0.0]], 2000
    D = mixture_denoiser(means, 1.0)
    mu0, mu1 = torch.tensor(means[0], dtype=torch.float64), torch.tensor(means[1], dtype=torch.float64)
    axis = (mu1 - mu0) / (mu1 - mu0).norm()
    labels = one_hot([1] * n, 2)
    distance, along, nearer = [], [], []
    for w in (0.0, 0.5, 1.0, 2.0, 3.0):
        x = toy_samples(GuidedDenoiser(D, D, w, guide_labels="dropped"), n, 2, labels)
        distance.append((x - mu1).norm(dim=1).mean().item())
        along.append(((x.mean(0) - mu1) @ axis).item())
        nearer.append(((x - mu1).norm(dim=1) < (x - mu0).norm(dim=1)).double().mean().item())
    assert distance[0] > distance[1] > distance[2], distance
    assert all(b > a for a, b in zip(along, along[1:])) and all(b > a for a, b in zip(nearer, nearer[1:])), (along, nearer)
    # W = 0 is the unconditional mixture (mean between the classes), W = 1 the class: its mean within 4 standard
    # errors (1 / sqrt(2000) = 0.022) plus the 32-step discretisation, and half the samples nearer each mean at W = 0.
    assert along[0] == pytest.approx(-1.0, abs=0.1) and along[2] == pytest.approx(0.0, abs=0.1)
    assert nearer[0] == pytest.approx(0.5, abs=0.05)


def test_autoguidance_by_a_broader_guide_sharpens_around_the_same_mean():
    """Autoguidance on one Gaussian N(mu, s^2), the guide a weaker model that believes the data broader (s_guide > s).
    W = 1 samples the data (variance s^2); the guided denoiser is linear in x, its samples Gaussian with the same mean
    and a variance that falls as W grows (guidance pushes away from the guide's errors, here its excess spread)."""
    mu, s, s_guide, n = 0.5, 0.5, 0.8, 4000
    main, guide = mixture_denoiser([[mu]], s), mixture_denoiser([[mu]], s_guide)
    labels = one_hot([0] * n, 1)
    variances = []
    for w in (1.0, 1.5, 2.0, 3.0):
        x = toy_samples(GuidedDenoiser(main, guide, w, guide_labels="same"), n, 1, labels)
        assert x.mean().item() == pytest.approx(mu, abs=0.04)  # 5 standard errors: 5 * 0.5 / sqrt(4000)
        variances.append(x.var().item())
    assert variances[0] == pytest.approx(s ** 2, rel=0.1)  # 4 standard errors of a variance on 4000 samples: 9%
    assert all(b < 0.95 * a for a, b in zip(variances, variances[1:])), variances


# --- the wrapper, the classes of the seeds, the grid ----------------------------------------------------------

def test_weight_one_is_unguided_sampling_bit_for_bit():
    """Same seeds, same network: GuidedDenoiser with W = 1 gives the unguided images exactly (the guide is not even
    evaluated); W = 2 gives other images, so the comparison could fail."""
    torch.manual_seed(1)
    cfg = load_config(COND, ["network.model_channels=8"])
    net = build_network(cfg).eval().requires_grad_(False)
    for p in net.parameters():  # random weights everywhere (zero-initialised gains would hide the label path)
        p.data.normal_(0, 0.5)
    D = Denoiser(net, 0.5)
    seeds, shape = [3, 7], (1, 16, 16)
    labels = one_hot(seed_classes(seeds, 10), 10)
    with torch.no_grad():
        plain = sample(D, SeedNoise(seeds, "cpu"), shape, labels, steps=3)
        same = sample(GuidedDenoiser(D, D, 1.0, guide_labels="dropped"), SeedNoise(seeds, "cpu"), shape, labels, steps=3)
        guided = sample(GuidedDenoiser(D, D, 2.0, guide_labels="dropped"), SeedNoise(seeds, "cpu"), shape, labels, steps=3)
    assert torch.equal(plain, same)
    assert not torch.allclose(plain, guided, atol=1e-3)


# --- a conditional digits run through the scripts -----------------------------------------------------------------



