"""A trained run as the scripts that read it see it: its config and directory, and its network with
the chosen weights (classic EMA, online weights, or a post-hoc EMA reconstruction).

    cfg, outdir = resolve(config=None, outdir="runs/cifar10-E")        # reads runs/cifar10-E/config.yaml
    net, info = load_net(cfg, outdir, epoch=None, ema="sigma_rel=0.075")
"""

import os

from tools import dist
from tools.checkpoint import load, load_epoch
from tools.cli import UserError
from tools.config import build_network, load_config
from tools.posthoc import write_reconstruction


def resolve(config=None, outdir=None, overrides=()):
    """(cfg, outdir) of a run: --outdir RUN alone reads RUN/config.yaml (the config it was trained with);
    --config FILE replaces it (with its train.outdir when --outdir is absent); overrides apply to either."""
    if config is None:
        if outdir is None:
            raise UserError("pass --outdir RUN (its config.yaml is read) or --config FILE")
        config = os.path.join(outdir, "config.yaml")
        if not os.path.isfile(config):
            raise UserError(f"{outdir} has no config.yaml: not a run directory (train.py writes one), or pass --config FILE")
    cfg = load_config(config, overrides)
    return cfg, outdir or cfg["train"]["outdir"]


def parse_ema(ema):
    """'classic' | 'online' | 'sigma_rel=X' -> ('classic'|'online'|'posthoc', X or None)."""
    if ema in ("classic", "online"):
        return ema, None
    if ema.startswith("sigma_rel="):
        try:
            return "posthoc", float(ema.split("=", 1)[1])
        except ValueError:
            pass
    raise UserError(f"--ema must be classic, online or sigma_rel=X (e.g. sigma_rel=0.075), got {ema!r}")


def load_net(cfg, outdir, epoch=None, ema="classic", device="cpu"):
    """The network of a run in eval mode, with the chosen weights: the classic EMA, the online (raw)
    weights, or a post-hoc EMA reconstruction at the checkpoint's time. Returns (net, info dict).

    A post-hoc EMA is built once, by rank 0, into OUTDIR/posthoc/ (tools.posthoc.write_reconstruction,
    rebuilt only when a snapshot it used changed); the other ranks wait and read that file, so a call
    under torchrun is collective."""
    kind, sigma_rel = parse_ema(ema)
    ckpt = load_epoch(outdir, epoch, required=("net", "emas", "t_img", "epoch"))
    if kind == "classic":
        state = ckpt["emas"]["classic"]
    elif kind == "online":
        state = ckpt["net"]
    else:
        path = dist.on_rank0(write_reconstruction, outdir, sigma_rel, ckpt["t_img"])
        state = load(path)["net"]
    net = build_network(cfg)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"the weights in {outdir} do not fit the network of this config ({cfg['unet']}); pass the run's own config") from None
    info = dict(epoch=ckpt["epoch"], t_img=ckpt["t_img"], ema=ema)
    return net.to(device).eval().requires_grad_(False), info
