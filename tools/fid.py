"""FID and KID with pytorch-fid's Inception-v3 (pool3, 2048-d), its weights read from a local file.

    python tools/fid.py ref --config config/cifar10/E.yaml --out refs/cifar10-train.npz   # torchrun works too
    python tools/fid.py score runs/cifar10-E/samples/epoch_1999-classic-heun18 refs/cifar10-train.npz
    python tools/fid.py compare A.npz B.npz                                               # FID of two statistics files

Reference statistics are pytorch-fid's .npz (mu, sigma), so `python -m pytorch_fid A.npz B.npz` gives the
same FID (it builds its network even then, so it needs the weights in the torch hub cache), plus `features`:
a random float16 subset of at most 10,000 reference features for KID, the unbiased metric at small sample
counts (FID is biased upwards at small n).
Weights: --inception-weights PATH, else $FID_INCEPTION_WEIGHTS, else the torch hub cache.
"""

import os
import sys

if __name__ == "__main__":
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # import tools.* from the repo root, not tools/

import argparse
import contextlib
import glob
import hashlib
import json
import shutil
import tempfile

import numpy as np
import torch

from tools import dist
from tools.checkpoint import atomic_write
from tools.cli import UserError, run_main
from tools.data import cache_dir
from tools.metrics import KID_SUBSET_SIZE, frechet_distance, kid  # noqa: F401 (fid.KID_SUBSET_SIZE stays importable)

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"     # torch hub convention: the file name carries its sha256 prefix
FEATURE_DIM = 2048                     # Inception-v3 pool3
REF_FEATURES = 10000                   # Reference features kept for KID.


class FeatureStats:
    """Streaming float64 sums (count, sum x, sum x x^T) for mu and sigma, plus the first `max_keep` raw features for KID."""

    def __init__(self, dim=FEATURE_DIM, max_keep=0):
        self.dim, self.max_keep = dim, max_keep
        self.num = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.kept = []

    def update(self, feats):
        x = torch.as_tensor(feats).to(torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"features must be [n, {self.dim}], got {tuple(x.shape)}")
        if self.num == 0 and self.sum.device != x.device:
            self.sum, self.sum_outer = self.sum.to(x.device), self.sum_outer.to(x.device)
        x = x.to(self.sum.device)
        self.num += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        room = self.max_keep - self.num_kept()
        if room > 0:
            self.kept.append(x[:room].cpu())
        return self

    def num_kept(self):
        return sum(len(k) for k in self.kept)

    def features(self):
        """Kept raw features, float64 [k, dim], in the order seen (across ranks after all_reduce); None if none kept."""
        return torch.cat(self.kept).numpy() if self.kept else None

    def all_reduce(self):
        """Sum over torch.distributed ranks; kept features are gathered and put in the order of a rank-strided pass."""
        if not torch.distributed.is_initialized():
            return self
        comm = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.cat([torch.tensor([float(self.num)], dtype=torch.float64), self.sum.cpu(), self.sum_outer.cpu().flatten()]).to(comm)
        dist.all_reduce_sum(packed)
        packed = packed.cpu()
        self.num = int(packed[0].item())
        self.sum = packed[1:1 + self.dim].clone()
        self.sum_outer = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()
        if self.max_keep > 0:
            world = torch.distributed.get_world_size()
            mine = torch.zeros(self.max_keep, self.dim, dtype=torch.float64)
            if self.kept:
                mine[:self.num_kept()] = torch.cat(self.kept)
            counts = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(world)]
            torch.distributed.all_gather(counts, torch.tensor([self.num_kept()], device=comm))
            gathered = [torch.zeros_like(mine, device=comm) for _ in range(world)]
            torch.distributed.all_gather(gathered, mine.to(comm))
            # Rank r's j-th feature is item j * world + r of a pass strided over ranks.
            order = sorted((j * world + r, r, j) for r in range(world) for j in range(int(counts[r].item())))
            self.kept = [torch.stack([gathered[r][j].cpu() for _, r, j in order])] if order else []
        return self

    def mu_sigma(self):
        """Mean and unbiased covariance (ddof = 1, as np.cov in pytorch-fid), float64 numpy."""
        if self.num < 2:
            raise UserError(f"FID needs at least 2 images, got {self.num}")
        mu = self.sum / self.num
        sigma = (self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Inception-v3.

def find_inception_weights(path=None):
    """The weights file: `path`, else $FID_INCEPTION_WEIGHTS, else the torch hub cache; None if none is set or cached."""
    for given, where in ((path, "--inception-weights"), (os.environ.get("FID_INCEPTION_WEIGHTS"), "FID_INCEPTION_WEIGHTS")):
        if given:
            if not os.path.isfile(given):
                raise UserError(f"{where}={given}: no such file; it must be pytorch-fid's {WEIGHTS_FILE} ({WEIGHTS_URL})")
            return given
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    return cached if os.path.isfile(cached) else None


def inception_weights_or_none(path=None):
    """A local weights file (as find_inception_weights); failing that, pytorch-fid's download into the torch
    hub cache, as pytorch-fid itself would do. Offline, says how to provide the file and returns None."""
    found = find_inception_weights(path)
    if found is not None:
        return found
    import socket
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    timeout = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(30)  # a firewall that drops packets should not hang the run
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, cached, hash_prefix=WEIGHTS_SHA256_PREFIX, progress=False)
        return cached
    except Exception as e:  # no network (URLError, timeouts), a proxy's error page (hash mismatch), a read-only cache
        print(f"Inception scoring skipped: no {WEIGHTS_FILE} here and it could not be downloaded ({type(e).__name__}). "
              f"Pass --inception-weights PATH or set FID_INCEPTION_WEIGHTS=PATH (see docs/METRICS.md)", flush=True)
        return None
    finally:
        socket.setdefaulttimeout(timeout)


