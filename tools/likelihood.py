"""Negative log-likelihood of the held-out split in bits per dimension, from the probability-flow ODE.

    python -m tools.likelihood --outdir runs/digits-E [--epoch N] [--ema sigma_rel=0.1] [--num-images 1000]
    python -m tools.likelihood --outdir runs/digits-E --exact --num-images 20      # exact divergence (small images)
    torchrun --nproc_per_node=8 -m tools.likelihood --outdir runs/cifar10-E         # images spread over the GPUs

Model density. EDM's ODE (Karras et al. 2022, eq. 1 with s = 1, sigma(t) = t), dx/dsigma = (x - D(x; sigma)) / sigma,
carries an image x = x(sigma_min) to x(sigma_max); by the instantaneous change of variables (Song et al. 2021, eq. 39;
Chen et al. 2018) the density of the model at sigma_min is
    log p(x) = log pi(x(sigma_max)) + int_{sigma_min}^{sigma_max} div_x [(x - D(x; sigma)) / sigma] dsigma.
It is integrated in t = ln sigma (dx/dt = x - D, integrand div_x (x - D)): the same integral, smooth over the
4.6 decades of sigma.
Prior pi = N(0, (sigma_max^2 + sigma_data^2) I): the marginal at sigma_max is the data convolved with
N(0, sigma_max^2 I), whose per-pixel variance is Var(data) + sigma_max^2, with sigma_data EDM's data standard
deviation (N(0, sigma_max^2 I), Song et al.'s choice, differs from it by 2e-5 nats per dimension at 80).
Divergence. Hutchinson's estimator (Grathwohl et al. 2019, eq. 7) div F = E_v[v^T (dF/dx) v] with Rademacher
probes v, the mean over --probes of them per image, fixed for the whole integration (so the integrand is one
smooth function the adaptive solver can follow); it is unbiased, and its noise is part of the standard error
over images. --exact sums e_i^T (dF/dx) e_i over every dimension by autograd (dim backward rows per evaluation).
Discrete data. 8-bit images sit on to_float's levels k / 127.5 - 1, spaced 2/255; each owns a bin of that width.
Uniform dequantisation (Song et al. 2021, App. D.2; Theis et al. 2016): the likelihood is evaluated at
x + u, u ~ U(-1/255, 1/255)^D (seeded per image), and by Jensen's inequality
    -log2 P(image) / D <= -log2 p(x + u) / D + log2(127.5),
the bin-width term being -log2(2/255) = 6.994 bits (log2(128) = 7 belongs to bins of 2/256, i.e. levels k/128 - 1,
which this repository does not use). It is the usual bound, on the scale where a uniform model scores 8.
Solver. Dormand-Prince 5(4) (Dormand & Prince 1980) on the state (x, l), each image with its own step size and
error control (the max of the RMS scaled error of x and the scaled error of l), from sigma_min to sigma_max.
Accuracy. At the default rtol = atol = 1e-5 the solver's error is about 2e-4 bits/dim per image, under 5e-4
(Gaussians with exact denoisers, tests/test_likelihood.py), about tenfold less per decade of tolerance; on the
trained digits network of a 2-epoch run, 1e-5 is within 3e-5 bits/dim of 1e-6 for every image (1e-4: 6e-4,
1e-3: 8e-3) at 147 evaluations per image (228 at 1e-6). The prior is not the exact marginal: that moves each image
by about |E x| / (sigma_max D ln 2) bits/dim (|E x| the norm of the data's mean image), of either sign, which
averages out over images; what remains on average is KL(marginal || pi), O(1 / sigma_max^2) per dimension.
Cost: an evaluation is one forward and backward pass on K rows per image (K = --probes, or D with --exact).
Determinism. Image i's probes and dequantisation noise come from its own seeds and its steps from its own error
estimates, so its result does not depend on its batch or on the number of ranks, up to the float32 rounding of the
network's batched kernels, which the ODE amplifies (a perturbation at sigma_min grows up to sigma_max / sigma_min
times): measured under 1e-5 bits/dim at the default tolerances (a batch of 8 against one of 50), ~1e-3 at rtol 1e-2.
Under torchrun rank r takes images r, r + world, ... and the results are gathered in image order.
A conditional network (label_dim > 0) is given each image's true class: the result is log p(x | c).
Results: a line on stdout; OUTDIR/checkpoints/epoch_<N>.likelihood.json, one entry per result_key (weights, divergence,
image count, tolerances, sigma range), so that settings coexist, each the metrics row plus per_image_bits_per_dim;
and the row (kind 'likelihood', with its key) appended to OUTDIR/metrics.jsonl.
"""

