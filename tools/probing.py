"""The linear probe of a trained run (probe.py, tools/ema_sweep.py): features of one block of the frozen network
at one noise level (or a grid of them), a linear classifier chosen on held-out training images, scored once on
the test split (the DDAE protocol, Xiang et al. 2023; docs/PROBE.md).

Features come from tools/probe_features.py (cached per checkpoint, weights, block, sigma and split), the
classifier and the result files from tools/linear_probe.py. The probe section of the config says what to probe.
"""

import os
import re
import time

import torch

from tools import dist
from tools.checkpoint import checkpoint_path, write_json
from tools.cli import UserError
from tools.config import check_ranges
from tools.data import load_dataset
from tools.linear_probe import pixels_baseline, probe_cell, read_json, result_key, save_heatmap, tensorboard_scalar
from tools.probe_features import Checkpoint, check_block, default_block, ensure_features, list_blocks, load_features
from tools.runs import parse_ema


def resolve_probe(cfg, names=None):
    """Check the probe section (after flags replaced some keys: `names` says which, as typed) and fill in its
    block and the canonical spelling of its weights. Returns the blocks of the network [(name, channels, res)]."""
    p = cfg["probe"]
    check_ranges("probe", p, names=names)
    kind, sigma_rel = parse_ema(p["ema"])
    p["ema"] = f"sigma_rel={sigma_rel:g}" if kind == "posthoc" else kind
    blocks = list_blocks(cfg)
    p["block"] = check_block(p["block"], blocks) if p["block"] else default_block(blocks)
    return blocks


def block_table(cfg, blocks):
    """Lines of probe.py --list-blocks."""
    lines = [f"{'block':<20} {'channels':>8}  resolution"]
    for name, channels, res in blocks:
        lines.append(f"{name:<20} {channels:>8}  {res}x{res}{'   <- probe.block' if name == cfg['probe']['block'] else ''}")
    return lines


def probe(cfg, outdir, device, epoch=None, grid=False):
    """Probe the checkpoint of `epoch` (default: the newest) as cfg['probe'] says (resolve_probe first); with `grid`,
    every block x probe.grid_sigmas, reporting the cell best on the held-out split. Collective under torchrun
    (feature extraction is spread over the ranks); rank 0 fits, prints and writes OUTDIR/checkpoints/
    epoch_<N>.probe.json and a TensorBoard scalar, and returns the result (None elsewhere)."""
    if epoch is not None and epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {epoch}")
    p = cfg["probe"]
    ckpt = Checkpoint(outdir, epoch)
    blocks = [b[0] for b in list_blocks(cfg)] if grid else [p["block"]]
    sigmas = sorted(set(p["grid_sigmas"])) if grid else [p["sigma"]]
    streams = [("train", False), ("test", False)] + ([("train", True)] if p["xflip"] else [])
    images, labels = {}, {}
    for split in ("train", "test"):
        images[split], labels[split] = load_dataset(cfg, split)
    num_images = {split: len(y) for split, y in labels.items()}
    num_classes = int(max(y.max() for y in labels.values())) + 1

    start = time.time()
    t_img = ensure_features(cfg, ckpt, blocks, sigmas, streams, device, images)
    if dist.rank() != 0:
        return None
    classifier_device = device if p["classifier"] == "torch" else torch.device("cpu")
    table = []
    for block in blocks:
        for sigma in sigmas:
            feats = load_features(cfg, ckpt, block, sigma, streams, images)
            table.append(dict(block=block, sigma=sigma, **probe_cell(feats, labels, p, num_classes, classifier_device)))
    # The reported cell: the only one, or the grid's best on the held-out split (never on test).
    best = max(table, key=lambda c: c["holdout_accuracy_pct"] if c["holdout_accuracy_pct"] is not None else -1)
    elapsed = time.time() - start

    result = dict(block=best["block"], sigma=best["sigma"], ema=p["ema"], epoch=ckpt.epoch, t_img=t_img, kimg=t_img / 1000,
                  classifier=p["classifier"], xflip=p["xflip"], holdout=p["holdout"], C_grid=p["C_grid"],
                  **{k: v for k, v in best.items() if k not in ("block", "sigma")},
                  num_train=num_images["train"], num_test=num_images["test"], selected_by="grid" if grid else "config")
    where = f"{best['block']} at sigma={best['sigma']:.4g}, {p['ema']} weights, epoch {ckpt.epoch}"
    print(f"test accuracy: {best['test_accuracy_pct']:.2f}% ({where}; C={best['C']:g}"
          + (f", best of {len(table)} cells on the held-out split)" if grid else ")"), flush=True)

    pixels = pixels_baseline(outdir, p, images, labels, num_classes, classifier_device)
    result["pixels_test_accuracy_pct"] = pixels["test_accuracy_pct"]
    print(f"raw pixels: {pixels['test_accuracy_pct']:.2f}% (the same classifier on the {pixels['feature_dim']} pixel values)")

    json_path = checkpoint_path(outdir, ckpt.epoch)[:-len(".pt")] + ".probe.json"
    results = read_json(json_path)
    results[result_key(best["block"], best["sigma"], p["ema"], p)] = result
    write_json(json_path, results)
    tensorboard_scalar(outdir, f"probe/{best['block']}@sigma={best['sigma']:.4g}/{p['ema']}", best["test_accuracy_pct"], t_img)
    print(f"written: {json_path}; TensorBoard: {os.path.join(outdir, 'tensorboard')} ({elapsed:.1f} s for features + classifier)")

    if grid:
        base = checkpoint_path(outdir, ckpt.epoch)[:-len(".pt")] + f".probe_grid_{re.sub(r'[^A-Za-z0-9_.=-]', '_', p['ema'])}"
        write_json(base + ".json", dict(ema=p["ema"], epoch=ckpt.epoch, t_img=t_img, classifier=p["classifier"],
                                        xflip=p["xflip"], blocks=blocks, sigmas=sigmas, best=result, cells=table))
        save_heatmap(base + ".png", table, blocks, sigmas, best)
        print(f"grid: {base}.json, {base}.png")
    return result
