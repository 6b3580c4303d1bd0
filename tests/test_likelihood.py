"""tools/likelihood.py: the probability-flow ODE likelihood against closed forms (Gaussian data with its exact
denoiser), Hutchinson's estimator against the exact divergence, per-image determinism, and the command line."""

import json
import math
import os
import statistics

import pytest
import torch

from conftest import run_script, train_here
from tools import likelihood as L
from tools.data import to_float, to_uint8

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


@pytest.fixture(autouse=True)
def one_thread():
    """The solver's many small kernels run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianDenoiser(torch.nn.Module):
    """The exact EDM denoiser of N(mu, Q diag(s^2) Q^T): D(x; sigma) = mu + Q diag(s^2 / (s^2 + sigma^2)) Q^T (x - mu)."""

    sigma_data = 0.5

    def __init__(self, mu, s, q, shape):
        super().__init__()
        self.device_marker = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # image_bits reads the device here
        self.mu, self.s2, self.q, self.shape = mu.double(), s.double() ** 2, q.double(), shape

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).broadcast_to(x.shape[:1]).view(-1, 1)
        y = (x.flatten(1).double() - self.mu) @ self.q
        return (self.mu + (y * self.s2 / (self.s2 + sigma ** 2)) @ self.q.T).view_as(x).float()

    def sample(self, n, generator):
        z = torch.randn(n, len(self.mu), generator=generator, dtype=torch.float64)
        return (self.mu + (z * self.s2.sqrt()) @ self.q.T).float().view(n, *self.shape)

    def log_density(self, x, extra_var):
        """log N(x; mu, Sigma + extra_var I), closed form in the eigenbasis."""
        y = (x.flatten(1).double() - self.mu) @ self.q
        var = self.s2 + extra_var
        return -0.5 * ((y ** 2 / var).sum(1) + torch.log(2 * math.pi * var).sum())


def gaussian(isotropic, dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    if isotropic:  # s below sigma_min's reach: the density at sigma_min differs from N(mu, s^2 I) by ~0.03 bits/dim
        return GaussianDenoiser(0.1 * torch.randn(dim, generator=g), torch.full((dim,), 0.005), torch.eye(dim), (1, 4, 4)), g
    mu = 0.2 * torch.randn(dim, generator=g)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return GaussianDenoiser(mu, torch.logspace(-2, math.log10(0.8), dim), q, (1, 4, 4)), g


def analytic_bits(model, x):
    """The exact density of the data at sigma_min, N(mu, Sigma + sigma_min^2 I), in the tool's bits/dim."""
    return L.bits_per_dim(model.log_density(x, SIGMA_MIN ** 2), x[0].numel())


def prior_bound(model):
    """Module text, Accuracy: the prior's per-image error, |E x| / (sigma_max D ln 2) bits/dim per standard deviation."""
    return model.mu.norm().item() / (SIGMA_MAX * len(model.mu) * math.log(2))


def prior_correction(model, x):
    """log pi - log p_{sigma_max} at the exact end point of the ODE,
    mu + sqrt((Sigma + sigma_max^2) / (Sigma + sigma_min^2)) (x - mu)."""
    y = (x.flatten(1).double() - model.mu) @ model.q
    end = model.mu + (y * ((model.s2 + SIGMA_MAX ** 2) / (model.s2 + SIGMA_MIN ** 2)).sqrt()) @ model.q.T
    var = SIGMA_MAX ** 2 + model.sigma_data ** 2
    prior = -0.5 * ((end ** 2).sum(1) / var + len(model.mu) * math.log(2 * math.pi * var))
    return prior - model.log_density(end, SIGMA_MAX ** 2)


@pytest.mark.parametrize("isotropic", [True, False])
def test_exact_divergence_matches_the_gaussian_density(isotropic):
    model, g = gaussian(isotropic)
    x = model.sample(100, g)
    log_p, _ = L.log_likelihood(model, x, SIGMA_MIN, SIGMA_MAX)
    err = L.bits_per_dim(log_p, x[0].numel()) - analytic_bits(model, x)
    assert err.abs().max() < 5e-4 + 5 * prior_bound(model)
    assert abs(err.mean()) < 3e-4 + 4 * err.std() / math.sqrt(len(err))
    if isotropic:  # the check is sharp enough to tell p_{sigma_min} from the noise-free density
        without_sigma_min = L.bits_per_dim(model.log_density(x, 0.0), x[0].numel())
        assert (without_sigma_min - analytic_bits(model, x)).abs().mean() > 10 * err.abs().max()