import sys

if __name__ == "__main__" and not __package__:
    print("error: run this as `python -m tools.likelihood ...` from the repository root", file=sys.stderr)
    sys.exit(2)

import argparse
import json
import math
import os
import time

import torch

from tools import dist
from tools.checkpoint import append_text, write_json
from tools.cli import UserError, run_main
from tools.data import load_dataset, to_float
from tools.edm import Denoiser
from tools.log import to_run_log
from tools.precision import matmul_precision
from tools.probe_features import gather_strided
from tools.runs import load_net, parse_ema, resolve
from tools.sampler import one_hot
from tools.schedule import seed_for

SEED = 0x11CE                   # seeds of the probes and the dequantisation noise; independent of train.seed
PROBE_STREAM, DEQUANT_STREAM = 0, 1
BIN_WIDTH = 2 / 255             # spacing of tools.data.to_float's 256 levels
RTOL, ATOL = 1e-5, 1e-5
BATCH = 64                      # images integrated together
EXACT_CHUNK = 64                # basis vectors per pass of the exact divergence (batch x this many rows)
FIRST_STEP = 0.1                # first step in ln sigma; the controller adapts it from there
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0
MIN_STEP = 1e-9                 # a step below this in ln sigma means the solver stalled (non-finite network output)

# Dormand-Prince 5(4): nodes C, stages A (row 7 = the 5th-order weights, FSAL), B4 the embedded 4th-order weights.
DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DP_E = tuple(b5 - b4 for b5, b4 in zip((*DP_A[6], 0.0), DP_B4))  # local error estimate: 5th- minus 4th-order step


# ----------------------------------------------------------------------------------------------------
# The ODE and its divergence.

def velocity(denoiser, x, t, labels):
    """dx/dt = x - D(x; e^t): EDM's probability-flow ODE (Karras et al. 2022, eq. 1) in t = ln sigma."""
    return x - denoiser(x, t.exp().to(torch.float32), labels)


def probe_terms(denoiser, x, t, labels, probes):
    """(velocity F [N, ...], v^T (dF/dx) v [N, K]) for probes [N, K, *x.shape[1:]]: one forward and one
    backward pass on N*K rows (image n repeated K times), the vector-Jacobian product of each row with its probe."""
    k = probes.shape[1]
    v = probes.flatten(0, 1)
    with torch.enable_grad():
        rows = x.detach().repeat_interleave(k, 0).requires_grad_(True)
        f = velocity(denoiser, rows, t.repeat_interleave(k, 0), None if labels is None else labels.repeat_interleave(k, 0))
        (vjp,) = torch.autograd.grad(f, rows, v)
    return f.detach()[::k], (vjp * v).flatten(1).to(torch.float64).sum(1).view(-1, k)


def exact_divergence(denoiser, x, t, labels):
    """(velocity, div_x F [N]) exactly: sum over every dimension i of e_i^T (dF/dx) e_i, EXACT_CHUNK basis
    vectors per pass."""
    dim, div = x[0].numel(), 0
    for start in range(0, dim, EXACT_CHUNK):
        idx = torch.arange(start, min(start + EXACT_CHUNK, dim), device=x.device)
        basis = torch.zeros(len(idx), dim, device=x.device, dtype=x.dtype)
        basis[torch.arange(len(idx)), idx] = 1
        basis = basis.view(1, len(idx), *x.shape[1:]).expand(len(x), -1, *x.shape[1:])
        f, terms = probe_terms(denoiser, x, t, labels, basis)
        div = div + terms.sum(1)
    return f, div


def drift(denoiser, x, t, labels, probes):
    """(dx/dt, dl/dt) of the augmented ODE: the velocity and its divergence, by Hutchinson's estimator (the mean
    over each image's probes; Grathwohl et al. 2019, eq. 7) or exactly when probes is None."""
    if probes is None:
        return exact_divergence(denoiser, x, t, labels)
    f, terms = probe_terms(denoiser, x, t, labels, probes)
    return f, terms.mean(1)


# ----------------------------------------------------------------------------------------------------
# Dormand-Prince 5(4) with a step size per image.

def _combine(k, weights, h):
    """h * sum_j w_j k_j for stage derivatives k (a list of [N, ...]) and steps h [N]."""
    total = sum(w * kj.to(torch.float64) for w, kj in zip(weights, k) if w)
    return h.view(-1, *[1] * (total.ndim - 1)) * total


