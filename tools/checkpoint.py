"""Checkpoints: written atomically, loaded with weights_only=True, corrupt files skipped with a warning."""

import errno
import glob
import os
import re
import sys

import torch

from tools.cli import UserError


def atomic_write(path, write):
    """Call write(f) on a binary file in the same folder, fsync, then rename it over `path`.

    A crash or a full disk leaves the previous file intact; the partial file is removed.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {path}; earlier files are intact, free space and run again") from None
        raise UserError(f"could not write {path}: {e.strerror}") from None


def atomic_save(obj, path):
    """torch.save through atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load(path):
    """torch.load without executing code; a corrupt or truncated file raises UserError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found") from None
    except Exception as e:  # truncated zip, pickle error, unexpected types: all mean "not a usable checkpoint"
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to fall back to an earlier one") from None


def checkpoint_path(outdir, epoch):
    return os.path.join(outdir, "checkpoints", f"epoch_{epoch}.pt")


def list_checkpoints(outdir):
    """[(epoch, path)] sorted by epoch."""
    found = []
    for p in glob.glob(os.path.join(outdir, "checkpoints", "epoch_*.pt")):
        m = re.fullmatch(r"epoch_(\d+)\.pt", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_newest(outdir, required=("net",)):
    """The newest checkpoint that loads and has the required keys, or None; corrupt ones are reported and skipped."""
    for epoch, path in reversed(list_checkpoints(outdir)):
        try:
            ckpt = load(path)
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr)
            continue
        if isinstance(ckpt, dict) and all(k in ckpt for k in required):
            return ckpt
        print(f"warning: checkpoint {path} lacks {', '.join(required)}; skipped", file=sys.stderr)
    return None


def load_epoch(outdir, epoch=None, required=("net",)):
    """Checkpoint of a given epoch (None = newest valid); UserError with what exists when it is missing."""
    if epoch is None:
        ckpt = load_newest(outdir, required)
        if ckpt is None:
            raise UserError(f"no usable checkpoint in {os.path.join(outdir, 'checkpoints')}; train first or pass --outdir")
        return ckpt
    available = dict(list_checkpoints(outdir))
    if epoch not in available:
        have = ", ".join(str(e) for e in sorted(available)) or "none"
        raise UserError(f"no checkpoint for epoch {epoch} in {os.path.join(outdir, 'checkpoints')} (available: {have})")
    ckpt = load(available[epoch])
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {available[epoch]} lacks {', '.join(missing)}")
    return ckpt
