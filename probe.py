"""Linear probe of a trained network's features (the DDAE protocol, Xiang et al. 2023).

    python probe.py --config config/cifar10/E.yaml --epoch 1000
    python probe.py --config config/cifar10/E.yaml --t 4 --ema sigma_rel=0.075
    python probe.py --config config/cifar10/E.yaml --grid              # every block x probe.grid_sigmas
    python probe.py --config config/cifar10/E.yaml --list-blocks
    torchrun --nproc_per_node=8 probe.py --config config/cifar10/E.yaml  # extraction spread over the GPUs

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
import contextlib
import json
import math
import os
import re
import sys
import time

import torch

from tools import dist
from tools.checkpoint import atomic_save, atomic_write, checkpoint_path, list_checkpoints, load_net, parse_ema
from tools.cli import UserError, run_main
from tools.config import build_network, load_config
from tools.data import load_dataset, to_float
from tools.edm import Denoiser
from tools.sampler import edm_sigmas

CLASSIFIERS = ("sklearn", "torch")
SEED_STRIDE = 10_000_000  # seed of image i = i + SEED_STRIDE * stream; datasets stay far below 10M images
STREAMS = {("train", False): 0, ("train", True): 1, ("test", False): 2}  # (split, x-flipped) -> seed stream
HOLDOUT_SEED = 0  # fixed permutation of the training split that picks the held-out images
CACHE_VERSION = 1  # bump when the meaning of a cached feature file changes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's YAML config, e.g. config/cifar10/E.yaml")
    p.add_argument("--outdir", help="the run directory (default: train.outdir of the config)")
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


def log(*args):
    """Progress goes to stderr (rank 0), so that stdout starts with the result."""
    if dist.rank() == 0:
        print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Blocks and noise levels.

def list_blocks(cfg):
    """[(name, channels, resolution)] of every encoder and decoder block in forward order, named
    'enc.<key>' / 'dec.<key>' after the UNet's ModuleDicts (e.g. dec.8x8_block1). Built on the meta device."""
    n = cfg["network"]
    with torch.device("meta"):
        net = build_network(cfg).eval()
        shapes = {}
        for name, module in named_blocks(net):
            module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
        labels = torch.zeros(1, n["label_dim"]) if n["label_dim"] else None
        net(torch.zeros(1, n["img_channels"], n["img_resolution"], n["img_resolution"]), torch.zeros(1), labels)
    return [(name, shapes[name][1], shapes[name][2]) for name, _ in named_blocks(net)]


def named_blocks(net):
    return [(f"enc.{k}", m) for k, m in net.enc.items()] + [(f"dec.{k}", m) for k, m in net.dec.items()]


def default_block(blocks):
    """The DDAE reference position: the second decoder block at the second-lowest resolution
    (dec.8x8_block1 for a 32x32 network with levels 32/16/8/4)."""
    resolutions = sorted({res for _, _, res in blocks})
    if len(resolutions) < 2 or f"dec.{resolutions[1]}x{resolutions[1]}_block1" not in {b[0] for b in blocks}:
        raise UserError("this network has no second-lowest-resolution decoder block1; set probe.block (see --list-blocks)")
    return f"dec.{resolutions[1]}x{resolutions[1]}_block1"


def check_block(name, blocks):
    names = [b[0] for b in blocks]
    if name not in names:
        hint = f" (did you mean dec.{name}?)" if f"dec.{name}" in names else ""
        raise UserError(f"unknown block {name!r}{hint}; the blocks of this network: {', '.join(names)} (see --list-blocks)")
    return name


def sigma_of_t(cfg, t):
    """Noise level at index t of the reversed sampling schedule [0, sigma_min, ..., sigma_max] of the
    config's sampler (sample.steps, sigma_min, sigma_max, rho); DDAE's t = 4 is sigma = 0.0599 with 18 steps."""
    s = cfg["sample"]
    schedule = edm_sigmas(s["steps"], s["sigma_min"], s["sigma_max"], s["rho"]).flip(0).tolist()
    if not 1 <= t < len(schedule):
        raise UserError(f"--t must be between 1 and {len(schedule) - 1} (index 0 is sigma = 0, the clean image)")
    return schedule[t]


