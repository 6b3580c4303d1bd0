"""Linear probe of a trained network's features (the DDAE protocol, Xiang et al. 2023).

    python probe.py --outdir runs/cifar10-E --epoch 1000
    python probe.py --outdir runs/cifar10-E --t 4 --ema sigma_rel=0.075
    python probe.py --outdir runs/cifar10-E --grid              # every block x probe.grid_sigmas
    python probe.py --config config/cifar10/E.yaml --list-blocks
    torchrun --nproc_per_node=8 probe.py --outdir runs/cifar10-E  # extraction spread over the GPUs

Features: the global-average-pooled activations of one block of the frozen network, run as the full
EDM denoiser on image + sigma * noise; image i of a split draws its noise from its own seed, so the
features do not depend on the batch size or the number of ranks. They are extracted once per
(checkpoint, weights, block, sigma, split, flip) and cached under OUTDIR/probe/features/.
Classifier: multinomial logistic regression on standardised features; the L2 strength is chosen on a
held-out part of the training split, then the classifier is refitted on the whole training split and
scored once on the test split. Results: stdout (`test accuracy: ...` first), the JSON file
OUTDIR/checkpoints/epoch_<N>.probe.json and the TensorBoard scalar probe/<block>@sigma=<s>/<ema>.
See docs/PROBE.md.
"""

import argparse
import os
import re
import time

import torch

from tools import dist
from tools.checkpoint import checkpoint_path
from tools.cli import UserError, run_main
from tools.config import check_ranges
from tools.data import load_dataset
from tools.linear_probe import CLASSIFIERS, pixels_baseline, probe_cell, read_json, result_key, save_heatmap, tensorboard_scalar, write_json
from tools.log import to_run_log
from tools.probe_features import Checkpoint, check_block, default_block, ensure_features, list_blocks, load_features, sigma_of_t
from tools.runs import parse_ema, resolve


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own (default: OUTDIR/config.yaml)")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the newest)")
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: probe.ema of the config)")
    p.add_argument("--block", help="block whose pooled activations are the features, e.g. dec.8x8_block1 (default: probe.block)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--sigma", type=float, help="noise level of the features (default: probe.sigma)")
    level.add_argument("--t", type=int, help="noise level as an index into the reversed sampling schedule "
                                             "(index 0 = sigma 0; with 18 steps --t 4 is sigma 0.0599)")
    p.add_argument("--classifier", choices=CLASSIFIERS, help="sklearn (CPU) | torch (same objective, L-BFGS on the probe "
                                                             "device, for large sets) (default: probe.classifier)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, help="add x-flipped training images' features "
                                                                          "(default: probe.xflip)")
    p.add_argument("--batch", type=int, help="images per rank per forward (default: probe.batch)")
    p.add_argument("--grid", action="store_true", help="sweep every block x probe.grid_sigmas; JSON table and heat map")
    p.add_argument("--list-blocks", action="store_true", help="print the block names of the config's network and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. probe.grid_sigmas=[0.03,0.06,0.15]")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.epoch is not None and args.epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {args.epoch}")
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    p = cfg["probe"]
    flags = [k for k in ("block", "ema", "classifier", "xflip", "batch", "sigma") if getattr(args, k) is not None]
    for key in flags:
        p[key] = getattr(args, key)
    if args.t is not None:
        p["sigma"] = sigma_of_t(cfg, args.t)
    if p["classifier"] not in CLASSIFIERS:
        raise UserError(f"probe.classifier must be one of {', '.join(CLASSIFIERS)}, got {p['classifier']!r}")
    check_ranges("probe", p, names={k: f"--{k}" for k in flags})  # the flags replace probe.* keys: the same ranges
    kind, sigma_rel = parse_ema(p["ema"])
    p["ema"] = f"sigma_rel={sigma_rel:g}" if kind == "posthoc" else kind

    blocks = list_blocks(cfg)
    if args.list_blocks:
        chosen = p["block"] or default_block(blocks)
        print(f"{'block':<20} {'channels':>8}  resolution")
        for name, channels, res in blocks:
            print(f"{name:<20} {channels:>8}  {res}x{res}{'   <- probe.block' if name == chosen else ''}")
        return
    p["block"] = check_block(p["block"], blocks) if p["block"] else default_block(blocks)

    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        run(cfg, outdir, p, args, [b[0] for b in blocks], rank, device)


