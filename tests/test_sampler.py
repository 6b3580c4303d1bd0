"""tools/sampler.py against exact references: SeedNoise is standard normal and per seed; every sampler converges at its
order to the exact probability-flow solution or the exact output distribution of Gaussian data; image k depends on
seed k alone; the reported evaluation counts are the calls made."""

import math

import numpy as np
import pytest
import torch

from tools.config import DEFAULTS
from tools.rng import SeedNoise
from tools.sampler import PARAMS, SAMPLERS, SCHEDULE, edm_sigmas, folder_tag, sample, sampler_kwargs, sampler_nfe

MU, S, SIGMA_MAX, SIGMA_MIN = 0.3, 0.5, 80.0, 0.002
STOCHASTIC = [name for name, info in SAMPLERS.items() if info.stochastic]


def gaussian_denoiser(x, sigma, class_labels=None):
    """Exact D(x; sigma) = E[y | y + sigma n = x] for data y ~ N(MU, S^2) per element."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def flow(x_T, sigma):
    """The probability-flow ODE of that data from sigma_max to sigma: x - MU scales as sqrt(S^2 + sigma^2)."""
    return MU + (x_T - MU) * math.sqrt(S ** 2 + sigma ** 2) / math.sqrt(S ** 2 + SIGMA_MAX ** 2)


class FixedNoise:
    """A noise source whose first draw is `z` (the initial image / sigma_max); deterministic samplers draw no more."""

    device = "cpu"

    def __init__(self, z):
        self.z = z

    def randn(self, shape):
        return self.z


class BasisNoise:
    """Draw d of image i is 1 where i = d + 1 and 0 elsewhere (image 0: all zero); counts the draws it is asked for."""

    device = "cpu"

    def __init__(self, draws):
        self.draws, self.drawn = draws, 0

    def randn(self, shape):
        z = torch.zeros(self.draws + 1, *shape, dtype=torch.float64)
        if self.drawn < self.draws:
            z[self.drawn + 1] = 1
        self.drawn += 1
        return z


# ----------------------------------------------------------------------------------------------------
# Deterministic samplers: the ODE solution.

def ode_errors(sampler, steps, **kwargs):
    """Max |error| over x_T = 80 z, z in [-3, 3], against the exact solution of what the sampler integrates: the flow
    to sigma_min and the denoised image there (its last step, an Euler step to 0), or for lms the flow to 0 (it
    extrapolates dx/dsigma to 0); the two differ by (x - MU) sigma_min^2 / 2 S^2 ~ 1e-5."""
    z = torch.linspace(-3, 3, 25, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_min = flow(SIGMA_MAX * z, SIGMA_MIN)
    exact = flow(SIGMA_MAX * z, 0.0) if sampler == "lms" else MU + S ** 2 / (S ** 2 + SIGMA_MIN ** 2) * (x_min - MU)
    return [(sample(gaussian_denoiser, FixedNoise(z), (1, 1, 1), sampler=sampler, steps=n, **kwargs) - exact).abs().max().item()
            for n in steps]


ORDER_CASES = [  # every fixed-step sampler, with the step counts where its error ratio settles
    ("heun", {}, (32, 64, 128)),                       # 4.28, 4.13
    ("euler", {}, (32, 64, 128)),                      # 1.99, 1.99
    ("dpmpp2m", {}, (32, 64, 128)),                    # 4.46, 4.22
    ("lms", {}, (64, 128, 256)),                       # 13.5, 14.6 (11.1 from 32; the order-1..3 start costs)
    ("dpm2", {}, (32, 64, 128)),                       # 4.26, 4.12
    ("euler_ancestral", dict(eta=0), (32, 64, 128)),   # eta = 0: the ODE; 1.99, 1.99
    ("dpm2_ancestral", dict(eta=0), (32, 64, 128)),    # 4.26, 4.12
    ("dpmpp2s_ancestral", dict(eta=0), (32, 64, 128)),  # 3.98, 4.00
    ("dpmpp2m_sde", dict(eta=0), (32, 64, 128)),       # 4.67, 4.28
    ("dpmpp3m_sde", dict(eta=0), (64, 128, 256)),      # 8.54, 8.23
]


def test_every_registered_sampler_has_its_order_measured():
    assert [c[0] for c in ORDER_CASES] == [n for n, s in SAMPLERS.items() if s.nfe_per_step is not None]


@pytest.mark.parametrize("sampler,kwargs,steps", ORDER_CASES)
def test_ode_error_falls_at_the_samplers_order(sampler, kwargs, steps):
    """Doubling the steps divides the error by 2^order within [0.75, 1.5] x (measured ratios beside each case)."""
    errors = ode_errors(sampler, steps, **kwargs)
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    order = SAMPLERS[sampler].order
    assert all(0.75 * 2 ** order < r < 1.5 * 2 ** order for r in ratios), (errors, ratios)


def test_dpm_adaptive_error_falls_with_its_tolerance():
    """rtol 0.05 .. 1e-4 (atol = rtol / 10): max error 2.6e-2, 6.9e-3, 1.8e-3, 3.3e-4, 5.2e-5, each at least 2.5x below
    the last (seen 3.8, 3.9, 5.3, 6.4), while the mean evaluations per image grow (seen 31, 41, 61, 84, 111); the
    images take different numbers of steps, and stats counts the calls made."""
    z = torch.linspace(-3, 3, 25, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_min = flow(SIGMA_MAX * z, SIGMA_MIN)
    exact = MU + S ** 2 / (S ** 2 + SIGMA_MIN ** 2) * (x_min - MU)
    errors, nfe = [], []
    for rtol in (0.05, 0.01, 2e-3, 4e-4, 1e-4):
        stats = {}
        x = sample(gaussian_denoiser, FixedNoise(z), (1, 1, 1), sampler="dpm_adaptive", rtol=rtol, atol=rtol / 10, stats=stats)
        errors.append((x - exact).abs().max().item())
        nfe.append(stats["image_nfe"].double().mean().item())
        assert stats["image_nfe"].max() <= stats["nfe"] and stats["image_nfe"].min() < stats["image_nfe"].max()
    assert all(b < a / 2.5 for a, b in zip(errors, errors[1:])), errors
    assert all(b > a for a, b in zip(nfe, nfe[1:])), nfe


# ----------------------------------------------------------------------------------------------------
# Stochastic samplers: the output distribution.

def exact_moments(eta):
    """Mean and variance at sigma = 0 of the exact reverse SDE with Langevin rate eta per unit ln sigma (eta = 0: the
    ODE) from x_T ~ N(0, sigma_max^2): with q = S^2 / (S^2 + sigma_max^2), E x - MU and Var x - S^2 solve linear
    ODEs in sigma, giving MU (1 - q^((1 + eta) / 2)) and S^2 (1 - q^(1 + eta)); N(MU, S^2) up to 4e-5."""
    q = S ** 2 / (S ** 2 + SIGMA_MAX ** 2)
    return MU * (1 - q ** ((1 + eta) / 2)), S ** 2 * (1 - q ** (1 + eta))


def output_moments(sampler, steps, **kwargs):
    """The sampler's exact output mean and variance: with this linear denoiser the output is b + sum_d a_d z_d in its
    noise draws z_d ~ N(0, 1), so one run with basis noise (image 0 all zero: b; image d + 1: b + a_d) gives
    mean b and variance sum_d a_d^2 with no Monte Carlo error."""
    probe = BasisNoise(0)
    sample(gaussian_denoiser, probe, (1, 1, 1), sampler=sampler, steps=steps, **kwargs)
    x = sample(gaussian_denoiser, BasisNoise(probe.drawn), (1, 1, 1), sampler=sampler, steps=steps, **kwargs).flatten().double()
    return x[0].item(), (x[1:] - x[0]).square().sum().item()


@pytest.mark.parametrize("sampler,eta,sde_eta,steps", [
    ("euler_ancestral", 1.0, 1.0, (64, 128, 256)),     # variance error ratios 1.89, 1.94
    ("dpm2_ancestral", 1.0, 1.0, (64, 128, 256)),      # 4.15, 4.11
    ("dpmpp2s_ancestral", 1.0, 1.0, (64, 128, 256)),   # 3.84, 3.89
    ("dpmpp2m_sde", 1.0, 1.0, (64, 128, 256)),         # 4.42, 4.20
    ("dpmpp3m_sde", 1.0, 1.0, (128, 256, 512)),        # 3.36, 4.51 (its error changes sign near 48 steps)
    ("euler_ancestral", 0.5, 0.25, (64, 128, 256)),    # DDIM's eta 0.5 is the SDE of rate 0.25: 1.93, 1.96
    ("dpmpp2m_sde", 0.5, 0.5, (64, 128, 256)),         # 4.36, 4.20
])
def test_output_distribution_converges_at_the_weak_order(sampler, eta, sde_eta, steps):
    """Doubling the steps divides the error in the output variance by 2^weak_order within [0.75, 1.5] x (measured
    beside each case), against the exact SDE's; the error in the mean falls by 1.5x or is float32 rounding (at
    eta = 1 the first-order steps carry the mean exactly: seen 1.2e-8; else 5e-7 .. 1e-5 at the most steps)."""
    target_mean, target_var = exact_moments(sde_eta)
    moments = [output_moments(sampler, n, eta=eta) for n in steps]
    mean_errors = [abs(m - target_mean) for m, _ in moments]
    var_errors = [abs(v - target_var) for _, v in moments]
    ratios = [a / b for a, b in zip(var_errors, var_errors[1:])]
    order = SAMPLERS[sampler].weak_order
    assert all(0.75 * 2 ** order < r < 1.5 * 2 ** order for r in ratios), (var_errors, ratios)
    assert all(b < a / 1.5 + 1e-7 for a, b in zip(mean_errors, mean_errors[1:])) and mean_errors[-1] < 2e-5, mean_errors


# ----------------------------------------------------------------------------------------------------
# Determinism, counts, interface.

@pytest.mark.parametrize("sampler", STOCHASTIC + ["heun", "dpm_adaptive"])
def test_image_k_depends_on_seed_k_only(sampler):
    """The same seeds in other batches, orders and beside copies give bit-identical images (heun with churn), and
    the noise matters: another seed gives another image."""
    kwargs = dict(S_churn=10) if sampler == "heun" else {}
    run = lambda seeds: sample(gaussian_denoiser, SeedNoise(seeds, "cpu"), (1, 4, 4), sampler=sampler, steps=6, **kwargs)
    a = run([0, 1, 2, 3, 4, 5])
    b = torch.cat([run(chunk) for chunk in ([4, 5], [3, 3, 0, 1, 2])])
    assert torch.equal(b, torch.cat([a[4:], a[[3, 3]], a[:3]]))
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_reported_evaluations_are_the_calls_made(sampler):
    """stats["nfe"] is the number of denoiser calls, stats["image_nfe"] each image's rows among them, and for a
    fixed-step sampler sampler_nfe(sampler, steps) is that number."""
    calls, rows = [], torch.zeros(5, dtype=torch.int64)

    def counting(x, sigma, class_labels=None):
        calls.append(len(x))
        return gaussian_denoiser(x, sigma)

    stats = {}
    sample(counting, SeedNoise(range(5), "cpu"), (1, 2, 2), sampler=sampler, steps=7, stats=stats)
    assert stats["nfe"] == len(calls) and stats["image_nfe"].sum().item() == sum(calls)
    if SAMPLERS[sampler].nfe_per_step is not None:
        assert stats["nfe"] == sampler_nfe(sampler, 7) and torch.equal(stats["image_nfe"], torch.full_like(rows, len(calls)))


def test_sampler_interface():
    """An unknown sampler is a ValueError; the registry feeds the config (its parameters are sample.* keys with the
    same defaults) and the sample folders' names (the parameters a sampler declares, where not at their default)."""
    with pytest.raises(ValueError):
        sample(gaussian_denoiser, SeedNoise([0], "cpu"), (1, 1, 1), sampler="ddim")
    section = dict(DEFAULTS["sample"])
    assert set(sampler_kwargs(section)) == {"sampler", *SCHEDULE, *PARAMS} and set(PARAMS) <= set(section)
    assert all(section[k] == default for k, (default, *_) in PARAMS.items())
    assert list(SAMPLERS)[:3] == ["heun", "euler", "dpmpp2m"]
    assert [sampler_nfe(s, 18) for s in ("heun", "euler", "dpm2", "lms")] == [35, 18, 35, 18]
    tags = {folder_tag(dict(section, **keys)) for keys in ({}, {"S_churn": 40}, {"sampler": "dpm_adaptive"}, {"sampler": "dpm_adaptive",
            "rtol": 0.2}, {"sampler": "euler_ancestral"}, {"sampler": "euler_ancestral", "eta": 0.5}, {"S_noise": 1.007})}
    assert tags == {"heun18", "heun18-S_churn40", "dpm_adaptive", "dpm_adaptive-rtol0.2", "euler_ancestral18",
                    "euler_ancestral18-eta0.5"}  # S_noise does not change heun's path without churn


