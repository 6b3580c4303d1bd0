"""Every train.eval_epochs: validation beside training loss (their gap: memorisation), a quality curve (docs/EVALUATION.md).

    python -m tools.evaluation --outdir RUN [--epoch N] [--samples 1000]   # one checkpoint, after the fact
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.evaluation ...")

import argparse
import json
import math
import time

import numpy as np
import torch

from tools import dist, fid, metrics
from tools.checkpoint import load_epoch
from tools.cli import UserError, run_main
from tools.config import build_edm
from tools.data import load_dataset, to_float, to_uint8, trained_images
from tools.edm import Denoiser
from tools.generate import sample_seeds
from tools.inception import WEIGHTS_FILE, find_inception_weights
from tools.precision import autocast
from tools.quality import KID_SUBSETS, Scorer, build_extractor, extract, fd_key, reference
from tools.runs import open_run, run_flags
from tools.sampler import one_hot, seed_classes
from tools.rng import EVALUATION, generator, image_normals

HELDOUT, TRAIN = 0, 1       # split codes in the noise seeds
QUALITY_BLOCKS = 4          # seed blocks of the quality curve (mean +- std, as sample.py --score)


def fixed_subset(num_images, n, split):
    if n >= num_images:
        return torch.arange(num_images)
    return torch.randperm(num_images, generator=generator(EVALUATION, split, num_images, n))[:n].sort().values


def my_chunks(count, chunk, rank, world):
    """The slices of range(count) in chunks of `chunk` that this rank computes: chunk c on rank c % world."""
    return [slice(start, min(start + chunk, count)) for start in range(rank * chunk, count, world * chunk)]


class Evaluator:
    """The validation loss and the quality curve of a run; called with the EMA network at an epoch's end."""

    def __init__(self, cfg, train_images, train_labels, rank, world, device, log=dist.print0):
        train, self.cfg = cfg["train"], cfg
        self.rank, self.world, self.device = rank, world, device
        self.every, self.sigmas, self.num_samples = train["eval_epochs"], list(train["eval_sigmas"]), train["eval_samples"]
        self.chunk = cfg["sample"]["batch"]
        self.label_dim = cfg["network"]["label_dim"] if cfg["data"]["use_labels"] else 0
        self.splits = {}  # split code -> (uint8 images [n, C, H, W], labels [n], indices in their split)
        if not self.every:
            return
        try:
            heldout, heldout_labels = load_dataset(cfg, "test")
        except UserError as e:
            log(f"validation loss off: no held-out split ({e})")
        else:
            n = min(len(heldout), len(train_images), train["eval_images"] or len(heldout))
            for split, (images, labels) in ((HELDOUT, (heldout, heldout_labels)), (TRAIN, (train_images, train_labels))):
                idx = fixed_subset(len(images), n, split)
                self.splits[split] = (images[idx.to(images.device)].to(device), labels[idx.to(labels.device)].to(device), idx)
        self.scorer = self.inception = None
        if self.num_samples:
            dist.on_rank0(self._build_scorer)
            if train["eval_inception"]:
                weights = find_inception_weights()  # local only: a training run never downloads
                if weights is None:
                    log(f"quality curve: no Inception FID (no local weights: FID_INCEPTION_WEIGHTS or {WEIGHTS_FILE} in the torch hub cache)")
                else:
                    ref = fid.auto_reference(cfg, weights, device)  # collective: computed once, spread over the ranks
                    dist.on_rank0(self._load_inception, weights, ref)

    def _build_scorer(self):
        try:
            self.scorer = Scorer(self.cfg, "classifier", self.device, log=lambda m: print(m, flush=True))
        except UserError as e:
            raise UserError(f"the quality curve (train.eval_samples > 0) cannot be scored: {e}; or set train.eval_samples=0") from None

    def _load_inception(self, weights, ref):
        model = build_extractor(self.cfg, "inception", self.device, weights)
        self.inception = (model, *reference(self.cfg, "inception", model, self.device, weights, ref))

    def due(self, epoch, last):
        return bool(self.every) and (epoch % self.every == 0 or last)

    @torch.no_grad()
    def __call__(self, net, loss_fn, t_img, epoch):
        """Rows for metrics.jsonl ('eval', 'curve') of `net` with the loss head `loss_fn`, on rank 0 (elsewhere: [])."""
        amp = lambda: autocast(self.device, self.cfg["train"]["precision"])  # the training loss, as in training
        was_training = net.training
        denoiser = Denoiser(net.eval(), self.cfg["diffusion"]["sigma_data"])
        rows, start = [], time.time()
        at = dict(epoch=epoch, kimg=t_img / 1000)
        if self.splits:
            val, train = (self.losses(denoiser, loss_fn, split, amp) for split in (HELDOUT, TRAIN))
            v, t = float(np.mean(val)), float(np.mean(train))
            rows.append(dict(kind="eval", **at, val_loss=v, train_loss=t, gap=v - t, sigmas=self.sigmas, val_loss_by_sigma=val,
                             train_loss_by_sigma=train, images=len(self.splits[HELDOUT][2]), ema="classic"))
        if self.num_samples:
            samples, classes = self.samples(denoiser)
            if self.rank == 0:
                row = dict(kind="curve", **at, ema="classic", **self.scorer.score(samples, QUALITY_BLOCKS, classes=classes))
                if self.inception is not None:  # FID of all samples (one sqrtm of 2048 x 2048), KID per seed block
                    model, mu_ref, sigma_ref, ref = self.inception
                    feats = extract("inception", model, samples, self.device)[0]
                    n = len(feats) // QUALITY_BLOCKS
                    kid = [metrics.kid(feats[b * n:(b + 1) * n], ref, num_subsets=KID_SUBSETS,
                                       subset_size=min(n, metrics.KID_SUBSET_SIZE))[0] for b in range(QUALITY_BLOCKS)]
                    row.update(FID_inception=metrics.frechet_distance(*metrics.feature_stats(feats), mu_ref, sigma_ref),
                               KID_inception=float(np.mean(kid)), KID_inception_std=float(np.std(kid, ddof=1)))
                rows.append(row)
        net.train(was_training)
        dist.barrier()  # rank 0 scored alone: the others wait here, not in an NCCL collective (tools/dist.py)
        for r in rows:
            r["eval_s"] = time.time() - start
        return rows if self.rank == 0 else []

    def losses(self, denoiser, loss_fn, split, amp):
        images, labels, idx = self.splits[split]
        n, shape = len(images), images.shape[1:]
        per_image = torch.zeros(len(self.sigmas), n, device=self.device)
        for s in my_chunks(n, self.chunk, self.rank, self.world):
            y = to_float(images[s])
            noise = image_normals((EVALUATION, split), idx[s].tolist(), shape, self.device)
            class_labels = one_hot(labels[s].tolist(), self.label_dim, self.device) if self.label_dim else None
            for j, sigma in enumerate(self.sigmas):
                with amp():
                    loss = loss_fn.at(denoiser, y, torch.full((len(y),), sigma, device=self.device), noise, class_labels=class_labels)
                per_image[j, s] = loss.float()
        dist.all_reduce_sum(per_image)  # each entry is computed by one rank, zero elsewhere: the sum is exact
        return [math.fsum(row) / n for row in per_image.double().tolist()]

    def samples(self, denoiser):
        """(uint8 samples [eval_samples, C, H, W] of seeds 0, 1, ..., their classes or None), on every rank."""
        n, net_cfg = self.num_samples, self.cfg["network"]
        shape = (net_cfg["img_channels"], net_cfg["img_resolution"], net_cfg["img_resolution"])
        out, K = torch.zeros(n, *shape, dtype=torch.int32, device=self.device), net_cfg["label_dim"]
        for s in my_chunks(n, self.chunk, self.rank, self.world):
            seeds = list(range(s.start, s.stop))
            out[s] = to_uint8(sample_seeds(denoiser, self.cfg, seeds, self.device, seed_classes(seeds, K))).to(torch.int32)
        dist.all_reduce_sum(out)
        return out.to(torch.uint8).cpu(), seed_classes(range(n), K)