def _error_ratio(err_x, err_l, x0, x1, l0, l1, rtol, atol):
    """Per image: the larger of the RMS of err_x / (atol + rtol max(|x0|, |x1|)) and the same ratio of l
    (Hairer et al. 1993, II.4, per state component); a step is accepted where it is <= 1."""
    scale_x = atol + rtol * torch.maximum(x0.abs(), x1.abs()).to(torch.float64)
    rms_x = (err_x / scale_x).square().flatten(1).mean(1).sqrt()
    return torch.maximum(rms_x, err_l.abs() / (atol + rtol * torch.maximum(l0.abs(), l1.abs())))


def dopri5(fn, x, t0, t1, rtol=RTOL, atol=ATOL):
    """Integrate dx/dt, dl/dt = fn(index, x, t) from t0 to t1 (l(t0) = 0), each image n with its own step size;
    fn gets the indices of the images it is called for. Returns (x(t1), l(t1) [N] float64, evaluations [N])."""
    n, dev = len(x), x.device
    t = torch.full((n,), float(t0), dtype=torch.float64, device=dev)
    h = torch.full((n,), min(FIRST_STEP, t1 - t0), dtype=torch.float64, device=dev)
    l = torch.zeros(n, dtype=torch.float64, device=dev)
    evals = torch.ones(n, dtype=torch.int64, device=dev)
    kx, kl = fn(torch.arange(n, device=dev), x, t)
    x, kx = x.clone(), kx.clone()
    while (t < t1).any():
        i = (t < t1).nonzero().squeeze(1)
        hi, ti = h[i], t[i]
        ks_x, ks_l = [kx[i]], [kl[i]]
        for stage in range(1, 7):
            xs = (x[i] + _combine(ks_x, DP_A[stage], hi)).to(x.dtype)
            fx, fl = fn(i, xs, ti + DP_C[stage] * hi)
            ks_x.append(fx)
            ks_l.append(fl)
        l1 = l[i] + _combine(ks_l, DP_A[6], hi)
        ratio = _error_ratio(_combine(ks_x, DP_E, hi), _combine(ks_l, DP_E, hi), x[i], xs, l[i], l1, rtol, atol)
        ok = ratio <= 1
        done = ok & (ti + hi >= t1 - MIN_STEP)
        t_new = torch.where(done, torch.full_like(ti, t1), torch.where(ok, ti + hi, ti))
        x[i[ok]], l[i[ok]], kx[i[ok]], kl[i[ok]], t[i] = xs[ok], l1[ok], ks_x[6][ok], ks_l[6][ok], t_new
        factor = (SAFETY * ratio.clamp_min(1e-10) ** -0.2).clamp(MIN_FACTOR, MAX_FACTOR)
        factor = torch.where(ok, factor, factor.clamp_max(1.0)).nan_to_num(MIN_FACTOR)
        h[i] = torch.minimum(hi * factor, (t1 - t_new).clamp_min(0))
        evals[i] += 6
        stalled = (t[i] < t1) & (h[i] < MIN_STEP)
        if stalled.any():
            raise UserError(f"the ODE solver stalled at sigma = {math.exp(t[i[stalled][0]].item()):.4g} "
                            f"(non-finite network output, or rtol/atol below float32 precision)")
    return x, l, evals


# ----------------------------------------------------------------------------------------------------
# Per-image log-likelihood and bits per dimension.

def prior_log_density(x, sigma_max, sigma_data):
    """log N(x; 0, (sigma_max^2 + sigma_data^2) I) per image, float64 (the prior at sigma_max; see the module text)."""
    var = sigma_max ** 2 + sigma_data ** 2
    y = x.to(torch.float64).flatten(1)
    return -0.5 * (y.square().sum(1) / var + y.shape[1] * math.log(2 * math.pi * var))


def log_likelihood(denoiser, x, sigma_min, sigma_max, labels=None, probes=None, rtol=RTOL, atol=ATOL):
    """(log p(x) [N] float64 in nats, evaluations [N]) of continuous images x [N, C, H, W] under the model's
    density at sigma_min: log pi(x(sigma_max)) + the divergence integral (Song et al. 2021, eq. 39). probes:
    Rademacher [N, K, C, H, W] (Hutchinson, fixed for the integration), None for the exact divergence."""
    def fn(idx, xs, ts):
        return drift(denoiser, xs, ts, None if labels is None else labels[idx], None if probes is None else probes[idx])

    x1, delta, evals = dopri5(fn, x.to(torch.float32), math.log(sigma_min), math.log(sigma_max), rtol, atol)
    return prior_log_density(x1, sigma_max, denoiser.sigma_data) + delta, evals