def gaussian_of(mu, s):
    """Exact D(x; sigma) = E[y | y + sigma n = x] for data y ~ N(mu, s^2) per element."""
    def D(x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
    return D


def exact_flow(x_T, mu, s, sigma_max=80.0):
    """The probability-flow ODE of that Gaussian maps x at sigma_max to mu + (x - mu) s / sqrt(s^2 + sigma_max^2)."""
    return mu + (x_T - mu) * s / np.sqrt(s ** 2 + sigma_max ** 2)


def test_schedule_matches_edm():
    s = edm_sigmas(18)
    assert len(s) == 19 and s[-1] == 0
    assert s[0].item() == pytest.approx(80) and s[17].item() == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp2m"])
def test_gaussian_data_error_falls_with_steps(sampler):
    mu, s, n = 0.3, 0.5, 4096
    seeds = range(n)
    D = gaussian_of(mu, s)
    x_T = SeedNoise(seeds, "cpu").randn((1, 2, 2)).to(torch.float64) * 80
    target = exact_flow(x_T, mu, s)
    errors = []
    for steps in (8, 16, 32, 64):
        x = sample(D, SeedNoise(seeds, "cpu"), (1, 2, 2), sampler=sampler, steps=steps).to(torch.float64)
        errors.append((x - target).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    x = sample(D, SeedNoise(seeds, "cpu"), (1, 2, 2), sampler=sampler, steps=64)
    # 16,384 values: the standard error of the mean is s / 128 = 0.004 and of the variance 2^0.5 s^2 / 128 = 0.003;
    # 5 standard errors of slack on top of the (measured) discretisation error.
    assert x.mean().item() == pytest.approx(mu, abs=0.02 + errors[-1])
    assert x.var().item() == pytest.approx(s ** 2, abs=0.015 + 2 * errors[-1])


@pytest.mark.parametrize("sampler,order", [("heun", 2), ("euler", 1)])
def test_convergence_order(sampler, order):
    """Doubling the steps divides the error by ~2^order: Heun is second order (seen: 4.3x, 4.2x), Euler first."""
    mu, s = 0.0, 0.5
    x_T = SeedNoise(range(256), "cpu").randn((1, 4, 4)).to(torch.float64) * 80
    errors = [(sample(gaussian_of(mu, s), SeedNoise(range(256), "cpu"), (1, 4, 4), sampler=sampler, steps=n)
               - exact_flow(x_T, mu, s)).abs().max().item() for n in (32, 64, 128)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(0.75 * 2 ** order < r < 1.5 * 2 ** order for r in ratios), ratios
    if sampler == "heun":  # the default, 18 steps (35 evaluations): seen 0.11 at the tails (|x| up to 2), 5.5% median
        x = sample(gaussian_of(mu, s), SeedNoise(range(256), "cpu"), (1, 4, 4), steps=18)
        assert (x - exact_flow(x_T, mu, s)).abs().max().item() < 0.15


def test_image_k_is_independent_of_batch():
    D = gaussian_of(0.0, 0.5)
    a = sample(D, SeedNoise([0, 1, 2, 3, 4, 5], "cpu"), (1, 4, 4), steps=6, S_churn=10)
    b = torch.cat([sample(D, SeedNoise(chunk, "cpu"), (1, 4, 4), steps=6, S_churn=10) for chunk in ([4, 5], [0, 1, 2, 3])])
    torch.testing.assert_close(b, torch.cat([a[4:], a[:4]]), rtol=0, atol=0)