def build_inception(weights_path=None, random_weights=False, device="cpu"):
    """pytorch-fid's FID Inception-v3 (pool3 output, resizes to 299 and maps [0, 1] to [-1, 1] itself), in eval mode.

    The weights come from a local file, never the network. random_weights=True is for tests: a fixed random
    network whose name, `model.extractor`, says RANDOM wherever its statistics are written.
    """
    import pytorch_fid.inception as fid_inception

    with tempfile.TemporaryDirectory(prefix="fid-hub-") as tmp:
        if random_weights:
            path, extractor = os.path.join(tmp, "inception-v3-random.pth"), "inception-v3-RANDOM"
            torch.save(random_inception_state_dict(), path)
        else:
            path = find_inception_weights(weights_path)
            if path is None:
                raise UserError(f"scoring needs pytorch-fid's Inception weights {WEIGHTS_FILE}: pass --inception-weights PATH, set "
                                f"FID_INCEPTION_WEIGHTS=PATH or put it in {os.path.join(torch.hub.get_dir(), 'checkpoints')} "
                                f"(on a machine with internet: {WEIGHTS_URL})")
            extractor = _weights_name(path)
        # The constructor's default init draws from the global RNG: leave the caller's stream as it was.
        with _hub_cache_holding(path, tmp), torch.random.fork_rng(devices=[]):
            try:
                model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True, normalize_input=True)
            except RuntimeError as e:
                raise UserError(f"{path}: not pytorch-fid's Inception weights "
                                f"({str(e).splitlines()[0]}); get {WEIGHTS_URL}") from None
    model.extractor = extractor
    return model.eval().requires_grad_(False).to(device)


@contextlib.contextmanager
def _hub_cache_holding(path, tmp):
    """torch.hub's cache holds `path` as checkpoints/WEIGHTS_FILE while the block runs, so pytorch-fid's constructor, whose
    load_state_dict_from_url(FID_WEIGHTS_URL) loads <hub dir>/checkpoints/<URL file name> when it exists (no hash check)
    and downloads otherwise, loads `path`. The real cache is used when `path` is its file, else the empty folder `tmp`."""
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if os.path.isfile(cached) and os.path.samefile(path, cached):
        yield
        return
    os.makedirs(os.path.join(tmp, "checkpoints"))
    link = os.path.join(tmp, "checkpoints", WEIGHTS_FILE)
    try:
        os.symlink(os.path.abspath(path), link)
    except OSError:  # a file system without symlinks
        shutil.copyfile(path, link)
    if not os.path.isfile(link):  # torch.hub would download it
        raise UserError(f"{path}: cannot be read through {link}; copy it to {cached}")
    # set_dir pins the hub dir; restoring None (not get_dir()'s value) lets $TORCH_HOME steer it again afterwards.
    pinned = torch.hub._hub_dir
    torch.hub.set_dir(tmp)
    try:
        yield
    finally:
        torch.hub._hub_dir = pinned