# ----------------------------------------------------------------------------------------------------
# Feature extraction.

class _StopForward(Exception):
    """Raised by the hook of the last block needed: the rest of the network does not run."""


def image_noise(seeds, shape):
    """Unit Gaussian noise [len(seeds), *shape], image k drawn from a CPU generator seeded with seeds[k]
    (the same numbers on any device, batch size or rank split)."""
    g = torch.Generator()
    return torch.stack([torch.randn(shape, generator=g.manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def extract_features(net, sigma_data, images, sigma, blocks, seeds, batch, flip=False):
    """{block: float32 [N, C]}: pooled activations of `blocks` for images (uint8 [N, C, H, W] on the
    network's device) + sigma * noise, flipped horizontally first if `flip`. Under torchrun each rank runs
    the images rank, rank + world, ... and the rows are gathered back into index order on every rank."""
    device = next(net.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    mine = torch.arange(rank, len(images), world)
    forward_order = [name for name, _ in named_blocks(net)]
    last = max(blocks, key=forward_order.index)
    modules = dict(named_blocks(net))
    label_dim = getattr(net, "label_dim", 0)
    pooled = {}

    def hook(name):
        def fn(module, inputs, output):
            pooled[name] = output.to(torch.float32).mean(dim=(2, 3))
            if name == last:
                raise _StopForward
        return fn

    out = {b: torch.empty(len(mine), modules[b].out_channels, device=device) for b in blocks}
    handles = [modules[b].register_forward_hook(hook(b)) for b in blocks]
    denoiser = Denoiser(net, sigma_data)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    try:
        for start in range(0, len(mine), batch):
            idx = mine[start:start + batch]
            x = to_float(images[idx.to(images.device)])
            noise = image_noise(seeds[idx], x.shape[1:]).to(device, non_blocking=True)
            if flip:
                x = x.flip(3)
            labels = torch.zeros(len(idx), label_dim, device=device) if label_dim else None  # unconditional
            with amp:
                try:
                    denoiser(x + sigma * noise, sigma, labels)
                except _StopForward:
                    pass
            for b in blocks:
                out[b][start:start + len(idx)] = pooled[b]
    finally:
        for h in handles:
            h.remove()
    return {b: gather_strided(f, len(images)).cpu() for b, f in out.items()}


def gather_strided(x, n):
    """Reassemble rows held rank-strided (rank r has rows r, r + world, ...) into [n, ...] on every rank."""
    world = dist.world_size()
    if world == 1:
        return x
    per_rank = -(-n // world)
    padded = x.new_zeros(per_rank, *x.shape[1:])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = x.new_empty(n, *x.shape[1:])
    for r, part in enumerate(parts):
        out[r::world] = part[:len(range(r, n, world))]
    return out


def broadcast(obj):
    """Rank 0's value of a picklable object on every rank."""
    if dist.world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


# ----------------------------------------------------------------------------------------------------
# Feature cache: OUTDIR/probe/features/epoch_<N>/<ema>/<block>/sigma=<s>/<split>[_flip].pt

class Checkpoint:
    """The checkpoint a probe reads: epoch, path, and the file identity that keys the cache."""

    def __init__(self, outdir, epoch=None):
        available = dict(list_checkpoints(outdir))
        if not available:
            raise UserError(f"no checkpoint in {os.path.join(outdir, 'checkpoints')}; train first or pass --outdir")
        if epoch is None:
            epoch = max(available)
        if epoch not in available:
            raise UserError(f"no checkpoint for epoch {epoch} in {os.path.join(outdir, 'checkpoints')} "
                            f"(available: {', '.join(map(str, sorted(available)))})")
        st = os.stat(available[epoch])
        self.outdir, self.epoch, self.path = outdir, epoch, available[epoch]
        self.identity = dict(checkpoint=os.path.basename(self.path), size=st.st_size, mtime_ns=st.st_mtime_ns)


def feature_path(ckpt, ema, block, sigma, split, flip):
    return os.path.join(ckpt.outdir, "probe", "features", f"epoch_{ckpt.epoch}", ema, block, f"sigma={sigma:.6g}",
                        f"{split}{'_flip' if flip else ''}.pt")


def feature_meta(ckpt, ema, block, sigma, split, flip, num_images):
    """What a cached file must have been made from; any difference means extract again."""
    return dict(version=CACHE_VERSION, **ckpt.identity, ema=ema, block=block, sigma=float(sigma), split=split,
                flip=flip, num_images=num_images, seed_offset=SEED_STRIDE * STREAMS[split, flip])


def read_cached(path, meta):
    """(features, t_img) from a cache file that matches `meta`, else None."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, partial or foreign file: extract again
        return None
    if not isinstance(saved, dict) or saved.get("meta") != meta:
        return None
    return saved["features"], saved["t_img"]


def write_cached(path, features, meta, t_img):
    atomic_save(dict(features=features.contiguous(), meta=meta, t_img=t_img), path)


def ensure_features(cfg, ckpt, ema, blocks, sigmas, streams, batch, device, images):
    """Extract and cache every (block, sigma, stream) whose cache file is missing or stale; the network is
    loaded only if one is. Collective under torchrun: rank 0 decides, every rank extracts its share.
    Returns t_img of the checkpoint."""
    missing, t_img = {}, None
    if dist.rank() == 0:
        for sigma in sigmas:
            for split, flip in streams:
                for b in blocks:
                    cached = read_cached(feature_path(ckpt, ema, b, sigma, split, flip),
                                         feature_meta(ckpt, ema, b, sigma, split, flip, len(images[split])))
                    if cached is None:
                        missing.setdefault((sigma, split, flip), []).append(b)
                    else:
                        t_img = cached[1]
    missing = broadcast(missing)
    if not missing:
        log(f"features: cached ({os.path.join(ckpt.outdir, 'probe', 'features', f'epoch_{ckpt.epoch}', ema)})")
        return t_img

    net, info = load_net(cfg, ckpt.outdir, ckpt.epoch, ema, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    on_device = {}
    for (sigma, split, flip), todo in missing.items():
        if split not in on_device:
            on_device[split] = images[split].to(device)
        seeds = torch.arange(len(images[split])) + SEED_STRIDE * STREAMS[split, flip]
        start = time.time()
        feats = extract_features(net, cfg["diffusion"]["sigma_data"], on_device[split], sigma, todo, seeds, batch, flip)
        log(f"features: {len(todo)} block(s) at sigma={sigma:.4g}, {split}{' x-flipped' if flip else ''}, "
            f"{len(seeds)} images on {dist.world_size()} rank(s): {time.time() - start:.1f} s")
        if dist.rank() == 0:
            for b in todo:
                write_cached(feature_path(ckpt, ema, b, sigma, split, flip), feats[b],
                             feature_meta(ckpt, ema, b, sigma, split, flip, len(images[split])), info["t_img"])
    return info["t_img"]


def load_features(ckpt, ema, block, sigma, streams, images):
    """{(split, flip): features} of one cell, from the cache."""
    return {(split, flip): read_cached(feature_path(ckpt, ema, block, sigma, split, flip),
                                       feature_meta(ckpt, ema, block, sigma, split, flip, len(images[split])))[0]
            for split, flip in streams}


# ----------------------------------------------------------------------------------------------------
# Classifier: multinomial logistic regression, sum_i CE_i + ||W||^2 / (2 C) (scikit-learn's objective).

class LinearProbe:
    """Standardisation (statistics of the fitting set) followed by a linear classifier."""

    def __init__(self, X, y, C, method, num_classes, device, init=None):
        self.mean = X.mean(0)
        self.std = X.std(0).clamp_min(1e-6)  # dead channels stay 0 after centring
        Z = (X - self.mean) / self.std
        if method == "sklearn":
            import warnings
            from sklearn.exceptions import ConvergenceWarning
            from sklearn.linear_model import LogisticRegression
            from threadpoolctl import threadpool_limits
            # Multi-threaded BLAS slows small problems down ~10x (digits: 0.2 s -> 4 s per fit on 2 cores).
            threads = 1 if Z.numel() < 2 ** 22 else None
            with warnings.catch_warnings(), threadpool_limits(threads):
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf = LogisticRegression(C=C, max_iter=1000).fit(Z.numpy(), y.numpy())
            coef, intercept = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
            if len(clf.classes_) == 2:  # one logit z for two classes: softmax logits -z/2, z/2
                coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
            self.W = torch.zeros(X.shape[1], num_classes)
            self.b = torch.full((num_classes,), -math.inf)  # classes absent from the fitting set are never predicted
            self.W[:, clf.classes_], self.b[clf.classes_] = coef.T, intercept
        else:
            self.W, self.b = self._fit_torch(Z.to(device), y.to(device), C, num_classes, init)

    @staticmethod
    def _fit_torch(Z, y, C, num_classes, init):
        """The same objective, divided by N, minimised by full-batch L-BFGS on Z's device."""
        W = torch.zeros(Z.shape[1], num_classes, device=Z.device) if init is None else init[0].clone().to(Z.device)
        b = torch.zeros(num_classes, device=Z.device) if init is None else init[1].clone().to(Z.device)
        W.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1000, history_size=20, tolerance_grad=1e-5,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(Z @ W + b, y) + W.square().sum() / (2 * C * len(y))
            loss.backward()
            return loss
        with torch.enable_grad():
            opt.step(closure)
        return W.detach().cpu(), b.detach().cpu()

    def predict(self, X):
        Z = (X - self.mean) / self.std
        return (Z @ self.W + self.b).argmax(1)

    def accuracy(self, X, y):
        return (self.predict(X) == y).to(torch.float64).mean().item()


def fit_probe(train, train_flip, labels, p, num_classes, device):
    """Choose C on the held-out part of the training split, then refit on the whole training split.
    Takes the training split only (features, x-flipped features or None, labels): the test split cannot
    influence anything chosen here. Returns (probe, selection report)."""
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    num_holdout = round(p["holdout"] * n)
    held, fit = perm[:num_holdout], perm[num_holdout:]

    def fitting_set(idx):
        if train_flip is None:
            return train[idx], labels[idx]
        return torch.cat([train[idx], train_flip[idx]]), torch.cat([labels[idx], labels[idx]])

    holdout_pct, fitted = {}, {}
    if num_holdout > 0 and len(p["C_grid"]) > 1:
        init = None
        for C in sorted(p["C_grid"]):  # strongest regularisation first; the torch fits start from the previous one
            fitted[C] = LinearProbe(*fitting_set(fit), C, p["classifier"], num_classes, device, init)
            holdout_pct[C] = round(100 * fitted[C].accuracy(train[held], labels[held]), 3)
            init = (fitted[C].W, fitted[C].b)
        best_C = max(holdout_pct, key=holdout_pct.get)  # ties: the stronger regularisation
    else:
        best_C = p["C_grid"][0]
    init = (fitted[best_C].W, fitted[best_C].b) if best_C in fitted else None
    probe = LinearProbe(*fitting_set(torch.arange(n)), best_C, p["classifier"], num_classes, device, init)
    return probe, dict(C=best_C, holdout_accuracy_pct=holdout_pct.get(best_C),
                       holdout_accuracy_pct_by_C={f"{C:g}": v for C, v in holdout_pct.items()})


def probe_cell(feats, labels, p, num_classes, device):
    """Fit on the training features, then score the test features once."""
    probe, report = fit_probe(feats["train", False], feats.get(("train", True)), labels["train"], p, num_classes, device)
    return dict(test_accuracy_pct=round(100 * probe.accuracy(feats["test", False], labels["test"]), 3),
                feature_dim=feats["train", False].shape[1], **report)


def pixels_baseline(outdir, p, images, labels, num_classes, device):
    """The same protocol on raw pixels in [-1, 1]; independent of the checkpoint, so cached per run directory."""
    path = os.path.join(outdir, "probe", "pixels.json")
    key = f"{p['classifier']}/holdout={p['holdout']:g}/C_grid={','.join(f'{c:g}' for c in p['C_grid'])}" + \
          ("/xflip" if p["xflip"] else "")
    results = read_json(path)
    if key not in results or results[key].get("num_train") != len(labels["train"]):
        feats = {("train", False): to_float(images["train"]).flatten(1), ("test", False): to_float(images["test"]).flatten(1)}
        if p["xflip"]:
            feats["train", True] = to_float(images["train"].flip(3)).flatten(1)
        results[key] = dict(probe_cell(feats, labels, p, num_classes, device), num_train=len(labels["train"]))
        write_json(path, results)
    return results[key]


# ----------------------------------------------------------------------------------------------------
# Outputs.

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def result_key(block, sigma, ema, p):
    return f"{block}@sigma={sigma:.6g}/{ema}/{p['classifier']}" + ("/xflip" if p["xflip"] else "")


def tensorboard_scalar(outdir, tag, value, t_img):
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(os.path.join(outdir, "tensorboard")) as writer:
        writer.add_scalar(tag, value, t_img)


def save_heatmap(path, table, blocks, sigmas, best):
    """Held-out accuracy (what selects) and test accuracy per block x sigma, best cell outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cell = {(c["block"], c["sigma"]): c for c in table}
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 1.1 * len(sigmas) * 2, 1.2 + 0.28 * len(blocks)), squeeze=False)
    for ax, key, title in zip(axes[0], ("holdout_accuracy_pct", "test_accuracy_pct"), ("held-out (selects)", "test")):
        grid = torch.tensor([[cell[b, s][key] if cell[b, s][key] is not None else math.nan for s in sigmas] for b in blocks])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        for i in range(len(blocks)):
            for j in range(len(sigmas)):
                bright = im.norm(grid[i, j].item()) > 0.6
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6, color="k" if bright else "w")
        ax.set_xticks(range(len(sigmas)), [f"{s:.3g}" for s in sigmas], fontsize=7)
        ax.set_yticks(range(len(blocks)), blocks if ax is axes[0][0] else [], fontsize=7)
        ax.set_xlabel("sigma")
        ax.set_title(f"{title} accuracy %", fontsize=9)
        bi, bj = blocks.index(best["block"]), sigmas.index(best["sigma"])
        ax.add_patch(matplotlib.patches.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="r", linewidth=2))
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    outdir = args.outdir or cfg["train"]["outdir"]
    p = cfg["probe"]
    for key in ("block", "ema", "classifier", "xflip", "batch", "sigma"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if args.t is not None:
        p["sigma"] = sigma_of_t(cfg, args.t)
    if p["classifier"] not in CLASSIFIERS:
        raise UserError(f"probe.classifier must be one of {', '.join(CLASSIFIERS)}, got {p['classifier']!r}")
    if not 0 <= p["holdout"] < 1 or not p["C_grid"] or min(p["C_grid"]) <= 0:
        raise UserError("probe.holdout must be in [0, 1) and probe.C_grid a non-empty list of positive numbers")
    if p["sigma"] <= 0 or (args.grid and (not p["grid_sigmas"] or min(p["grid_sigmas"]) <= 0)):
        raise UserError("noise levels must be positive (probe.sigma, probe.grid_sigmas)")
    if p["batch"] < 1:
        raise UserError("probe.batch must be at least 1")
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

    rank, world, device = dist.init()
    try:
        run(cfg, outdir, p, args, [b[0] for b in blocks], rank, device)
    finally:
        dist.shutdown()


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