def describe(row):
    if row["kind"] == "eval":
        return (f"validation loss {row['val_loss']:.4f}, training subset {row['train_loss']:.4f}, gap {row['gap']:+.4f} "
                f"({row['images']} images each)")
    fd = fd_key(row)
    return f"KID {row['KID']:.5f} +- {row['KID_std']:.5f}, {fd} {row[fd]:.3f} +- {row[fd + '_std']:.3f} ({row['count']} samples)"


def summarize_curves(rows):
    """The best curve KID, the lowest validation loss (each with where) and the final gap of metrics rows."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    curve = [r for r in rows if r.get("kind") == "curve"]
    if not evals and not curve:
        return None
    out = {}
    if curve:
        best = min(curve, key=lambda r: (r["KID"], r["kimg"]))
        out.update(best_KID=best["KID"], best_KID_std=best["KID_std"], best_KID_kimg=best["kimg"], best_KID_epoch=best["epoch"],
                   final_KID=curve[-1]["KID"], curve_points=len(curve))
    if evals:
        best, last = min(evals, key=lambda r: (r["val_loss"], r["kimg"])), max(evals, key=lambda r: r["kimg"])
        out.update(best_val_loss=best["val_loss"], best_val_loss_kimg=best["kimg"], final_val_loss=last["val_loss"],
                   final_train_loss=last["train_loss"], final_gap=last["gap"], final_gap_pct=100 * last["gap"] / abs(last["val_loss"]),
                   final_kimg=last["kimg"], eval_points=len(evals))
    return out


def summary_lines(s):
    lines = []
    if "best_KID" in s:
        lines.append(f"best quality-curve KID {s['best_KID']:.5f} +- {s['best_KID_std']:.5f} at {s['best_KID_kimg']:.1f} kimg "
                     f"(epoch {s['best_KID_epoch']}; {s['curve_points']} points, final {s['final_KID']:.5f})")
    if "best_val_loss" in s:
        lines.append(f"validation loss lowest at {s['best_val_loss_kimg']:.1f} kimg ({s['best_val_loss']:.4f}); final {s['final_val_loss']:.4f} "
                     f"vs {s['final_train_loss']:.4f} on training images: gap {s['final_gap']:+.4f} ({s['final_gap_pct']:+.1f}%)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--samples", type=int, default=0, help="also a quality-curve point from this many samples (default 0: none)")
    args = p.parse_args(argv)
    args.overrides += ["train.eval_epochs=1", f"train.eval_samples={args.samples}"]
    cfg, outdir = open_run(args)
    with dist.session() as (rank, world, device):
        ckpt = load_epoch(outdir, args.epoch, required=("emas", "loss_head", "t_img", "epoch"))
        edm = build_edm(cfg).to(device)
        edm.net.load_state_dict(ckpt["emas"]["classic"])
        edm.loss.load_state_dict(ckpt["loss_head"])
        for row in Evaluator(cfg, *trained_images(cfg), rank, world, device)(edm.net, edm.loss, ckpt["t_img"], ckpt["epoch"]):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    run_main(main)