def test_hutchinson_is_unbiased_on_a_correlated_gaussian():
    model, g = gaussian(isotropic=False)
    x = model.sample(200, g)
    hutchinson, _ = L.log_likelihood(model, x, SIGMA_MIN, SIGMA_MAX, probes=L.rademacher(range(len(x)), 1, x.shape[1:]))
    err = L.bits_per_dim(hutchinson, x[0].numel()) - analytic_bits(model, x)
    assert err.std() > 100 * (5e-4 + prior_bound(model))  # off-diagonal Jacobian: the estimator's own noise dominates
    assert abs(err.mean()) < 3 * err.std() / math.sqrt(len(err))


def test_rademacher_probes_are_exact_for_an_isotropic_jacobian():
    """v^T (a I) v = a D for every +-1 probe: Hutchinson with Rademacher probes has no variance here."""
    model, g = gaussian(isotropic=True)
    x = model.sample(8, g)
    exact, _ = L.log_likelihood(model, x, SIGMA_MIN, SIGMA_MAX)
    hutchinson, _ = L.log_likelihood(model, x, SIGMA_MIN, SIGMA_MAX, probes=L.rademacher(range(8), 1, x.shape[1:]))
    assert torch.allclose(hutchinson, exact, rtol=1e-9, atol=1e-6)


def test_solver_error_falls_with_the_tolerance():
    model, g = gaussian(isotropic=False)
    x = model.sample(20, g)
    ref = model.log_density(x, SIGMA_MIN ** 2) + prior_correction(model, x)
    errors = [(L.log_likelihood(model, x, SIGMA_MIN, SIGMA_MAX, rtol=tol, atol=tol)[0] - ref).abs().mean().item()
              for tol in (1e-3, 1e-5)]
    assert errors[1] < errors[0] / 20


def test_a_uniform_density_over_the_bins_is_8_bits():
    """The 256 levels of to_float own bins of width 2/255 tiling [-1 - 1/255, 1 + 1/255]: the uniform density there,
    (255/512)^D, gives every 8-bit image probability 256^-D, i.e. exactly 8 bits per dimension."""
    dim = 12
    log_p = torch.tensor([dim * math.log(255 / 512)], dtype=torch.float64)
    assert L.bits_per_dim(log_p, dim).item() == pytest.approx(8.0, abs=1e-12)


def test_dequantisation_stays_in_the_bin_and_follows_the_image():
    images = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8)
    seeds = torch.arange(100, 164)
    x = L.dequantize(images, seeds)
    offset = (x - to_float(images)) * 255
    assert offset.abs().max() <= 1 + 1e-5 and offset.abs().max() > 0.99
    assert abs(offset.pow(2).mean().item() - 1 / 3) < 0.03  # U(-1, 1) in units of half a bin
    assert torch.equal(L.dequantize(images[5:6], seeds[5:6]), x[5:6])
    assert torch.equal(L.rademacher([7], 3, (1, 4, 4))[0], L.rademacher([3, 7], 3, (1, 4, 4))[1])


def test_an_image_gets_the_same_result_alone_and_in_a_batch():
    """Its own probes, dequantisation noise and step sizes (the evaluation count shows them), 8-bit images of a
    Gaussian through image_bits. Through a network, float32 rounding of batched kernels adds ~1e-5 bits/dim
    (module text, Determinism)."""
    model, g = gaussian(isotropic=False)
    images = to_uint8(model.sample(5, g))
    indices = torch.tensor([11, 3, 7, 0, 5])
    batch, batch_evals = L.image_bits(model, images, None, indices, SIGMA_MIN, SIGMA_MAX, False, 2, 1e-3, 1e-3)
    alone, alone_evals = L.image_bits(model, images[2:3], None, indices[2:3], SIGMA_MIN, SIGMA_MAX, False, 2, 1e-3, 1e-3)
    assert len(set(batch_evals.tolist())) > 1 and alone_evals[0] == batch_evals[2]
    assert alone[0].item() == pytest.approx(batch[2].item(), rel=1e-9)
    moved, _ = L.image_bits(model, images[2:3], None, indices[:1], SIGMA_MIN, SIGMA_MAX, False, 2, 1e-3, 1e-3)
    assert abs(moved[0].item() - batch[2].item()) > 1e-4  # another image index draws other noise: the check can fail