def bits_per_dim(log_p, dim):
    """-log2 p / dim + log2(1 / BIN_WIDTH): nats of a dequantised density -> the bound on bits per dimension of
    the 8-bit image (module text, Discrete data)."""
    return -log_p / (dim * math.log(2)) - math.log2(BIN_WIDTH)


def rademacher(seeds, k, shape):
    """Probes [len(seeds), k, *shape] of +-1, image n's from its own CPU generator (any device, batch or rank)."""
    g = torch.Generator()
    return torch.stack([torch.randint(0, 2, (k, *shape), generator=g.manual_seed(seed_for(SEED, PROBE_STREAM, s))) * 2.0 - 1
                        for s in seeds])


def dequantize(images, seeds):
    """to_float(images) + u, u ~ U(-BIN_WIDTH/2, BIN_WIDTH/2) per pixel, image n's from its own seed."""
    g = torch.Generator()
    u = torch.stack([torch.rand(images.shape[1:], generator=g.manual_seed(seed_for(SEED, DEQUANT_STREAM, int(s))))
                     for s in seeds])
    return to_float(images.cpu()) + (u - 0.5) * BIN_WIDTH


def image_bits(denoiser, images, labels, indices, sigma_min, sigma_max, exact=False, probes=1, rtol=RTOL, atol=ATOL):
    """(bits/dim [N] float64, evaluations [N]) of uint8 images [N, C, H, W] whose split indices are `indices`."""
    dev = next(denoiser.parameters()).device
    x = dequantize(images, indices).to(dev)
    v = None if exact else rademacher(indices.tolist(), probes, images.shape[1:]).to(dev)
    log_p, evals = log_likelihood(denoiser, x, sigma_min, sigma_max, labels, v, rtol, atol)
    return bits_per_dim(log_p, images[0].numel()), evals


# ----------------------------------------------------------------------------------------------------
# The job.

def check_settings(epoch, num_images, probes, rtol, atol, batch):
    """UserError (one line) for a setting that cannot be run."""
    if epoch is not None and epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {epoch}")
    if num_images is not None and num_images < 2:
        raise UserError(f"--num-images must be >= 2 (a standard error needs two images), got {num_images}")
    if probes < 1:
        raise UserError(f"--probes must be >= 1, got {probes}")
    for name, value in (("--rtol", rtol), ("--atol", atol)):
        if not (0 < value < 1):
            raise UserError(f"{name} must be in (0, 1), got {value:g}")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")


def divergence_name(exact, probes):
    return "exact" if exact else f"hutchinson-{probes}"


def result_key(ema, exact, probes, num_images, rtol, atol, sigma_min, sigma_max):
    """The entry of epoch_<N>.likelihood.json a result is stored under, e.g.
    'classic/hutchinson-1/n=1000/dopri5-rtol=1e-05-atol=1e-05/sigma=0.002-80'."""
    return (f"{ema}/{divergence_name(exact, probes)}/n={num_images}/dopri5-rtol={rtol:g}-atol={atol:g}/"
            f"sigma={sigma_min:g}-{sigma_max:g}")


def result_path(outdir, epoch):
    return os.path.join(outdir, "checkpoints", f"epoch_{epoch}.likelihood.json")


