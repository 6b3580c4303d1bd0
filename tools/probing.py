"""The linear probe of a trained run (probe.py, tools/ema_sweep.py), the DDAE protocol of docs/PROBE.md."""

import os
import re
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from tools import dist
from tools.checkpoint import checkpoint_path, read_json, write_json
from tools.cli import UserError
from tools.config import check_ranges
from tools.data import load_dataset
from tools.linear_probe import pixels_baseline, probe_cell, save_heatmap
from tools.probe_features import Checkpoint, cache_file, default_block, ensure_features, list_blocks, read_cached
from tools.runs import parse_ema


def resolve_probe(cfg, names=None):
    """list_blocks(cfg), after checking the probe section (`names`: flags that replaced keys) and filling in block and ema."""
    p = cfg["probe"]
    check_ranges("probe", p, names=names)
    kind, sigma_rel = parse_ema(p["ema"])
    p["ema"] = f"sigma_rel={sigma_rel:g}" if kind == "posthoc" else kind
    blocks = list_blocks(cfg)
    names = [b[0] for b in blocks]
    if not p["block"]:
        p["block"] = default_block(blocks)
    elif p["block"] not in names:
        hint = f" (did you mean dec.{p['block']}?)" if f"dec.{p['block']}" in names else ""
        raise UserError(f"unknown block {p['block']!r}{hint}; the blocks of this network: {', '.join(names)} (see --list-blocks)")
    return blocks


def probe(cfg, outdir, device, epoch=None, grid=False):
    """Probe as cfg['probe'] says, or every block x probe.grid_sigmas (collective); rank 0 returns the reported cell, others None."""
    p = cfg["probe"]
    ckpt = Checkpoint(outdir, epoch)
    blocks = [b[0] for b in list_blocks(cfg)] if grid else [p["block"]]
    sigmas = sorted(set(p["grid_sigmas"])) if grid else [p["sigma"]]
    streams = [("train", False), ("test", False)] + ([("train", True)] if p["xflip"] else [])
    data = {split: load_dataset(cfg, split) for split in ("train", "test")}
    images, labels = {s: d[0] for s, d in data.items()}, {s: d[1] for s, d in data.items()}
    num_classes = int(max(y.max() for y in labels.values())) + 1
    start = time.time()
    t_img = ensure_features(cfg, ckpt, blocks, sigmas, streams, device, images)
    if dist.rank() != 0:
        return None
    classifier_device = device if p["classifier"] == "torch" else torch.device("cpu")
    table = []
    for block in blocks:
        for sigma in sigmas:
            feats = {(split, flip): read_cached(*cache_file(ckpt, p, block, sigma, split, flip, len(images[split])))[0]
                     for split, flip in streams}
            table.append(dict(block=block, sigma=sigma, **probe_cell(feats, labels, p, num_classes, classifier_device)))
    # The reported cell: the only one, or the grid's best on the held-out split (never on test).
    best = max(table, key=lambda c: c["holdout_accuracy_pct"] if c["holdout_accuracy_pct"] is not None else -1)
    elapsed = time.time() - start
    result = dict(block=best["block"], sigma=best["sigma"], ema=p["ema"], epoch=ckpt.epoch, t_img=t_img, kimg=t_img / 1000,
                  classifier=p["classifier"], xflip=p["xflip"], holdout=p["holdout"], C_grid=p["C_grid"],
                  **{k: v for k, v in best.items() if k not in ("block", "sigma")},
                  num_train=len(labels["train"]), num_test=len(labels["test"]), selected_by="grid" if grid else "config")
    print(f"test accuracy: {best['test_accuracy_pct']:.2f}% ({best['block']} at sigma={best['sigma']:.4g}, {p['ema']} weights, epoch {ckpt.epoch}; "
          f"C={best['C']:g}" + (f", best of {len(table)} cells on the held-out split)" if grid else ")"), flush=True)
    pixels = pixels_baseline(outdir, p, images, labels, num_classes, classifier_device)
    result["pixels_test_accuracy_pct"] = pixels["test_accuracy_pct"]
    print(f"raw pixels: {pixels['test_accuracy_pct']:.2f}% (the same classifier on the {pixels['feature_dim']} pixel values)")
    stem = checkpoint_path(outdir, ckpt.epoch)[:-len(".pt")]
    json_path = stem + ".probe.json"
    results = read_json(json_path)
    results[f"{best['block']}@sigma={best['sigma']:.6g}/{p['ema']}/{p['classifier']}" + ("/xflip" if p["xflip"] else "")] = result
    write_json(json_path, results)
    with SummaryWriter(os.path.join(outdir, "tensorboard")) as writer:
        writer.add_scalar(f"probe/{best['block']}@sigma={best['sigma']:.4g}/{p['ema']}", best["test_accuracy_pct"], t_img)
    print(f"written: {json_path}; TensorBoard: {os.path.join(outdir, 'tensorboard')} ({elapsed:.1f} s for features + classifier)")

    if grid:
        base = stem + f".probe_grid_{re.sub(r'[^A-Za-z0-9_.=-]', '_', p['ema'])}"
        write_json(base + ".json", dict(ema=p["ema"], epoch=ckpt.epoch, t_img=t_img, classifier=p["classifier"],
                                        xflip=p["xflip"], blocks=blocks, sigmas=sigmas, best=result, cells=table))
        save_heatmap(base + ".png", table, blocks, sigmas, best)
        print(f"grid: {base}.json, {base}.png")
    return result