# ----------------------------------------------------------------------------------------------------
# A very short run of this repository (1 epoch, model_channels=8): Hutchinson vs exact, the command line.

TINY = ["train.epochs=1", "network.model_channels=8", "train.batch_size=256", "train.grid_epochs=0", "train.eval_epochs=0"]
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep: two threads on two shared cores no longer stall


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("likelihood-run"))
    train_here("--config", "config/digits/E.yaml", "--outdir", outdir, *TINY)
    return outdir


@pytest.fixture(scope="module")
def tiny_denoiser(tiny_run):
    from tools.data import load_dataset
    from tools.edm import Denoiser
    from tools.runs import load_net, resolve
    cfg, outdir = resolve(None, tiny_run)
    net, _ = load_net(cfg, outdir, None, "classic", "cpu")
    images, _ = load_dataset(cfg, "test")
    return Denoiser(net, cfg["diffusion"]["sigma_data"]), images


def test_hutchinson_matches_the_exact_divergence_of_a_trained_network(tiny_denoiser):
    denoiser, images = tiny_denoiser
    x = to_float(images[:2])
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(x),), math.log(0.5), dtype=torch.float64)
    _, exact = L.exact_divergence(denoiser, noisy, t, None)
    _, terms = L.probe_terms(denoiser, noisy, t, None, L.rademacher(range(len(x)), 64, x.shape[1:]))
    se = terms.std(1) / math.sqrt(terms.shape[1])
    assert (terms.std(1) > 0.5).all() and (4 * se < 0.02 * exact.abs()).all()  # noisy, yet a sharp check
    assert ((terms.mean(1) - exact).abs() < 4 * se).all()


def test_cli_writes_the_result_file_and_the_metrics_row(tiny_run):
    proc = run_script("-m", "tools.likelihood", "--outdir", tiny_run, "--num-images", "2",
                      "--rtol", "1e-2", "--atol", "1e-2", env=PASSIVE)
    entries = json.load(open(os.path.join(tiny_run, "checkpoints", "epoch_1.likelihood.json")))
    key = "classic/hutchinson-1/n=2/dopri5-rtol=0.01-atol=0.01/sigma=0.002-80"
    entry = entries[key]
    per_image = entry["per_image_bits_per_dim"]
    assert len(per_image) == 2 and entry["bits_per_dim"] == pytest.approx(statistics.fmean(per_image), abs=1e-12)
    assert entry["bits_per_dim_se"] == pytest.approx(statistics.stdev(per_image) / math.sqrt(2), abs=1e-12)
    rows = [json.loads(line) for line in open(os.path.join(tiny_run, "metrics.jsonl"))]
    row = [r for r in rows if r.get("kind") == "likelihood"][-1]
    assert row["key"] == key and row["bits_per_dim"] == entry["bits_per_dim"] and row["epoch"] == 1
    for k in ("bits_per_dim_se", "num_images", "kimg", "ema", "divergence", "rtol", "atol", "seconds"):
        assert row[k] == entry[k]
    assert proc.stdout.startswith(f"bits/dim {entry['bits_per_dim']:.4f}")


def test_cli_bad_flag_ends_in_one_line(tiny_run):
    proc = run_script("-m", "tools.likelihood", "--outdir", tiny_run, "--num-images", "1", env=PASSIVE, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--num-images" in proc.stderr
    script = run_script("tools/likelihood.py", check=False)
    assert script.returncode == 2 and "python -m tools.likelihood" in script.stderr and script.stderr.count("\n") == 1