def random_inception_state_dict(seed=0):
    """A state dict with exactly the keys and shapes of pytorch-fid's FID Inception, random: for tests, no file needed.

    Built as pytorch-fid's fid_inception_v3 builds its network; the convs are kaiming-initialised because PyTorch's
    default init shrinks pool3 activations to ~1e-8, which would make every random-network FID ~0."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inception = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
        inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
        inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
        inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        inception.Mixed_7b = FIDInceptionE_1(1280)
        inception.Mixed_7c = FIDInceptionE_2(2048)
        for m in inception.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return inception.state_dict()


def _weights_name(path):
    """The extractor name of a weights file; a file other than the published one is named unverified, with a warning.

    The file is read here with weights_only=True, as pytorch-fid's own load is not: a pickle that is not a plain state
    dict fails here in one line instead of running."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the Inception weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"replace it with {WEIGHTS_URL}") from None
    if not isinstance(state_dict, dict):
        raise UserError(f"{path}: not a state dict; replace it with {WEIGHTS_URL}")
    sha = h.hexdigest()
    if sha.startswith(WEIGHTS_SHA256_PREFIX):
        return "inception-v3-pytorch-fid"
    print(f"warning: {path} is not the published {WEIGHTS_FILE} (sha256 {sha[:8]}...): FIDs are not comparable to published ones",
          file=sys.stderr, flush=True)
    return f"inception-v3-unverified-{sha[:8]}"


def features_of_images(model, images, batch=200, device=None, stats=None):
    """Pool3 features of uint8 images [N, C, H, W] (C = 1 or 3), fed exactly as quantised: float64 numpy [N, 2048],
    or, with `stats`, accumulated into that FeatureStats (returned)."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"expected uint8 images [N, C, H, W] with C = 1 or 3, got {images.dtype} {tuple(images.shape)}")
    device = device or next(model.parameters()).device
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device).to(torch.float32) / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)  # gray -> RGB, as PIL's convert("RGB") does for pytorch-fid
            f = model(x)[0].flatten(1).to(torch.float64)
            if stats is not None:
                stats.update(f)
            else:
                out.append(f.cpu())
    if stats is not None:
        return stats
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


# ---------------------------------------------------------------------------------------------
# Reference statistics and scoring.

def compute_reference(cfg, out_path, weights_path=None, random_weights=False, batch=200, device="cpu"):
    """Statistics of the whole training split (uint8, no flips), rank-strided over torch.distributed ranks; rank 0 writes
    `out_path` (.npz: mu, sigma, features) and its metadata `<out_path without .npz>.json`. Returns (mu, sigma) on rank 0."""
    from tools.data import load_dataset
    if not out_path.endswith(".npz"):
        raise UserError(f"--out {out_path}: must end with .npz (pytorch-fid reads statistics only from .npz files)")
    model = build_inception(weights_path, random_weights, device)
    images, _ = load_dataset(cfg, "train")
    # A fixed random order, so the first features kept form a random subset whatever the rank count.
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    world, rank = dist.world_size(), dist.rank()
    mine = order[rank::world]
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
        atomic_write(out_path[:-4] + ".json", lambda f: f.write(json.dumps(info, indent=1).encode()))
    dist.on_rank0(write)  # a failed write stops every rank with its message; none is left waiting
    return stats.mu_sigma() if rank == 0 else None


def reference_path(cfg):
    """DATA_CACHE/fid-refs/<dataset>-<resolution>px[-<root hash>].npz: where --fid auto keeps a training split's
    statistics (image folders are told apart by their absolute path)."""
    d, n = cfg["data"], cfg["network"]
    name = f"{d['dataset']}-{n['img_resolution']}px"
    if d["dataset"] == "folder":
        name += "-" + hashlib.sha256(os.path.abspath(d["root"]).encode()).hexdigest()[:8]
    return cache_dir(cfg, "fid-refs", name + ".npz")


def auto_reference(cfg, weights_path=None, device="cpu"):
    """The training split's statistics at reference_path(cfg), computed on first use. Collective under torchrun:
    rank 0 decides, and every rank computes its share of a missing reference."""
    path = reference_path(cfg)
    if not dist.broadcast(os.path.exists(path)):
        dist.print0(f"reference statistics: computing {path} from the training split on {dist.world_size()} rank(s)")
        compute_reference(cfg, path, weights_path=weights_path, device=device)
    return path


def load_stats(path):
    """(mu [d], sigma [d, d], reference features [k, d] float64 or None) from a statistics .npz."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such statistics file (make one with: python tools/fid.py ref --config ... --out {path})")
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            features = f["features"].astype(np.float64) if "features" in f else None
    except Exception as e:
        raise UserError(f"{path}: not a statistics .npz with mu and sigma ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or (features is not None and (features.ndim != 2 or features.shape[1] != d)):
        raise UserError(f"{path}: inconsistent shapes mu {mu.shape}, sigma {sigma.shape}"
                        + ("" if features is None else f", features {features.shape}"))
    return mu, sigma, features


def _reference_extractor(ref_path):
    meta = ref_path[:-4] + ".json" if ref_path.endswith(".npz") else None
    if meta and os.path.isfile(meta):
        try:
            with open(meta) as f:
                return json.load(f).get("extractor")
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f"{meta}: unreadable metadata ({type(e).__name__}); delete it or recompute the reference") from None
    return None


