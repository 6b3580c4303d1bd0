"""Generate images from a trained run, one PNG per seed, spread over ranks; optionally score them.

    torchrun --nproc_per_node=N sample.py --outdir runs/cifar10-E --epoch 2000 [--fid auto|REF.npz]
    python sample.py --outdir runs/demo/E --seeds 0-999 --score

--score measures the samples' quality against the dataset (FD, KID, precision, recall, class coverage,
memorisation; tools/quality.py) with the dataset classifier (no download; the default for digits) or
Inception (--metric-features inception; the default for CIFAR and Tiny-ImageNet). --fid is Inception
FID/KID against given reference statistics.

Image k depends only on seed k and the weights (one generator per seed), not on the rank count or
batch size. Interrupted runs continue where they stopped: existing PNGs are kept.
"""

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

from tools import dist
from tools.checkpoint import atomic_write
from tools.cli import UserError, run_main
from tools.data import to_uint8
from tools.edm import Denoiser
from tools.log import progress, to_run_log
from tools.quality import default_extractor
from tools.runs import load_net, resolve
from tools.sampler import SAMPLERS, SeedNoise, sample

STOCHASTIC = ("S_churn", "S_min", "S_max", "S_noise")


def parse_seeds(text):
    """'0-49999' or '0,3,10-19' -> sorted unique list of ints."""
    seeds = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--seeds must look like 0-49999 or 0,5,10-19, got {text!r}") from None
    return sorted(seeds)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own (default: OUTDIR/config.yaml)")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the newest)")
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: sample.ema of the config)")
    p.add_argument("--seeds", help="e.g. 0-49999 (default: 0 .. sample.num_images - 1)")
    p.add_argument("--steps", type=int, help="noise levels (heun: 2*steps - 1 network evaluations)")
    p.add_argument("--sampler", choices=SAMPLERS)
    for k in STOCHASTIC:
        p.add_argument(f"--{k}", type=float)
    p.add_argument("--batch", type=int, help="images per rank per forward")
    p.add_argument("--out", help="output folder, PNGs only (default: OUTDIR/samples/epoch_<N>-<ema>-<sampler><steps>); "
                   "the preview grid and the scores go beside it as <out>.grid.png, <out>.quality.json, <out>.fid.json")
    p.add_argument("--fid", metavar="REF.npz", help="Inception FID/KID against these reference statistics; 'auto' = the "
                   "config's training split, computed once (spread over the ranks) into DATA_CACHE/fid-refs/")
    p.add_argument("--score", action="store_true", help="quality metrics of the samples (tools/quality.py), mean +- std over seed blocks")
    p.add_argument("--metric-features", choices=("classifier", "inception"),
                   help="features for --score: the dataset classifier (no download) or Inception (default: per dataset)")
    p.add_argument("--score-blocks", type=int, default=4, help="disjoint seed blocks for the spread of --score (default 4)")
    p.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights (or set FID_INCEPTION_WEIGHTS)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def image_path(out, seed):
    return os.path.join(out, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")


def save_png(array, path):
    """Write atomically so an interrupted run never leaves a truncated PNG that counts as done."""
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_grid(out, seeds, num=64):
    """<out>.grid.png beside the sample folder (inside it, scorers that search folders recursively would count it)."""
    paths = [image_path(out, s) for s in seeds[:num]]
    images = [np.asarray(Image.open(p)) for p in paths if os.path.exists(p)]
    if not images:
        return None
    n = int(np.ceil(np.sqrt(len(images))))
    h, w = images[0].shape[:2]
    pad = 2  # grey separators, so that neighbouring images do not run into each other
    grid = np.full((n * (h + pad) + pad, n * (w + pad) + pad) + images[0].shape[2:], 128, dtype=np.uint8)
    for i, im in enumerate(images):
        top, left = pad + (i // n) * (h + pad), pad + (i % n) * (w + pad)
        grid[top:top + h, left:left + w] = im
    path = f"{out}.grid.png"
    save_png(grid if grid.ndim == 3 else grid[:, :, None], path)
    return path


def main(argv=None):
    args = parse_args(argv)
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    S = dict(cfg["sample"])
    for k in ("ema", "steps", "sampler", "batch", *STOCHASTIC):
        if getattr(args, k) is not None:
            S[k] = getattr(args, k)
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(S["num_images"]))
    extractor = args.metric_features or default_extractor(cfg)
    inception = bool(args.fid) or (args.score and extractor == "inception")
    if inception:
        from tools.fid import find_inception_weights
        find_inception_weights(args.inception_weights)  # a mistyped weights path stops here, before sampling
    if args.fid and args.fid != "auto" and not os.path.isfile(args.fid):
        raise UserError(f"--fid {args.fid}: no such statistics file (make one with: python tools/fid.py ref --config ... --out {args.fid})")

    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        out, run = generate(cfg, outdir, args, S, seeds, rank, world, device)
        # Collective part of scoring: the Inception weights (found or downloaded by rank 0) and the reference
        # statistics of the training split, computed once, spread over the ranks.
        weights = ref = None
        if inception:
            from tools import fid
            weights = dist.on_rank0(fid.inception_weights_or_none, args.inception_weights)
            if weights is not None and (args.fid == "auto" or args.score and extractor == "inception"):
                ref = fid.auto_reference(cfg, weights, device)
        # Rank 0 scores alone; the other ranks are done.
        if rank == 0:
            if args.score and (extractor == "classifier" or weights is not None):
                score_quality(cfg, out, seeds, args.score_blocks, extractor, weights, ref, device, outdir, run)
            if args.fid and weights is not None:
                score_fid(out, ref if args.fid == "auto" else args.fid, weights, device, outdir, run)


def generate(cfg, outdir, args, S, seeds, rank, world, device):
    """Sample the seeds not yet on disk, spread over the ranks; rank 0 then writes the preview grid.
    Returns (sample folder, description of the weights and sampler)."""
    net, info = load_net(cfg, outdir, args.epoch, S["ema"], device)
    if args.compile:
        net.compile()
    tag = f"epoch_{info['epoch']}-{S['ema'].replace('=', '')}-{S['sampler']}{S['steps']}"
    out = os.path.normpath(args.out or os.path.join(outdir, "samples", tag))
    denoiser = Denoiser(net, cfg["diffusion"]["sigma_data"])
    n = cfg["network"]
    shape = (n["img_channels"], n["img_resolution"], n["img_resolution"])
    todo = [s for s in seeds[rank::world] if not os.path.exists(image_path(out, s))]
    if rank == 0:
        remaining = sum(not os.path.exists(image_path(out, s)) for s in seeds)
        print(f"sampling {len(seeds)} images ({S['sampler']}, {S['steps']} steps, {S['ema']} weights, epoch {info['epoch']}) "
              f"into {out}; {remaining} to go", flush=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    kwargs = {k: S[k] for k in ("sampler", "steps", "sigma_min", "sigma_max", "rho", *STOCHASTIC)}
    bar = progress(-(-len(todo) // S["batch"]), desc="sampling", unit="batch", enabled=rank == 0)
    for i in range(0, len(todo), S["batch"]):
        batch = todo[i:i + S["batch"]]
        with torch.no_grad(), amp:
            x = sample(denoiser, SeedNoise(batch, device), shape, **kwargs)
        for seed, img in zip(batch, to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()):
            save_png(img, image_path(out, seed))
        bar.update(1)
    bar.close()
    dist.barrier()
    if rank == 0:
        grid = write_grid(out, seeds)
        print(f"samples: {out}" + (f"\ngrid: {grid}" if grid else ""), flush=True)
    run = dict(epoch=info["epoch"], kimg=info["t_img"] / 1000, ema=S["ema"], sampler=S["sampler"], steps=S["steps"], samples=out)
    return out, run


def append_metrics(outdir, row):
    with open(os.path.join(outdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def score_quality(cfg, out, seeds, blocks, extractor, weights, ref, device, outdir, run):
    from tools.quality import format_line, score_samples
    images = torch.from_numpy(np.stack([np.asarray(Image.open(image_path(out, s))) for s in seeds]))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    result = score_samples(cfg, images, extractor, device, blocks=blocks, pairs_path=f"{out}.nearest_pairs.png",
                           inception_weights=weights, inception_ref=ref)
    result.update(run, kind="quality")
    write_json(f"{out}.quality.json", result)
    append_metrics(outdir, result)
    print(f"quality ({extractor}): {format_line(result)}", flush=True)
    if "classifier_test_accuracy" in result:
        print(f"  dataset classifier test accuracy {100 * result['classifier_test_accuracy']:.2f}%; "
              f"nearest training images: {result['nearest_pairs']}", flush=True)


def score_fid(out, ref, weights, device, outdir, run):
    from tools import fid
    result = fid.score_folder(out, ref, weights_path=weights, device=device)
    result.update(run, reference=ref)
    write_json(f"{out}.fid.json", result)
    append_metrics(outdir, result)
    print(f"fid: {result['fid']:.4f}  kid: {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  ({result['count']} images)", flush=True)


if __name__ == "__main__":
    run_main(main)
