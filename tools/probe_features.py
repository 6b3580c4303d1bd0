"""Features of a frozen network for the linear probe (probe.py): block names, noise levels, extraction, the cache."""

import os
import sys
import time

import torch

from tools import dist
from tools.checkpoint import atomic_save, list_checkpoints, verify
from tools.cli import UserError
from tools.config import build_network
from tools.data import to_float
from tools.edm import Denoiser
from tools.precision import autocast
from tools.runs import load_net
from tools.rng import PROBE, image_normals
from tools.sampler import edm_sigmas

STREAMS = {("train", False): 0, ("train", True): 1, ("test", False): 2}  # (split, x-flipped) -> noise stream
CACHE_VERSION = 2  # bump when the meaning of a cached feature file changes


def list_blocks(cfg):
    """[(name, channels, resolution)] of every block in forward order, e.g. dec.8x8_block1 (built on the meta device)."""
    n = cfg["network"]
    with torch.device("meta"):
        net, shapes = build_network(cfg).eval(), {}
        for name, module in named_blocks(net):
            module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
        labels = torch.zeros(1, n["label_dim"]) if n["label_dim"] else None
        net(torch.zeros(1, n["img_channels"], n["img_resolution"], n["img_resolution"]), torch.zeros(1), labels)
    return [(name, shapes[name][1], shapes[name][2]) for name, _ in named_blocks(net)]


def named_blocks(net):
    return [(f"enc.{k}", m) for k, m in net.enc.items()] + [(f"dec.{k}", m) for k, m in net.dec.items()]


def default_block(blocks):
    """The DDAE reference position: the second decoder block at the second-lowest resolution (dec.8x8_block1 at 32x32)."""
    resolutions = sorted({res for _, _, res in blocks})
    name = f"dec.{resolutions[1]}x{resolutions[1]}_block1" if len(resolutions) > 1 else None
    if name not in {b[0] for b in blocks}:
        raise UserError("this network has no second-lowest-resolution decoder block1; set probe.block (see --list-blocks)")
    return name


def sigma_of_t(cfg, t):
    """Noise level at index t of the reversed sampling schedule [0, sigma_min, ..., sigma_max] (DDAE's t = 4: 0.0599)."""
    s = cfg["sample"]
    schedule = edm_sigmas(s["steps"], s["sigma_min"], s["sigma_max"], s["rho"]).flip(0).tolist()
    if not 1 <= t < len(schedule):
        raise UserError(f"--t must be between 1 and {len(schedule) - 1} (index 0 is sigma = 0, the clean image)")
    return schedule[t]


class _StopForward(Exception):
    """Raised by the hook of the last block needed: the rest of the network does not run."""


@torch.no_grad()
def extract_features(net, sigma_data, images, sigma, blocks, stream, batch, flip=False, precision="fp32"):
    """{block: float32 [N, C]} pooled activations of uint8 [N, C, H, W] images on the net's device + sigma * noise, on every rank."""
    device = next(net.parameters()).device
    mine = torch.arange(dist.rank(), len(images), dist.world_size())
    modules = dict(named_blocks(net))
    last = max(blocks, key=list(modules).index)
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
    try:
        for start in range(0, len(mine), batch):
            idx = mine[start:start + batch]
            x = to_float(images[idx.to(images.device)])
            noise = image_normals((PROBE, stream), idx.tolist(), x.shape[1:], device)
            if flip:
                x = x.flip(3)
            labels = torch.zeros(len(idx), label_dim, device=device) if label_dim else None  # unconditional
            with autocast(device, precision):
                try:
                    denoiser(x + sigma * noise, sigma, class_labels=labels)
                except _StopForward:
                    pass
            for b in blocks:
                out[b][start:start + len(idx)] = pooled[b]
    finally:
        for h in handles:
            h.remove()
    return {b: gather_strided(f, len(images)).cpu() for b, f in out.items()}


def gather_strided(x, n):
    """[n, ...] on every rank from rows held rank-strided (rank r has rows r, r + world, ...)."""
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


class Checkpoint:
    """The checkpoint a probe reads: epoch, path, and the file identity that keys the cache."""

    def __init__(self, outdir, epoch=None):
        available, folder = dict(list_checkpoints(outdir)), os.path.join(outdir, "checkpoints")
        if not available:
            raise UserError(f"no checkpoint in {folder}; train first or pass --outdir")
        self.outdir, self.epoch = outdir, max(available) if epoch is None else epoch
        if self.epoch not in available:
            raise UserError(f"no checkpoint for epoch {epoch} in {folder} (available: {', '.join(map(str, sorted(available)))})")
        st = os.stat(available[self.epoch])
        self.identity = dict(checkpoint=os.path.basename(available[self.epoch]), size=st.st_size, mtime_ns=st.st_mtime_ns)


def cache_file(ckpt, p, block, sigma, split, flip, num_images):
    """(path, meta): meta says what it was made from (p: the probe section); any difference re-extracts."""
    path = os.path.join(ckpt.outdir, "probe", "features", f"epoch_{ckpt.epoch}", p["ema"], block, f"sigma={sigma:.6g}",
                        f"{split}{'_flip' if flip else ''}.pt")
    return path, dict(version=CACHE_VERSION, **ckpt.identity, ema=p["ema"], precision=p["precision"], block=block,
                      sigma=float(sigma), split=split, flip=flip, num_images=num_images, stream=STREAMS[split, flip])


def read_cached(path, meta):
    """(features, t_img) from a cache file that matches `meta` and its checksum manifest, else None."""
    try:
        verify(path)
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, partial, altered (checksum mismatch) or foreign file: extract again
        return None
    return (saved["features"], saved["t_img"]) if isinstance(saved, dict) and saved.get("meta") == meta else None


def ensure_features(cfg, ckpt, blocks, sigmas, streams, device, images):
    """t_img; extracts and caches every (block, sigma, stream) whose cache is missing or stale (collective)."""
    p = cfg["probe"]
    ema, missing, t_img = p["ema"], {}, None
    if dist.rank() == 0:
        for sigma in sigmas:
            for split, flip in streams:
                for b in blocks:
                    cached = read_cached(*cache_file(ckpt, p, b, sigma, split, flip, len(images[split])))
                    if cached is None:
                        missing.setdefault((sigma, split, flip), []).append(b)
                    else:
                        t_img = cached[1]
    missing = dist.broadcast(missing)
    if not missing:
        dist.print0(f"features: cached ({os.path.join(ckpt.outdir, 'probe', 'features', f'epoch_{ckpt.epoch}', ema)})", file=sys.stderr)
        return t_img
    net, info = load_net(cfg, ckpt.outdir, ckpt.epoch, ema, device)
    on_device = {}
    for (sigma, split, flip), todo in missing.items():
        if split not in on_device:
            on_device[split] = images[split].to(device)
        start = time.time()
        feats = extract_features(net, cfg["diffusion"]["sigma_data"], on_device[split], sigma, todo, STREAMS[split, flip],
                                 p["batch"], flip, p["precision"])
        dist.print0(f"features: {len(todo)} block(s) at sigma={sigma:.4g}, {split}{' x-flipped' if flip else ''}, "
                    f"{len(images[split])} images on {dist.world_size()} rank(s): {time.time() - start:.1f} s", file=sys.stderr)
        if dist.rank() == 0:
            for b in todo:
                path, meta = cache_file(ckpt, p, b, sigma, split, flip, len(images[split]))
                atomic_save(dict(features=feats[b].contiguous(), meta=meta, t_img=info["t_img"]), path)
    return info["t_img"]

