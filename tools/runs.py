"""A trained run as the scripts that read it see it: its config and directory, and its network with
the chosen weights (classic EMA, online weights, or a post-hoc EMA reconstruction).

    cfg, outdir = resolve(config=None, outdir="runs/cifar10-E")        # reads runs/cifar10-E/config.yaml
    net, info = load_net(cfg, outdir, epoch=None, ema="sigma_rel=0.075")
"""

import fcntl
import os
import socket
import sys
import time

from tools import dist
from tools.checkpoint import load, load_epoch, pid_alive
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


_held_locks = {}  # path -> open file; the lock lasts as long as the process


def lock_for_training(outdir):
    """Make this process the only one training into OUTDIR: an exclusive lock on OUTDIR/train.lock, which
    names its holder (host, pid, start time, command). The operating system drops the lock when the holder
    dies, so a lock left by a killed run is taken over; where the filesystem has no locks (some NFS
    mounts), a holder on this host that no longer runs counts as stale. Raises UserError if another
    live process holds it."""
    path = os.path.join(outdir, "train.lock")
    if path in _held_locks:
        return path
    os.makedirs(outdir, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise UserError(f"{outdir} is being trained by {holder}; two writers would mix their checkpoints and logs: "
                        f"wait for it to end, stop it, or use another --outdir") from None
    except OSError:  # no advisory locks on this filesystem: judge the recorded holder instead
        f.seek(0)
        words = f.read().split()
        host, pid = (words[1], words[3]) if len(words) > 3 and words[0] == "host" else (None, None)
        if host and host != socket.gethostname():
            f.close()
            raise UserError(f"{outdir} has a lock of host {host} (pid {pid}), which cannot be checked from here; "
                            f"if that run has ended, delete {path}")
        if host and pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            f.close()
            raise UserError(f"{outdir} is being trained by pid {pid} on this host; wait for it to end, stop it, or use another --outdir")
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join([os.path.basename(sys.executable), *sys.argv])}\n")
    f.flush()
    _held_locks[path] = f
    return path
