"""A trained run as the scripts that read it see it: config, directory, network with the chosen EMA weights; the training lock."""

import contextlib
import fcntl
import os
import socket
import sys
import time

from tools import dist
from tools.checkpoint import load, load_epoch, pid_alive
from tools.cli import UserError
from tools.config import build_network, load_config
from tools.log import to_run_log
from tools.posthoc import write_reconstruction


def resolve(config=None, outdir=None, overrides=()):
    """(cfg, outdir): OUTDIR/config.yaml, or `config` (and its train.outdir without `outdir`), with overrides."""
    if config is None:
        if outdir is None:
            raise UserError("pass --outdir RUN (its config.yaml is read) or --config FILE")
        config = os.path.join(outdir, "config.yaml")
        if not os.path.isfile(config):
            raise UserError(f"{outdir} has no config.yaml: not a run directory (train.py writes one), or pass --config FILE")
    cfg = load_config(config, overrides)
    return cfg, outdir or cfg["train"]["outdir"]


def run_flags(parser):
    parser.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    parser.add_argument("--config", help="a YAML config instead of the run's own (default: OUTDIR/config.yaml)")
    parser.add_argument("--epoch", type=int, help="checkpoint epoch (default: the newest)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. sample.batch=512 sample.steps=32")


def open_run(args):
    if args.epoch is not None and args.epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {args.epoch}")
    return resolve(args.config, args.outdir, args.overrides)


@contextlib.contextmanager
def run_session(outdir):
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        yield rank, world, device


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
    """(net in eval mode, info) with the classic, online or post-hoc EMA weights (built by rank 0: collective)."""
    kind, sigma_rel = parse_ema(ema)
    ckpt = load_epoch(outdir, epoch, required=("net", "emas", "t_img", "epoch"))
    if kind == "posthoc":
        state = load(dist.on_rank0(write_reconstruction, outdir, sigma_rel, ckpt["t_img"]))["net"]
    else:
        state = ckpt["emas"]["classic"] if kind == "classic" else ckpt["net"]
    net = build_network(cfg)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise UserError(f"the weights in {outdir} do not fit the network of this config ({cfg['unet']}); pass the run's own config") from None
    return net.to(device).eval().requires_grad_(False), dict(epoch=ckpt["epoch"], t_img=ckpt["t_img"], ema=ema)


_held_locks = {}  # path -> open file; the lock lasts as long as the process


def lock_for_training(outdir):
    """An exclusive lock on OUTDIR/train.lock naming its holder; UserError if another live process holds it."""
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