def mean_and_se(values):
    """(mean, standard error of the mean) of a list of floats, exact sums."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _log(text):
    if dist.rank() == 0:
        print(text, file=sys.stderr, flush=True)


def likelihood(cfg, outdir, device, epoch=None, ema=None, num_images=None, exact=False, probes=1, rtol=RTOL, atol=ATOL,
               batch=BATCH):
    """Bits/dim of the first num_images (default all) images of the test split under the checkpoint's network
    (epoch None = newest; ema None = sample.ema), mean +- standard error over images. Collective under torchrun.
    Rank 0 writes OUTDIR/checkpoints/epoch_<N>.likelihood.json[result_key] and a metrics.jsonl row; returns the row."""
    check_settings(epoch, num_images, probes, rtol, atol, batch)
    ema = ema or cfg["sample"]["ema"]
    parse_ema(ema)
    images, classes = load_dataset(cfg, "test")
    num_images = len(images) if num_images is None else num_images
    if num_images > len(images):
        raise UserError(f"--num-images {num_images} exceeds the {len(images)} images of the test split")
    net, info = load_net(cfg, outdir, epoch, ema, device)
    s, start = cfg["sample"], time.time()
    settings = dict(sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], exact=exact, probes=probes, rtol=rtol, atol=atol)
    with matmul_precision("fp32"):  # TF32 rounding (1e-3) would swamp the divergence, a difference of outputs
        per_image, evals = split_bits(Denoiser(net, cfg["diffusion"]["sigma_data"]), images[:num_images],
                                      classes[:num_images], cfg["network"]["label_dim"], batch, device, **settings)
    mean, se = mean_and_se(per_image)
    row = dict(kind="likelihood", bits_per_dim=mean, bits_per_dim_se=se, num_images=num_images, split="test",
               epoch=info["epoch"], kimg=info["t_img"] / 1000, t_img=info["t_img"], ema=ema,
               divergence=divergence_name(exact, probes), probes=None if exact else probes, solver="dopri5", rtol=rtol,
               atol=atol, sigma_min=s["sigma_min"], sigma_max=s["sigma_max"],
               prior_variance=s["sigma_max"] ** 2 + cfg["diffusion"]["sigma_data"] ** 2, dequantization="uniform",
               conditional=bool(cfg["network"]["label_dim"]), evaluations_mean=evals.mean().item(),
               seconds=time.time() - start, world_size=dist.world_size(),
               key=result_key(ema, exact, probes, num_images, rtol, atol, s["sigma_min"], s["sigma_max"]))
    if dist.rank() == 0:
        save(outdir, row, per_image)
    return row


def split_bits(denoiser, images, classes, label_dim, batch, device, **settings):
    """(bits/dim list, evaluations [N] float64) of every image in index order, on every rank: rank r integrates
    images r, r + world, ... in batches, conditioned on their true classes when label_dim > 0."""
    mine = torch.arange(dist.rank(), len(images), dist.world_size())
    bits, evals = [torch.empty(0, dtype=torch.float64, device=device)], [torch.empty(0, dtype=torch.int64, device=device)]
    start = time.time()
    for first in range(0, len(mine), batch):
        idx = mine[first:first + batch]
        labels = one_hot(classes[idx], label_dim, device) if label_dim else None
        b, e = image_bits(denoiser, images[idx], labels, idx, **settings)
        bits.append(b)
        evals.append(e)
        _log(f"likelihood: {min(first + batch, len(mine))}/{len(mine)} images of rank 0, {time.time() - start:.1f} s")
    return (gather_strided(torch.cat(bits), len(images)).tolist(),
            gather_strided(torch.cat(evals), len(images)).to(torch.float64))


def save(outdir, row, per_image):
    """Entry row['key'] of the epoch's JSON file (other entries kept; with the per-image values) and the
    metrics.jsonl row."""
    path = result_path(outdir, row["epoch"])
    try:
        with open(path) as f:
            entries = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        entries = {}
    entries[row["key"]] = dict(row, per_image_bits_per_dim=per_image)
    write_json(path, entries)
    append_text(os.path.join(outdir, "metrics.jsonl"), json.dumps(row) + "\n")


def format_line(r):
    div = "exact divergence" if r["probes"] is None else f"Hutchinson, {r['probes']} probe(s)"
    return (f"bits/dim {r['bits_per_dim']:.4f} +- {r['bits_per_dim_se']:.4f} ({r['num_images']} test images, "
            f"epoch {r['epoch']}, {r['ema']}, {div}, dopri5 rtol {r['rtol']:g} atol {r['atol']:g}, "
            f"{r['evaluations_mean']:.0f} evaluations per image, {r['seconds']:.1f} s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.likelihood", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a config file instead of OUTDIR/config.yaml")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the newest)")
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: sample.ema)")
    p.add_argument("--num-images", type=int, help="the first N test images (default: all)")
    p.add_argument("--exact", action="store_true", help="exact divergence over every dimension (small images)")
    p.add_argument("--probes", type=int, help="Hutchinson probes per image (default 1)")
    p.add_argument("--rtol", type=float, default=RTOL, help=f"solver relative tolerance (default {RTOL:g})")
    p.add_argument("--atol", type=float, default=ATOL, help=f"solver absolute tolerance (default {ATOL:g})")
    p.add_argument("--batch", type=int, default=BATCH, help=f"images integrated together per rank (default {BATCH})")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. sample.sigma_max=80")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.exact and args.probes is not None:
        raise UserError("--probes is for Hutchinson's estimator; --exact uses every dimension instead")
    probes = 1 if args.probes is None else args.probes
    check_settings(args.epoch, args.num_images, probes, args.rtol, args.atol, args.batch)
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        result = likelihood(cfg, outdir, device, args.epoch, args.ema, args.num_images, args.exact, probes,
                            args.rtol, args.atol, args.batch)
        dist.print0(format_line(result))


if __name__ == "__main__":
    run_main(main)
