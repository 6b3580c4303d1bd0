"""Generate images from a trained run, one PNG per seed, spread over ranks; optionally score them.

    torchrun --nproc_per_node=N sample.py --outdir runs/cifar10-E --epoch 2000 [--fid auto|REF.npz]
    python sample.py --outdir runs/demo/E --seeds 0-999 --score
    python sample.py --outdir runs/digits-E-cond --guidance 2 [--class 3] [--guide runs/digits-E-cond:5]

--score measures the samples' quality against the dataset (FD, KID, precision, recall, class coverage,
memorisation; tools/quality.py) with the dataset classifier (no download; the default for digits) or
Inception (--metric-features inception; the default for CIFAR and Tiny-ImageNet). --fid is Inception
FID/KID against given reference statistics.

A class-conditional run (network.label_dim > 0) samples a balanced class mix, image k of class k mod
label_dim, or --class K; <out>.labels.json records the class of each seed, and --score adds the dataset
classifier's accuracy against it. --guidance W guides: classifier-free (the same network, label dropped),
or autoguidance with --guide (Karras et al. 2024, arXiv 2406.02507), which unconditional runs can use too.

Image k depends only on seed k and the weights (one generator per seed), not on the rank count or
batch size. Interrupted runs continue where they stopped: existing PNGs are kept.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image

from tools import dist
from tools.checkpoint import append_text, atomic_write
from tools.cli import UserError, run_main
from tools.config import check_ranges
from tools.data import to_uint8
from tools.edm import Denoiser
from tools.log import progress, to_run_log
from tools.quality import default_extractor
from tools.runs import load_net, resolve
from tools.sampler import SAMPLERS, GuidedDenoiser, SeedNoise, one_hot, sample, seed_classes

STOCHASTIC = ("S_churn", "S_min", "S_max", "S_noise")


def parse_seeds(text):
    """'0-49999' or '0,3,10-19' -> sorted unique list of non-negative ints; a range holds both ends, low <= high."""
    seeds = set()
    for part in text.split(","):
        lo, dash, hi = (s.strip() for s in part.partition("-"))
        if not (lo.isascii() and lo.isdigit() and (not dash or hi.isascii() and hi.isdigit() and int(lo) <= int(hi))):
            raise UserError(f"--seeds must look like 0-49999 or 0,5,10-19 (non-negative integers, ranges low-high "
                            f"with low <= high), got {text!r}")
        seeds.update(range(int(lo), int(hi or lo) + 1))
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
    p.add_argument("--class", dest="class_index", type=int, metavar="K", help="a conditional run: every image of class K "
                   "(default: a balanced mix, image k of class k mod network.label_dim); classes go to <out>.labels.json")
    p.add_argument("--guidance", type=float, default=1.0, metavar="W", help="guidance weight, D = D_guide + W (D - D_guide); "
                   "1 = none. The guide is --guide, or else the same conditional network with the label dropped (classifier-free)")
    p.add_argument("--guide", metavar="RUN[:EPOCH]", help="autoguidance: a weaker model of the same task (a smaller config, "
                   "or an earlier checkpoint; default epoch: its newest), read with its own config.yaml")
    p.add_argument("--guide-ema", help="the guide's weights: classic | online | sigma_rel=X (default: sample.ema of its config)")
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
    if args.epoch is not None and args.epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {args.epoch}")
    if args.score_blocks < 2:
        raise UserError(f"--score-blocks must be >= 2 (the spread of a metric needs two blocks), got {args.score_blocks}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    S = dict(cfg["sample"])
    flags = [k for k in ("ema", "steps", "sampler", "batch", *STOCHASTIC) if getattr(args, k) is not None]
    for k in flags:
        S[k] = getattr(args, k)
    check_ranges("sample", S, names={k: f"--{k}" for k in flags})  # the flags replace sample.* keys: the same ranges
    seeds = seeds if seeds is not None else list(range(S["num_images"]))
    if args.score and len(seeds) < 10 * args.score_blocks:  # tools/quality.py score_samples: blocks of >= 10 images
        raise UserError(f"--score needs at least {10 * args.score_blocks} seeds ({args.score_blocks} blocks of 10), got {len(seeds)}")
    extractor = args.metric_features or default_extractor(cfg)
    inception = bool(args.fid) or (args.score and extractor == "inception")
    if inception:
        from tools.fid import _weights_name, find_inception_weights
        local = find_inception_weights(args.inception_weights)  # a mistyped weights path stops here, before sampling,
        if local is not None:
            _weights_name(local)  # and so does a file that does not load (none here: rank 0 downloads it later)
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
    check_conditioning(cfg, args)
    net, info = load_net(cfg, outdir, args.epoch, S["ema"], device)
    if args.compile:
        net.compile()
    tag = f"epoch_{info['epoch']}-{S['ema'].replace('=', '')}-{S['sampler']}{S['steps']}"
    denoiser = Denoiser(net, cfg["diffusion"]["sigma_data"])
    n = cfg["network"]
    K, W = n["label_dim"], args.guidance
    guide_run = {}
    if args.class_index is not None:
        tag += f"-class{args.class_index}"
    if W != 1 and args.guide:
        guide, guide_labels, guide_run = load_guide(cfg, args.guide, args.guide_ema, device)
        if args.compile:
            guide.net.compile()
        denoiser = GuidedDenoiser(denoiser, guide, W, guide_labels)
        g = guide_run
        tag += f"-auto{W:g}-{os.path.basename(os.path.normpath(g['guide']))}-epoch_{g['guide_epoch']}-{g['guide_ema'].replace('=', '')}"
    elif W != 1:
        denoiser = GuidedDenoiser(denoiser, denoiser, W, guide_labels="dropped")  # classifier-free
        tag += f"-cfg{W:g}"
        if not cfg["train"]["label_dropout"] and rank == 0:
            print("warning: this run was trained with train.label_dropout=0, so its unconditional denoiser (label dropped) "
                  "never trained: classifier-free guidance will not mean much", flush=True)
    elif args.guide and rank == 0:
        print(f"note: --guidance 1 is no guidance; --guide {args.guide} is not used", flush=True)
    out = os.path.normpath(args.out or os.path.join(outdir, "samples", tag))
    if K:
        check_labels(out, seeds, seed_classes(seeds, K, args.class_index), write=rank == 0)
    shape = (n["img_channels"], n["img_resolution"], n["img_resolution"])
    todo = [s for s in seeds[rank::world] if not os.path.exists(image_path(out, s))]
    if rank == 0:
        remaining = sum(not os.path.exists(image_path(out, s)) for s in seeds)
        what = "" if not K else (f", class {args.class_index}" if args.class_index is not None else f", classes seed mod {K}")
        what += "" if W == 1 else f", {'autoguidance' if args.guide else 'classifier-free guidance'} {W:g}"
        print(f"sampling {len(seeds)} images ({S['sampler']}, {S['steps']} steps, {S['ema']} weights, epoch {info['epoch']}{what}) "
              f"into {out}; {remaining} to go", flush=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    kwargs = {k: S[k] for k in ("sampler", "steps", "sigma_min", "sigma_max", "rho", *STOCHASTIC)}
    bar = progress(-(-len(todo) // S["batch"]), desc="sampling", unit="batch", enabled=rank == 0)
    for i in range(0, len(todo), S["batch"]):
        batch = todo[i:i + S["batch"]]
        with torch.no_grad(), amp:
            x = sample(denoiser, SeedNoise(batch, device), shape, one_hot(seed_classes(batch, K, args.class_index), K, device), **kwargs)
        for seed, img in zip(batch, to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()):
            save_png(img, image_path(out, seed))
        bar.update(1)
    bar.close()
    dist.barrier()
    if rank == 0:
        grid = write_grid(out, seeds)
        print(f"samples: {out}" + (f"\ngrid: {grid}" if grid else ""), flush=True)
    run = dict(epoch=info["epoch"], kimg=info["t_img"] / 1000, ema=S["ema"], sampler=S["sampler"], steps=S["steps"], samples=out,
               guidance=W, **guide_run)
    if K:
        run["classes"] = "mix" if args.class_index is None else args.class_index
    return out, run


def check_conditioning(cfg, args):
    """One-line errors for --class and --guidance flags that do not fit the run."""
    K = cfg["network"]["label_dim"]
    if args.class_index is not None and not K:
        raise UserError("--class needs a class-conditional run (network.label_dim > 0); this run is unconditional")
    if args.class_index is not None and not 0 <= args.class_index < K:
        raise UserError(f"--class must be a class index in 0..{K - 1} (network.label_dim={K}), got {args.class_index}")
    if not math.isfinite(args.guidance):
        raise UserError(f"--guidance must be a finite number (1 = no guidance), got {args.guidance}")
    if args.guidance != 1 and not K and not args.guide:
        raise UserError("--guidance without --guide is classifier-free guidance, which needs a class-conditional run "
                        "(network.label_dim > 0); for this unconditional run pass --guide RUN[:EPOCH] (autoguidance)")
    if args.guide_ema and not args.guide:
        raise UserError("--guide-ema needs --guide RUN[:EPOCH]")


def load_guide(cfg, spec, ema, device):
    """The autoguidance guide RUN[:EPOCH] as a Denoiser, loaded like the main network with the guide run's own
    config.yaml. Returns (denoiser, the labels it takes: 'same' or 'none' for an unconditional guide, run fields)."""
    run_dir, _, epoch = spec.rpartition(":")
    if not run_dir or not epoch.isdigit():  # no :EPOCH suffix
        run_dir, epoch = spec, None
    try:
        guide_cfg, guide_dir = resolve(None, run_dir)
        ema = ema or guide_cfg["sample"]["ema"]
        net, info = load_net(guide_cfg, guide_dir, None if epoch is None else int(epoch), ema, device)
    except UserError as e:
        raise UserError(f"--guide {spec}: {e}") from None
    n, g = cfg["network"], guide_cfg["network"]
    if guide_cfg["data"]["dataset"] != cfg["data"]["dataset"] or (g["img_channels"], g["img_resolution"]) != (n["img_channels"], n["img_resolution"]):
        raise UserError(f"--guide {spec}: the guide must model the same data ({cfg['data']['dataset']}, {n['img_channels']}x"
                        f"{n['img_resolution']}x{n['img_resolution']}), not {guide_cfg['data']['dataset']} at {g['img_channels']}x"
                        f"{g['img_resolution']}x{g['img_resolution']}")
    if g["label_dim"] not in (0, n["label_dim"]):
        raise UserError(f"--guide {spec}: its network.label_dim={g['label_dim']} does not match this run's {n['label_dim']}; "
                        f"the guide must be unconditional or know the same classes")
    run = dict(guide=guide_dir, guide_epoch=info["epoch"], guide_ema=ema)
    return Denoiser(net, guide_cfg["diffusion"]["sigma_data"]), "same" if g["label_dim"] else "none", run


def labels_path(out):
    return f"{out}.labels.json"


def check_labels(out, seeds, classes, write=True):
    """<out>.labels.json, {seed: class} beside the sample folder, extended by these seeds (written when `write`).
    A seed already on disk with another class stops the run: its PNG would not show the class recorded."""
    path = labels_path(out)
    known = {}
    if os.path.exists(path):
        with open(path) as f:
            known = {int(k): v for k, v in json.load(f).items()}
    for seed, c in zip(seeds, classes):
        if known.get(seed, c) != c and os.path.exists(image_path(out, seed)):
            raise UserError(f"{out} holds seed {seed} sampled as class {known[seed]}, not {c}; pass another --out")
    known.update(zip(seeds, classes))
    if write:
        write_json(path, {str(k): known[k] for k in sorted(known)})


def read_labels(out, seeds):
    """The requested class of each seed from <out>.labels.json, in the order of `seeds`."""
    try:
        with open(labels_path(out)) as f:
            known = json.load(f)
        return [known[str(s)] for s in seeds]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{labels_path(out)} is missing or lacks some seeds: sample the seeds again into this --out") from None


def append_metrics(outdir, row):
    """One JSON line in OUTDIR/metrics.jsonl; a full disk ends in one line and leaves no half line."""
    append_text(os.path.join(outdir, "metrics.jsonl"), json.dumps(row) + "\n")


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def score_quality(cfg, out, seeds, blocks, extractor, weights, ref, device, outdir, run):
    from tools.quality import format_line, score_samples
    images = torch.from_numpy(np.stack([np.asarray(Image.open(image_path(out, s))) for s in seeds]))
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    classes = read_labels(out, seeds) if cfg["network"]["label_dim"] else None  # a conditional run: the requested classes
    result = score_samples(cfg, images, extractor, device, blocks=blocks, pairs_path=f"{out}.nearest_pairs.png",
                           inception_weights=weights, inception_ref=ref, classes=classes)
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
