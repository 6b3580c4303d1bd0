"""Inception FID and KID: statistics of a training split and of samples, streamed into float64 sums (docs/METRICS.md).

    python -m tools.fid ref --config config/cifar10/E.yaml --out refs/cifar10-train.npz   # torchrun -m works too
    python -m tools.fid score runs/cifar10-E/samples/epoch_1999-classic-heun18-bf16 refs/cifar10-train.npz
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.fid ...")

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

from tools import dist
from tools.checkpoint import atomic_write, write_json
from tools.cli import UserError, first_line, run_main
from tools.config import load_config
from tools.data import cache_dir, load_dataset
from tools.inception import FEATURE_DIM, WEIGHTS_FILE, build_inception, features_of_images, find_inception_weights
from tools.metrics import frechet_distance, kid

REF_FEATURES = 10000  # reference features kept for KID


class FeatureStats:
    """Streaming float64 sums (count, sum x, sum x x^T) for mu and sigma; the first `max_keep` features for KID."""

    def __init__(self, dim=FEATURE_DIM, max_keep=0):
        self.dim, self.max_keep, self.num, self.kept = dim, max_keep, 0, []
        self.sum, self.sum_outer = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats):
        x = torch.as_tensor(feats).to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"features must be [n, {self.dim}], got {tuple(x.shape)}")
        if self.num == 0:
            self.sum, self.sum_outer = self.sum.to(x.device), self.sum_outer.to(x.device)
        x = x.to(self.sum.device)
        self.num += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        room = self.max_keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(x[:room].cpu())
        return self

    def features(self):  # float64 [k, dim] in the order seen
        return torch.cat(self.kept).numpy() if self.kept else None

    def all_reduce(self):
        """Sum over the ranks; kept features in the order of a rank-strided pass (rank r's j-th is j * world + r)."""
        if not torch.distributed.is_initialized():
            return self
        comm = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.cat([torch.tensor([float(self.num)], dtype=torch.float64), self.sum.cpu(), self.sum_outer.cpu().flatten()])
        packed = dist.all_reduce_sum(packed.to(comm)).cpu()
        self.num, self.sum = int(packed[0].item()), packed[1:1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()
        if self.max_keep > 0:
            kept = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(kept, self.kept)
            order = sorted((j * len(kept) + r, f) for r, k in enumerate(kept) for j, f in enumerate(torch.cat(k) if k else []))
            self.kept = [torch.stack([f for _, f in order])] if order else []
        return self

    def mu_sigma(self):
        if self.num < 2:
            raise UserError(f"FID needs at least 2 images, got {self.num}")
        mu = self.sum / self.num
        return mu.cpu().numpy(), ((self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)).cpu().numpy()


def compute_reference(cfg, out_path, weights_path=None, random_weights=False, batch=200, device="cpu"):
    """Statistics of the training split, strided over the ranks, into `out_path` (.npz) and its .json."""
    if not out_path.endswith(".npz"):
        raise UserError(f"--out {out_path}: must end with .npz (pytorch-fid reads statistics only from .npz files)")
    model, (images, _) = build_inception(weights_path, random_weights, device), load_dataset(cfg, "train")
    world, rank = dist.world_size(), dist.rank()
    mine = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[rank::world]  # the kept features: a random subset
    stats = FeatureStats(max_keep=-(-REF_FEATURES // world))
    for i in range(0, len(mine), batch):
        features_of_images(model, images[mine[i:i + batch]], batch, device, stats)
    stats.all_reduce()

    def write():
        mu, sigma = stats.mu_sigma()
        features = stats.features()[:REF_FEATURES].astype(np.float16)
        info = dict(dataset=cfg["data"]["dataset"], split="train", count=stats.num, resolution=cfg["network"]["img_resolution"],
                    channels=cfg["network"]["img_channels"], extractor=model.extractor, kid_features=len(features),
                    weights_file=None if random_weights else os.path.basename(find_inception_weights(weights_path)))
        atomic_write(out_path, lambda f: np.savez(f, mu=mu, sigma=sigma, features=features))
        write_json(out_path[:-4] + ".json", info)
    dist.on_rank0(write)
    return stats.mu_sigma() if rank == 0 else None


def reference_path(cfg):
    """DATA_CACHE/fid-refs/<dataset>-<resolution>px[-<hash of a folder dataset's absolute path>].npz."""
    d = cfg["data"]
    name = f"{d['dataset']}-{cfg['network']['img_resolution']}px"
    if d["dataset"] == "folder":
        name += "-" + hashlib.sha256(os.path.abspath(d["root"]).encode()).hexdigest()[:8]
    return cache_dir(cfg, "fid-refs", name + ".npz")


def auto_reference(cfg, weights_path=None, device="cpu"):
    """reference_path(cfg), computed on first use by every rank (collective under torchrun)."""
    path = reference_path(cfg)
    if not dist.broadcast(os.path.exists(path)):
        dist.print0(f"reference statistics: computing {path} from the training split on {dist.world_size()} rank(s)")
        compute_reference(cfg, path, weights_path=weights_path, device=device)
    return path


def load_stats(path):
    """(mu [d], sigma [d, d], reference features [k, d] float64 or None) of a statistics .npz."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such statistics file (make one with: python -m tools.fid ref --config ... --out {path})")
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            features = f["features"].astype(np.float64) if "features" in f else None
    except Exception as e:
        raise UserError(f"{path}: not a statistics .npz with mu and sigma ({type(e).__name__}: {first_line(e)})") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or (features is not None and (features.ndim != 2 or features.shape[1] != d)):
        raise UserError(f"{path}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}"
                        + ("" if features is None else f", features {features.shape}"))
    return mu, sigma, features


def score_images(images, ref_path, weights_path=None, random_weights=False, device="cpu", batch=200, kid_subsets=100):
    """FID and KID (NaN without reference features) of uint8 images [N, C, H, W] or batches of them."""
    mu_ref, sigma_ref, feats_ref = load_stats(ref_path)
    if mu_ref.shape != (FEATURE_DIM,):
        raise UserError(f"{ref_path}: mu has shape {mu_ref.shape}, expected ({FEATURE_DIM},) (Inception pool3)")
    model, meta, ref_extractor = build_inception(weights_path, random_weights, device), ref_path[:-4] + ".json", None
    if ref_path.endswith(".npz") and os.path.isfile(meta):
        try:
            with open(meta) as f:
                ref_extractor = json.load(f).get("extractor")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{meta}: unreadable metadata ({type(e).__name__}); delete it or recompute the reference") from None
    if ref_extractor is not None and ref_extractor != model.extractor:
        raise UserError(f"{ref_path} was made with {ref_extractor} but scoring uses {model.extractor}: "
                        f"recompute the reference with the same weights (python -m tools.fid ref ...)")
    stats = FeatureStats(max_keep=REF_FEATURES)
    for b in [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images:
        features_of_images(model, b, batch, device, stats)
    fd = frechet_distance(*stats.mu_sigma(), mu_ref, sigma_ref)  # first: it rejects fewer than 2 images
    kid_mean, kid_std = kid(stats.features(), feats_ref, kid_subsets) if feats_ref is not None else (float("nan"), float("nan"))
    return dict(fid=fd, kid_mean=kid_mean, kid_std=kid_std, count=stats.num, extractor=model.extractor)


def png_paths(folder):
    """All PNGs under `folder`, sorted (temp files end in .tmp-<host>-<pid>, not .png)."""
    return sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if n.endswith(".png"))


def _png_batches(paths, batch):
    shape = None
    for i in range(0, len(paths), batch):
        arrays = []
        for p in paths[i:i + batch]:
            with Image.open(p) as im:
                a = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
            a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
            shape = shape or a.shape
            if a.shape != shape:
                raise UserError(f"{p}: {a.shape} (C, H, W) differs from the first image's {shape}; score one kind of image at a time")
            arrays.append(a)
        yield torch.from_numpy(np.stack(arrays))


def score_folder(folder, ref_path, weights_path=None, random_weights=False, device="cpu", batch=200, kid_subsets=100):
    if not (paths := png_paths(folder)):
        raise UserError(f"{folder}: " + ("no PNG images found (recursively)" if os.path.isdir(folder) else "no such folder"))
    return score_images(_png_batches(paths, batch), ref_path, weights_path, random_weights, device, batch, kid_subsets)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and all(a.endswith(".npz") for a in argv):
        argv = ["compare", *argv]  # the bare form `python -m tools.fid A.npz B.npz`
    p = argparse.ArgumentParser(prog="python -m tools.fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, title="commands")
    ref = commands.add_parser("ref", help="statistics of a config's training split")
    ref.add_argument("--config", required=True, help="the YAML config whose training split is the reference")
    ref.add_argument("--out", required=True, metavar="PATH.npz", help="statistics file to write (plus PATH.json)")
    ref.add_argument("overrides", nargs="*", metavar="section.key=value")
    score = commands.add_parser("score", help="FID and KID of a folder of PNGs against REF.npz")
    score.add_argument("folder", help="folder of PNGs (searched recursively)")
    score.add_argument("ref", metavar="REF.npz", help="reference statistics")
    score.add_argument("--kid-subsets", type=int, default=100)
    for q in (ref, score):
        q.add_argument("--inception-weights", metavar="PATH", help=f"local {WEIGHTS_FILE} (or set FID_INCEPTION_WEIGHTS)")
        q.add_argument("--random-weights", action="store_true", help="random Inception, for tests only")
        q.add_argument("--batch", type=int, default=200, help="images per forward")
    compare = commands.add_parser("compare", help="FID of two statistics files (no network is loaded)")
    compare.add_argument("a", metavar="A.npz")
    compare.add_argument("b", metavar="B.npz")
    args = p.parse_args(argv)
    if args.command == "compare":
        (mu1, sigma1, _), (mu2, sigma2, _) = load_stats(args.a), load_stats(args.b)
        print(repr(frechet_distance(mu1, sigma1, mu2, sigma2)))
    elif args.command == "ref":
        cfg = load_config(args.config, args.overrides)
        with dist.session() as (_, _, device):
            compute_reference(cfg, args.out, args.inception_weights, args.random_weights, args.batch, device)
            dist.print0(f"reference statistics: {args.out} (+ {args.out[:-4]}.json)")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        r = score_folder(args.folder, args.ref, args.inception_weights, args.random_weights, device, args.batch, args.kid_subsets)
        print(f"fid: {r['fid']:.4f}  kid: {r['kid_mean']:.5f} +- {r['kid_std']:.5f}  ({r['count']} images, {r['extractor']})")


if __name__ == "__main__":
    run_main(main)
