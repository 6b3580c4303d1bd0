"""Every file a run writes, atomically; torch files with a sha256 manifest checked on load (docs/DESIGN.md)."""

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys

import torch

from tools.cli import UserError

DISK_FULL_FREE_BYTES = 1 << 20  # torch failing with less free: a full disk
TEMP_NAME = re.compile(r".+\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)")  # what temp_path makes


def manifest_path(path):
    return os.fspath(path) + ".sha256"


def host_name():
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "unknown"


def temp_path(path):
    """<path>.tmp-<host>-<pid>: remove_stale_temp can tell whether its writer lives."""
    return f"{os.fspath(path)}.tmp-{host_name()}-{os.getpid()}"


class _HashingWriter:
    """Writes to `file` and hashes; no seek, tell or fileno, so torch.save and PIL stream through it."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data):
        view = memoryview(data).cast("B")
        n = self.file.write(view)
        self.sha256.update(view if n is None or n >= len(view) else view[:n])
        return n

    def flush(self):
        self.file.flush()


def _remove_quietly(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def write_error(path, error):
    """A one-line UserError for a failed write of `path`, None if not the user's to fix."""
    if isinstance(error, UserError):
        return None
    os_errors, seen, e = [], set(), error
    while e is not None and id(e) not in seen:  # the cause chain
        seen.add(id(e))
        os_errors += [e] if isinstance(e, OSError) else []
        e = e.__cause__ or e.__context__
    full = any(e.errno in (errno.ENOSPC, errno.EDQUOT) for e in os_errors)
    if not full and isinstance(error, RuntimeError) and "inline_container" in str(error):
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(os.path.dirname(path) or ".").free < DISK_FULL_FREE_BYTES
    if full:
        return UserError(f"disk full while writing {path}; earlier files are intact, free space and run again")
    if os_errors:
        return UserError(f"could not write {path}: {os_errors[0].strerror or os_errors[0]}")
    return None


def _raise_write_error(path, error, cleanup):
    user_error = write_error(path, error) if isinstance(error, Exception) else None  # before cleanup frees space
    with contextlib.suppress(OSError):
        cleanup()
    if user_error is None:
        raise error
    raise user_error from None


def atomic_write(path, write, manifest=False):
    """write(f) to a fsynced temp file renamed over `path` (a crash keeps the old file); manifest: <path>.sha256 after."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            stream = _HashingWriter(f) if manifest else f
            write(stream)
            f.flush()
            os.fsync(f.fileno())
        _remove_quietly(manifest_path(path))  # a manifest must not outlive its file
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too
        _raise_write_error(path, e, lambda: _remove_quietly(tmp))
    if manifest:
        line = f"{stream.sha256.hexdigest()}  {os.path.basename(path)}\n"
        atomic_write(manifest_path(path), lambda f: f.write(line.encode()))


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f), manifest=True)


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def read_json(path):
    """A write_json file, or {} if missing or unreadable (its entries are computed again)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def append_text(path, text):
    """Append `text`, fsynced; a failed append cuts the file back (no half line)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    size = None
    try:
        with open(path, "ab") as f:
            size = os.fstat(f.fileno()).st_size
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # cut back once closed: closing flushes
        _raise_write_error(path, e, lambda: size is not None and os.truncate(path, size))


def read_jsonl(path):
    """The rows of a JSON-lines file ([] without one), less a line cut short by a kill."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def remove(path):
    """The file, then its manifest: a crash in between leaves a manifest that fails, never passes."""
    _remove_quietly(path)
    _remove_quietly(manifest_path(path))


def pid_alive(pid):
    """Whether process `pid` exists on this host; a pid this system cannot have counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        pass
    return True


def remove_stale_temp(folder):
    host, removed = host_name(), []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            m, path = TEMP_NAME.fullmatch(name), os.path.join(dirpath, name)
            if m is None or m["host"] != host or pid_alive(int(m["pid"])) or os.path.islink(path):
                continue
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                os.remove(path)
                removed.append(path)
    return sorted(removed)


def verify(path, what="file", advice="delete it and run again"):
    """UserError when `path` differs from its manifest, if it has one."""
    path = os.fspath(path)
    try:
        with open(manifest_path(path), "rb") as f:
            recorded = f.read(4096).split()
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"{what} {path}: its checksum manifest is unreadable ({e.strerror}); {advice}") from None
    try:
        with open(path, "rb") as f:
            sha256 = hashlib.file_digest(f, "sha256")
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except OSError as e:
        raise UserError(f"{what} {path} is unreadable ({e.strerror}); {advice}") from None
    if not recorded or recorded[0].decode(errors="replace").lower() != sha256.hexdigest():
        raise UserError(f"{what} {path}: checksum mismatch with {os.path.basename(manifest_path(path))} "
                        f"(changed on disk after it was written); {advice}")


def load(path):
    advice = "delete it to fall back to an earlier one"
    verify(path, "checkpoint", advice)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); {advice}") from None


def files_named(folder, prefix="", suffix=""):
    """Sorted paths of <prefix>...<suffix> in `folder` (no glob: folder names may hold [*?])."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(folder, n) for n in names if n.startswith(prefix) and n.endswith(suffix) and len(n) >= len(prefix + suffix))


def numbered_files(folder, prefix, suffix):
    """[(N, path)] of the files <prefix><N><suffix> in `folder`, sorted by N."""
    found = ((os.path.basename(p)[len(prefix):-len(suffix) or None], p) for p in files_named(folder, prefix, suffix))
    return sorted((int(n), p) for n, p in found if n.isascii() and n.isdigit())


def checkpoint_path(outdir, epoch):
    return os.path.join(outdir, "checkpoints", f"epoch_{epoch}.pt")


def resume_path(outdir, t_img):
    return os.path.join(outdir, "checkpoints", f"resume_{t_img:012d}.pt")


def list_checkpoints(outdir):
    return numbered_files(os.path.join(outdir, "checkpoints"), "epoch_", ".pt")


def list_resume_checkpoints(outdir):
    return numbered_files(os.path.join(outdir, "checkpoints"), "resume_", ".pt")


def load_newest(outdir, required=("net",), paths=None):
    """The first of `paths` (default: epochs, newest first) that loads with the `required` keys, else None; warns on others."""
    for path in paths if paths is not None else [p for _, p in reversed(list_checkpoints(outdir))]:
        try:
            ckpt = load(path)
        except UserError as e:
            print(f"warning: {e}", file=sys.stderr, flush=True)
            continue
        if isinstance(ckpt, dict) and all(k in ckpt for k in required):
            return ckpt
        print(f"warning: checkpoint {path} lacks {', '.join(required)}; skipped", file=sys.stderr, flush=True)
    return None


def load_epoch(outdir, epoch=None, required=("net",)):
    """The checkpoint of `epoch` (None: the newest valid one); UserError listing those that exist."""
    folder = os.path.join(outdir, "checkpoints")
    if epoch is None:
        if (ckpt := load_newest(outdir, required)) is None:
            raise UserError(f"no usable checkpoint in {folder}; train first or pass --outdir")
        return ckpt
    available = dict(list_checkpoints(outdir))
    if epoch not in available:
        raise UserError(f"no checkpoint for epoch {epoch} in {folder} (available: {', '.join(map(str, sorted(available))) or 'none'})")
    ckpt = load(available[epoch])
    if missing := [k for k in required if k not in ckpt]:
        raise UserError(f"checkpoint {available[epoch]} lacks {', '.join(missing)}")
    return ckpt
