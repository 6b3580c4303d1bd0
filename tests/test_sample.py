"""sample.py and the samplers: rank independence, resume, accuracy on a Gaussian with a known denoiser."""

import os

import numpy as np
import pytest
import torch

from conftest import DIGITS, assert_one_line_exit_2, run_script
from tools.cli import UserError
from tools.sampler import SeedNoise, edm_sigmas, sample


def gaussian_denoiser(mu, s):
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
    D = gaussian_denoiser(mu, s)
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
    errors = [(sample(gaussian_denoiser(mu, s), SeedNoise(range(256), "cpu"), (1, 4, 4), sampler=sampler, steps=n)
               - exact_flow(x_T, mu, s)).abs().max().item() for n in (32, 64, 128)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(0.75 * 2 ** order < r < 1.5 * 2 ** order for r in ratios), ratios
    if sampler == "heun":  # the default, 18 steps (35 evaluations): seen 0.11 at the tails (|x| up to 2), 5.5% median
        x = sample(gaussian_denoiser(mu, s), SeedNoise(range(256), "cpu"), (1, 4, 4), steps=18)
        assert (x - exact_flow(x_T, mu, s)).abs().max().item() < 0.15


def test_image_k_is_independent_of_batch():
    D = gaussian_denoiser(0.0, 0.5)
    a = sample(D, SeedNoise([0, 1, 2, 3, 4, 5], "cpu"), (1, 4, 4), steps=6, S_churn=10)
    b = torch.cat([sample(D, SeedNoise(chunk, "cpu"), (1, 4, 4), steps=6, S_churn=10) for chunk in ([4, 5], [0, 1, 2, 3])])
    torch.testing.assert_close(b, torch.cat([a[4:], a[:4]]), rtol=0, atol=0)


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_script("sample.py", "--config", "config/digits/E.yaml", "--outdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no usable checkpoint") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be >= 2, got 0"),
    (["--steps", "-2"], "--steps must be >= 2, got -2"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--S_churn", "-1"], "--S_churn must be >= 0, got -1.0"),
    (["--S_noise", "nan"], "--S_noise must be >= 0, got nan"),
    (["--S_max", "-1"], "--S_max must be >= sample.S_min (0.0), got -1.0"),
    (["--S_min", "2", "--S_max", "1"], "--S_max must be >= --S_min (2.0), got 1.0"),
    (["--seeds", "5-2"], "--seeds must look like"),
    (["--score-blocks", "1"], "--score-blocks must be >= 2"),
    (["--epoch", "-1"], "--epoch must be >= 0, got -1"),
    (["--score", "--seeds", "0-38"], "--score needs at least 40 seeds (4 blocks of 10), got 39"),
    (["sample.steps=1"], "sample.steps must be >= 2, got 1"),
])
def test_sample_flags_meet_the_config_ranges(tmp_path, flags, message):
    import sample
    with pytest.raises(UserError) as e:
        sample.main(["--config", DIGITS, "--outdir", str(tmp_path), *flags])
    assert str(e.value).startswith(message), str(e.value)
    assert os.listdir(tmp_path) == []  # nothing started


@pytest.mark.parametrize("flags,needle", [
    (["--seeds", "5-2"], "--seeds must look like 0-49999 or 0,5,10-19"),
    (["--steps", "0"], "--steps must be >= 2, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
])
def test_sample_rejects_bad_flags_before_sampling(tmp_path, flags, needle):
    proc = run_script("sample.py", "--config", DIGITS, "--outdir", str(tmp_path), *flags, check=False)
    assert_one_line_exit_2(proc, needle)
    assert "sampling" not in proc.stdout and os.listdir(tmp_path) == []


def test_sample_checks_the_inception_weights_load_before_sampling(tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(os.urandom(4096))
    outdir = tmp_path / "run"
    outdir.mkdir()
    proc = run_script("sample.py", "--config", DIGITS, "--outdir", str(outdir), "--seeds", "0-9", "--fid", "auto",
                      "--inception-weights", str(weights), check=False)
    # Without the check it would fail later, on the missing checkpoint (or, with one, after sampling).
    assert_one_line_exit_2(proc, f"{weights}: cannot read the Inception weights")
    assert "sampling" not in proc.stdout and os.listdir(outdir) == []
