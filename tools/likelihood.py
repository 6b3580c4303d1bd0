"""Bits per dimension of the held-out split from the probability-flow ODE (Karras et al. 2022, eq. 1); docs/INSTRUMENTS.md.

    python -m tools.likelihood --outdir runs/digits-E [--epoch N] [--ema sigma_rel=0.1] [--num-images 1000] [--exact]
    torchrun --nproc_per_node=8 -m tools.likelihood --outdir runs/cifar10-E         # images spread over the GPUs
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
from tools.checkpoint import append_text, read_json, write_json
from tools.cli import UserError, run_main
from tools.data import load_dataset, to_float
from tools.edm import Denoiser
from tools.precision import matmul_precision
from tools.probe_features import gather_strided
from tools.rng import LIKELIHOOD, image_normals
from tools.runs import load_net, open_run, run_flags, run_session
from tools.sampler import one_hot

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


def probe_terms(denoiser, x, t, labels, probes):
    """(F [N, ...], v^T (dF/dx) v [N, K]) for probes v [N, K, *x.shape[1:]]; F = dx/dt = x - D(x; e^t) in t = ln sigma."""
    k = probes.shape[1]
    v = probes.flatten(0, 1)
    with torch.enable_grad():
        rows = x.detach().repeat_interleave(k, 0).requires_grad_(True)
        labels = None if labels is None else labels.repeat_interleave(k, 0)
        f = rows - denoiser(rows, t.repeat_interleave(k, 0).exp().to(torch.float32), class_labels=labels)
        (vjp,) = torch.autograd.grad(f, rows, v)
    return f.detach()[::k], (vjp * v).flatten(1).to(torch.float64).sum(1).view(-1, k)


def exact_divergence(denoiser, x, t, labels):
    """(velocity, div_x F [N]) exactly: the sum over every dimension i of e_i^T (dF/dx) e_i."""
    dim, div = x[0].numel(), 0
    for start in range(0, dim, EXACT_CHUNK):
        idx = torch.arange(start, min(start + EXACT_CHUNK, dim), device=x.device)
        basis = torch.nn.functional.one_hot(idx, dim).to(x.dtype).view(1, len(idx), *x.shape[1:]).expand(len(x), -1, *x.shape[1:])
        f, terms = probe_terms(denoiser, x, t, labels, basis)
        div = div + terms.sum(1)
    return f, div


def _combine(k, weights, h):  # h * sum_j w_j k_j of stage derivatives k [N, ...] and steps h [N]
    total = sum(w * kj.to(torch.float64) for w, kj in zip(weights, k) if w)
    return h.view(-1, *[1] * (total.ndim - 1)) * total


def dopri5(fn, x, t0, t1, rtol=RTOL, atol=ATOL):
    """(x(t1), l(t1) [N] float64, evaluations [N]) of dx/dt, dl/dt = fn(image indices, x, t), l(t0) = 0, a step size per image."""
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
        # Error per image: the larger RMS of err / (atol + rtol max(|y0|, |y1|)) of x and l (Hairer et al. 1993, II.4).
        scale_x = atol + rtol * torch.maximum(x[i].abs(), xs.abs()).to(torch.float64)
        rms_x = (_combine(ks_x, DP_E, hi) / scale_x).square().flatten(1).mean(1).sqrt()
        err_l = _combine(ks_l, DP_E, hi).abs() / (atol + rtol * torch.maximum(l[i].abs(), l1.abs()))
        ratio = torch.maximum(rms_x, err_l)
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


def log_likelihood(denoiser, x, sigma_min, sigma_max, labels=None, probes=None, rtol=RTOL, atol=ATOL):
    """(log p(x) [N] nats, evaluations [N]) at sigma_min (Song et al. 2021, eq. 39); probes [N, K, C, H, W]: Hutchinson, None: exact."""
    def fn(idx, xs, ts):
        y = None if labels is None else labels[idx]
        if probes is None:
            return exact_divergence(denoiser, xs, ts, y)
        f, terms = probe_terms(denoiser, xs, ts, y, probes[idx])
        return f, terms.mean(1)

    x1, delta, evals = dopri5(fn, x.to(torch.float32), math.log(sigma_min), math.log(sigma_max), rtol, atol)
    var = sigma_max ** 2 + denoiser.sigma_data ** 2  # the prior N(0, var I) at sigma_max (docs/INSTRUMENTS.md)
    y = x1.to(torch.float64).flatten(1)
    return -0.5 * (y.square().sum(1) / var + y.shape[1] * math.log(2 * math.pi * var)) + delta, evals


def bits_per_dim(log_p, dim):
    """-log2 p / dim + log2(1 / BIN_WIDTH): the bound on bits/dim of the 8-bit image (docs/INSTRUMENTS.md)."""
    return -log_p / (dim * math.log(2)) - math.log2(BIN_WIDTH)


def rademacher(ids, k, shape):
    """Probes [len(ids), k, *shape] of +-1, image i's from its own stream (any device, batch or rank)."""
    return image_normals((LIKELIHOOD, PROBE_STREAM), ids, (k, *shape)).sign()