def score_images(images, ref_path, weights_path=None, random_weights=False, device="cpu", batch=200, kid_subsets=100):
    """FID and KID of uint8 images (a tensor [N, C, H, W] or an iterable of such batches) against a reference .npz.

    KID uses the first 10,000 images against the reference's kept features; NaN if the file has none (pytorch-fid's own)."""
    mu_ref, sigma_ref, feats_ref = load_stats(ref_path)
    if mu_ref.shape != (FEATURE_DIM,):
        raise UserError(f"{ref_path}: mu has shape {mu_ref.shape}, expected ({FEATURE_DIM},) (Inception pool3)")
    model = build_inception(weights_path, random_weights, device)
    ref_extractor = _reference_extractor(ref_path)
    if ref_extractor is not None and ref_extractor != model.extractor:
        raise UserError(f"{ref_path} was made with {ref_extractor} but scoring uses {model.extractor}: "
                        f"recompute the reference with the same weights (python tools/fid.py ref ...)")
    stats = FeatureStats(max_keep=REF_FEATURES)
    batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
    for b in batches:
        features_of_images(model, b, batch, device, stats)
    mu, sigma = stats.mu_sigma()
    kid_mean, kid_std = kid(stats.features(), feats_ref, kid_subsets) if feats_ref is not None else (float("nan"), float("nan"))
    return dict(fid=frechet_distance(mu, sigma, mu_ref, sigma_ref), kid_mean=kid_mean, kid_std=kid_std, count=stats.num,
                extractor=model.extractor)


def png_paths(folder):
    """All PNGs under `folder`, sorted; not sample.py's preview grid.png (half-written files end in .tmp<pid>)."""
    paths = sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))
    return [p for p in paths if os.path.relpath(p, folder) != "grid.png"]


def _png_batches(paths, batch):
    from PIL import Image
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
    """score_images on every PNG under `folder` (recursively, sorted)."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder")
    paths = png_paths(folder)
    if not paths:
        raise UserError(f"{folder}: no PNG images found (recursively)")
    return score_images(_png_batches(paths, batch), ref_path, weights_path, random_weights, device, batch, kid_subsets)


# ---------------------------------------------------------------------------------------------
# Command line.

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 2 and all(a.endswith(".npz") for a in argv):
        argv = ["compare", *argv]  # the bare form `fid.py A.npz B.npz` that docs/METRICS.md shows
    p = argparse.ArgumentParser(prog="fid.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    compare.add_argument("a", metavar="A.npz", help="statistics file")
    compare.add_argument("b", metavar="B.npz", help="statistics file")
    args = p.parse_args(argv)

    if args.command == "compare":
        (mu1, sigma1, _), (mu2, sigma2, _) = load_stats(args.a), load_stats(args.b)
        print(repr(frechet_distance(mu1, sigma1, mu2, sigma2)))
    elif args.command == "ref":
        from tools.config import load_config
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