def run(cfg, outdir, p, args, all_blocks, rank, device):
    ckpt = Checkpoint(outdir, args.epoch)
    blocks = all_blocks if args.grid else [p["block"]]
    sigmas = sorted(set(p["grid_sigmas"])) if args.grid else [p["sigma"]]
    streams = [("train", False), ("test", False)] + ([("train", True)] if p["xflip"] else [])
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = load_dataset(cfg, split)
    num_images = {split: len(y) for split, y in labels.items()}
    num_classes = int(max(y.max() for y in labels.values())) + 1

    start = time.time()
    t_img = ensure_features(cfg, ckpt, p["ema"], blocks, sigmas, streams, p["batch"], device, images)
    if rank != 0:
        return
    classifier_device = device if p["classifier"] == "torch" else torch.device("cpu")
    table = []
    for block in blocks:
        for sigma in sigmas:
            feats = load_features(ckpt, p["ema"], block, sigma, streams, images)
            table.append(dict(block=block, sigma=sigma, **probe_cell(feats, labels, p, num_classes, classifier_device)))
    # The reported cell: the only one, or the grid's best on the held-out split (never on test).
    best = max(table, key=lambda c: c["holdout_accuracy_pct"] if c["holdout_accuracy_pct"] is not None else -1)
    elapsed = time.time() - start

    result = dict(block=best["block"], sigma=best["sigma"], ema=p["ema"], epoch=ckpt.epoch, t_img=t_img, kimg=t_img / 1000,
                  classifier=p["classifier"], xflip=p["xflip"], holdout=p["holdout"], C_grid=p["C_grid"],
                  **{k: v for k, v in best.items() if k not in ("block", "sigma")},
                  num_train=num_images["train"], num_test=num_images["test"], selected_by="grid" if args.grid else "config")
    where = f"{best['block']} at sigma={best['sigma']:.4g}, {p['ema']} weights, epoch {ckpt.epoch}"
    print(f"test accuracy: {best['test_accuracy_pct']:.2f}% ({where}; C={best['C']:g}"
          + (f", best of {len(table)} cells on the held-out split)" if args.grid else ")"), flush=True)

    pixels = pixels_baseline(outdir, p, images, labels, num_classes, classifier_device)
    result["pixels_test_accuracy_pct"] = pixels["test_accuracy_pct"]
    print(f"raw pixels: {pixels['test_accuracy_pct']:.2f}% (the same classifier on the {pixels['feature_dim']} pixel values)")

    json_path = checkpoint_path(outdir, ckpt.epoch)[:-len(".pt")] + ".probe.json"
    results = read_json(json_path)
    results[result_key(best["block"], best["sigma"], p["ema"], p)] = result
    write_json(json_path, results)
    tensorboard_scalar(outdir, f"probe/{best['block']}@sigma={best['sigma']:.4g}/{p['ema']}", best["test_accuracy_pct"], t_img)
    print(f"written: {json_path}; TensorBoard: {os.path.join(outdir, 'tensorboard')} ({elapsed:.1f} s for features + classifier)")

    if args.grid:
        base = checkpoint_path(outdir, ckpt.epoch)[:-len(".pt")] + f".probe_grid_{re.sub(r'[^A-Za-z0-9_.=-]', '_', p['ema'])}"
        write_json(base + ".json", dict(ema=p["ema"], epoch=ckpt.epoch, t_img=t_img, classifier=p["classifier"],
                                        xflip=p["xflip"], blocks=blocks, sigmas=sigmas, best=result, cells=table))
        save_heatmap(base + ".png", table, blocks, sigmas, best)
        print(f"grid: {base}.json, {base}.png")


if __name__ == "__main__":
    run_main(main)