def dequantize(images, ids):
    """to_float(images) + U(-BIN_WIDTH/2, BIN_WIDTH/2) per pixel, the normal CDF of image i's own normals."""
    u = torch.special.ndtr(image_normals((LIKELIHOOD, DEQUANT_STREAM), [int(i) for i in ids], images.shape[1:]))
    return to_float(images.cpu()) + (u - 0.5) * BIN_WIDTH


def image_bits(denoiser, images, labels, indices, sigma_min, sigma_max, exact=False, probes=1, rtol=RTOL, atol=ATOL):
    """(bits/dim [N] float64, evaluations [N]) of uint8 images [N, C, H, W] whose split indices are `indices`."""
    dev = next(denoiser.parameters()).device
    x = dequantize(images, indices).to(dev)
    v = None if exact else rademacher(indices.tolist(), probes, images.shape[1:]).to(dev)
    log_p, evals = log_likelihood(denoiser, x, sigma_min, sigma_max, labels, v, rtol, atol)
    return bits_per_dim(log_p, images[0].numel()), evals


def likelihood(cfg, outdir, device, epoch=None, ema=None, num_images=None, exact=False, probes=1, rtol=RTOL, atol=ATOL, batch=BATCH):
    """Bits/dim row (mean +- se) of the first num_images test images; collective; rank 0 appends it to metrics.jsonl and epoch_<N>.likelihood.json."""
    ema = ema or cfg["sample"]["ema"]
    images, classes = load_dataset(cfg, "test")
    num_images = len(images) if num_images is None else num_images
    if num_images > len(images):
        raise UserError(f"--num-images {num_images} exceeds the {len(images)} images of the test split")
    net, info = load_net(cfg, outdir, epoch, ema, device)
    s, label_dim, start = cfg["sample"], cfg["network"]["label_dim"], time.time()
    denoiser = Denoiser(net, cfg["diffusion"]["sigma_data"])
    mine = torch.arange(dist.rank(), num_images, dist.world_size())
    bits, evals = [torch.empty(0, dtype=torch.float64, device=device)], [torch.empty(0, dtype=torch.int64, device=device)]
    for first in range(0, len(mine), batch):
        idx = mine[first:first + batch]
        labels = one_hot(classes[idx], label_dim, device) if label_dim else None
        with matmul_precision("fp32"):  # TF32 rounding (1e-3) would swamp the divergence, a difference of outputs
            b, e = image_bits(denoiser, images[idx], labels, idx, s["sigma_min"], s["sigma_max"], exact, probes, rtol, atol)
        bits.append(b)
        evals.append(e)
        dist.print0(f"likelihood: {min(first + batch, len(mine))}/{len(mine)} images of rank 0, {time.time() - start:.1f} s", file=sys.stderr)
    per_image = gather_strided(torch.cat(bits), num_images).tolist()
    evals = gather_strided(torch.cat(evals), num_images).to(torch.float64)
    mean = math.fsum(per_image) / num_images
    se = math.sqrt(math.fsum((v - mean) ** 2 for v in per_image) / (num_images - 1) / num_images)
    divergence = "exact" if exact else f"hutchinson-{probes}"
    row = dict(kind="likelihood", bits_per_dim=mean, bits_per_dim_se=se, num_images=num_images, split="test", epoch=info["epoch"],
               kimg=info["t_img"] / 1000, t_img=info["t_img"], ema=ema, divergence=divergence, probes=None if exact else probes,
               solver="dopri5", rtol=rtol, atol=atol, sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], dequantization="uniform",
               prior_variance=s["sigma_max"] ** 2 + denoiser.sigma_data ** 2, conditional=bool(label_dim),
               evaluations_mean=evals.mean().item(), seconds=time.time() - start, world_size=dist.world_size(),
               key=f"{ema}/{divergence}/n={num_images}/dopri5-rtol={rtol:g}-atol={atol:g}/sigma={s['sigma_min']:g}-{s['sigma_max']:g}")
    if dist.rank() == 0:  # one entry per setting in the epoch's file, the others kept
        path = os.path.join(outdir, "checkpoints", f"epoch_{row['epoch']}.likelihood.json")
        write_json(path, {**read_json(path), row["key"]: dict(row, per_image_bits_per_dim=per_image)})
        append_text(os.path.join(outdir, "metrics.jsonl"), json.dumps(row) + "\n")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.likelihood", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: sample.ema)")
    p.add_argument("--num-images", type=int, help="the first N test images (default: all)")
    p.add_argument("--exact", action="store_true", help="exact divergence over every dimension (small images)")
    p.add_argument("--probes", type=int, help="Hutchinson probes per image (default 1)")
    p.add_argument("--rtol", type=float, default=RTOL, help=f"solver relative tolerance (default {RTOL:g})")
    p.add_argument("--atol", type=float, default=ATOL, help=f"solver absolute tolerance (default {ATOL:g})")
    p.add_argument("--batch", type=int, default=BATCH, help=f"images integrated together per rank (default {BATCH})")
    args = p.parse_args(argv)
    if args.exact and args.probes is not None:
        raise UserError("--probes is for Hutchinson's estimator; --exact uses every dimension instead")
    probes = 1 if args.probes is None else args.probes
    for name, value, ok, bound in (("--probes", probes, probes >= 1, ">= 1"), ("--batch", args.batch, args.batch >= 1, ">= 1"),
                                   ("--num-images", args.num_images, args.num_images is None or args.num_images >= 2, ">= 2 (for a standard error)"),
                                   ("--rtol", args.rtol, 0 < args.rtol < 1, "in (0, 1)"), ("--atol", args.atol, 0 < args.atol < 1, "in (0, 1)")):
        if not ok:
            raise UserError(f"{name} must be {bound}, got {value:g}")
    cfg, outdir = open_run(args)
    with run_session(outdir) as (rank, world, device):
        r = likelihood(cfg, outdir, device, args.epoch, args.ema, args.num_images, args.exact, probes, args.rtol, args.atol, args.batch)
        div = "exact divergence" if r["probes"] is None else f"Hutchinson, {r['probes']} probe(s)"
        dist.print0(f"bits/dim {r['bits_per_dim']:.4f} +- {r['bits_per_dim_se']:.4f} ({r['num_images']} test images, "
                    f"epoch {r['epoch']}, {r['ema']}, {div}, dopri5 rtol {r['rtol']:g} atol {r['atol']:g}, "
                    f"{r['evaluations_mean']:.0f} evaluations per image, {r['seconds']:.1f} s)")


if __name__ == "__main__":
    run_main(main)
