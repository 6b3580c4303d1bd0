"""sample.py and the samplers: rank independence, resume, accuracy on a Gaussian with a known denoiser."""

import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from sample import image_path, parse_seeds
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


@pytest.mark.parametrize("channels", [1, 3])
def test_png_holds_exactly_the_sample(tmp_path, channels):
    """The PNG written for an image decodes to the same uint8 pixels (gray and RGB, from a permuted view)."""
    from PIL import Image
    from sample import save_png
    from tools.data import to_uint8
    x = torch.rand(2, channels, 16, 12) * 2 - 1
    arrays = to_uint8(x).permute(0, 2, 3, 1).numpy()  # the non-contiguous view sample.py writes
    save_png(arrays[1], str(tmp_path / "a.png"))
    back = np.asarray(Image.open(tmp_path / "a.png"))
    assert np.array_equal(back.reshape(16, 12, channels), arrays[1])


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]


def pngs(folder, seeds):
    return [image_path(str(folder), s) for s in seeds]


def test_world_size_two_gives_identical_files(trained_digits_run, tmp_path):
    run_script("sample.py", "--config", "config/digits/E.yaml", "--outdir", trained_digits_run, "--seeds", "0-7",
               "--steps", "6", "--batch", "8", "--out", str(tmp_path / "one"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519", "sample.py",
           "--config", "config/digits/E.yaml", "--outdir", trained_digits_run, "--seeds", "0-7", "--steps", "6",
           "--batch", "3", "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(pngs(tmp_path / "one", range(8)), pngs(tmp_path / "two", range(8))):
        assert filecmp.cmp(a, b, shallow=False), (a, b)
    assert os.path.exists(f"{tmp_path / 'two'}.grid.png") and os.listdir(tmp_path / "two") == ["000000"]  # the grid beside, not inside


def test_interrupted_run_continues_to_the_same_files(trained_digits_run, tmp_path):
    args = ["sample.py", "--config", "config/digits/E.yaml", "--outdir", trained_digits_run, "--seeds", "0-7", "--steps", "6", "--batch", "4"]
    run_script(*args, "--out", str(tmp_path / "full"))
    run_script(*args, "--out", str(tmp_path / "part"))
    for p in pngs(tmp_path / "part", [1, 5, 6]):  # an interruption: some images missing, one write half done
        os.remove(p)
    open(image_path(str(tmp_path / "part"), 6) + ".tmp4242", "wb").write(b"\x89PNG partial")
    kept = os.path.getmtime(image_path(str(tmp_path / "part"), 0))
    proc = run_script(*args, "--out", str(tmp_path / "part"))
    assert "3 to go" in proc.stdout
    assert os.path.getmtime(image_path(str(tmp_path / "part"), 0)) == kept  # existing images are not redone
    for a, b in zip(pngs(tmp_path / "full", range(8)), pngs(tmp_path / "part", range(8))):
        assert filecmp.cmp(a, b, shallow=False)


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_script("sample.py", "--config", "config/digits/E.yaml", "--outdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no usable checkpoint") and "Traceback" not in proc.stderr
