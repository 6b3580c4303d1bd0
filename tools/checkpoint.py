"""Checkpoints and every other file a run writes: written atomically, torch files with a checksum manifest,
loaded with weights_only=True, corrupt files skipped with a warning.

A file written by atomic_save gets a manifest beside it, <file>.sha256 (sha256sum's format, so
`sha256sum -c epoch_10.pt.sha256` checks it by hand), holding the digest of the bytes as they were
written. load() and verify() compare the file with it: torch.load does not check the zip's CRCs, so
without this one flipped byte on disk loads and trains on. Files without a manifest (older runs) load
unverified.
"""

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

MANIFEST_SUFFIX = ".sha256"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_FREE_BYTES = 1 << 20  # a torch write error with less than this free counts as a full disk
HASH_CHUNK_BYTES = 1 << 20


def manifest_path(path):
    return os.fspath(path) + MANIFEST_SUFFIX


def _host():
    """This machine's name as it appears in temp file names (no path separators, no odd characters)."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "unknown"


def temp_path(path):
    """<path>.tmp-<host>-<pid>: remove_stale_temp can tell whether its writer is still alive."""
    return f"{os.fspath(path)}.tmp-{_host()}-{os.getpid()}"


TEMP_NAME = re.compile(r".+\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)")  # what temp_path makes


def _open_for_writing(path, mode="wb"):
    """The one place files are opened for writing, so that tests can put a full disk here."""
    return open(path, mode)


class _HashingWriter:
    """A write-only stream that passes bytes on to `file` and hashes exactly the bytes written.

    It has no seek, tell or fileno, so writers (torch.save, PIL) stream through write() and
    never write behind its back or rewrite earlier bytes."""

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
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _disk_full(error, folder):
    """True when `error` comes from a full disk: an OSError ENOSPC/EDQUOT anywhere in its chain (torch's
    zip writer turns the OSError of a failed write into a RuntimeError 'unexpected pos', with the OSError
    as its context), or torch's writer failing while the file system has (next to) no space left."""
    e, seen = error, set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    if isinstance(error, RuntimeError) and "inline_container" in str(error):
        try:
            return shutil.disk_usage(folder).free < DISK_FULL_FREE_BYTES
        except OSError:
            return False
    return False


def _os_error(error):
    """The OSError in `error`'s chain, if any (torch wraps it into a RuntimeError)."""
    e, seen = error, set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_error(path, error):
    """A UserError for a write of `path` that failed with `error`, or None if it is not the user's to fix."""
    if isinstance(error, UserError):
        return None
    if _disk_full(error, os.path.dirname(path) or "."):
        return UserError(f"disk full while writing {path}; earlier files are intact, free space and run again")
    os_error = _os_error(error)
    if os_error is not None:
        return UserError(f"could not write {path}: {os_error.strerror or os_error}")
    return None


def atomic_write(path, write, manifest=False):
    """Call write(f) on a binary file in the same folder, fsync, then rename it over `path`.

    A crash or a full disk leaves the previous file intact; the partial file is removed on any
    exception. A full disk (OSError ENOSPC/EDQUOT, or torch's RuntimeError from a failed write) and
    other OS errors end in a one-line UserError naming `path`; other exceptions propagate unchanged.

    manifest=True also writes <path>.sha256 with the digest of the bytes written (hashed on the way,
    not read back). The order keeps a manifest from ever vouching for the wrong bytes:
      1. the new content goes to a temp file and is fsynced;
      2. the old manifest is removed; a crash now leaves the old file without manifest: it loads
         unverified, as a file from before manifests would;
      3. the temp file replaces `path`; a crash now leaves the new, complete file without manifest
         (unverified again, never checked against the old file's digest);
      4. the new manifest is written, itself atomically.
    A stale manifest (its file replaced by other means) therefore fails verification instead of passing.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = temp_path(path)
    stream = None
    try:
        with _open_for_writing(tmp) as f:
            stream = _HashingWriter(f) if manifest else f
            write(stream)
            f.flush()
            os.fsync(f.fileno())
        _remove_quietly(manifest_path(path))  # also without manifest=True: a manifest must not outlive its file
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt and SystemExit too: never leave a partial temp file
        user_error = _write_error(path, e) if isinstance(e, Exception) else None  # before the temp file frees space
        try:
            _remove_quietly(tmp)
        except OSError:
            pass
        if user_error is None:
            raise
        raise user_error from None
    if manifest:
        line = f"{stream.sha256.hexdigest()}  {os.path.basename(path)}\n"
        atomic_write(manifest_path(path), lambda f: f.write(line.encode()))


def atomic_save(obj, path):
    """torch.save through atomic_write, with a checksum manifest (<path>.sha256) that load() verifies."""
    atomic_write(path, lambda f: torch.save(obj, f), manifest=True)


def write_json(path, obj):
    """`obj` as indented JSON at `path`, written atomically (a full disk ends in one line, the old file intact)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def append_text(path, text):
    """Append `text` (e.g. one JSON line of metrics.jsonl) to `path`, fsynced. A failed append leaves the
    file as it was (cut back to its old length, so no half line is left for the next one to join) and
    ends in a one-line UserError; a full disk in the same line as atomic_write's."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data, size = text.encode(), None
    try:
        with _open_for_writing(path, "ab") as f:
            size = os.fstat(f.fileno()).st_size
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if size is not None:  # cut back only once the file is closed: closing flushes what was still buffered
            try:
                os.truncate(path, size)
            except OSError:
                pass
        user_error = _write_error(path, e) if isinstance(e, Exception) else None
        if user_error is None:
            raise
        raise user_error from None


def read_jsonl(path):
    """The rows of a JSON-lines file such as metrics.jsonl ([] if there is none); a line cut short by a killed
    writer is skipped."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def remove(path):
    """Delete a file written here and its manifest (pruning old checkpoints). The file goes first: a crash
    in between leaves a manifest without its file, which fails (never passes) a file later put there by
    other means. A missing file or manifest is not an error."""
    _remove_quietly(path)
    _remove_quietly(manifest_path(path))


def pid_alive(pid):
    """Whether a process of this pid exists on this host (a pid that cannot exist here counts as alive: not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):  # not a pid this system could have: not ours to judge, keep the file
        return True
    return True


def remove_stale_temp(folder):
    """Remove, recursively under `folder`, the temp files of atomic_write whose writer is dead: written on
    this host (by name) by a process that no longer exists. Temp files of other hosts (a shared file
    system) and of live processes are kept; so are old-style `.tmp<pid>` names, whose host is unknown.
    A reused pid keeps a dead writer's file (the safe side). Returns the paths removed, sorted.

    Hosts are told apart by name: two containers that share a host name but not a pid namespace must not
    clean each other's folders."""
    host, removed = _host(), []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            m = TEMP_NAME.fullmatch(name)
            path = os.path.join(dirpath, name)
            if m is None or m["host"] != host or pid_alive(int(m["pid"])) or os.path.islink(path):
                continue
            try:
                os.remove(path)
                removed.append(path)
            except OSError:  # gone meanwhile, or not ours to remove
                pass
    return sorted(removed)


def verify(path, what="file", advice="delete it and run again"):
    """Compare `path` with its manifest <path>.sha256, if it has one (files without one pass: written before
    manifests). UserError '<what> <path>: checksum mismatch ...; <advice>' when they differ."""
    path = os.fspath(path)
    try:
        with open(manifest_path(path), "rb") as f:
            recorded = f.read(4096).split()
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"{what} {path}: its checksum manifest is unreadable ({e.strerror}); {advice}") from None
    sha256 = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                sha256.update(chunk)
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except OSError as e:
        raise UserError(f"{what} {path} is unreadable ({e.strerror}); {advice}") from None
    if not recorded or recorded[0].decode(errors="replace").lower() != sha256.hexdigest():
        raise UserError(f"{what} {path}: checksum mismatch with {os.path.basename(manifest_path(path))} "
                        f"(changed on disk after it was written); {advice}")


def load(path):
    """torch.load without executing code, after verify(); a corrupt, truncated or altered file raises
    UserError naming it."""
    advice = "delete it to fall back to an earlier one"
    verify(path, "checkpoint", advice)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found") from None
    except Exception as e:  # truncated zip, pickle error, unexpected types: all mean "not a usable checkpoint"
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); {advice}") from None


def files_named(folder, prefix="", suffix=""):
    """Sorted paths of the files in `folder` whose names start with `prefix` and end with `suffix` ([] if there is no
    folder). A plain listing, not a glob: run directories whose names hold glob characters ([, *, ?) work alike."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.join(folder, n) for n in names
                  if n.startswith(prefix) and n.endswith(suffix) and len(n) >= len(prefix) + len(suffix))


def numbered_files(folder, prefix, suffix):
    """[(N, path)] of the files `<prefix><N><suffix>` in `folder` (N a non-negative integer), sorted by N."""
    found = []
    for path in files_named(folder, prefix, suffix):
        number = os.path.basename(path)[len(prefix):len(os.path.basename(path)) - len(suffix)]
        if number.isascii() and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def checkpoint_path(outdir, epoch):
    return os.path.join(outdir, "checkpoints", f"epoch_{epoch}.pt")


def resume_path(outdir, t_img):
    return os.path.join(outdir, "checkpoints", f"resume_{t_img:012d}.pt")


def list_checkpoints(outdir):
    """[(epoch, path)] of the per-epoch checkpoints, oldest first."""
    return numbered_files(os.path.join(outdir, "checkpoints"), "epoch_", ".pt")


def list_resume_checkpoints(outdir):
    """[(t_img, path)] of the mid-epoch checkpoints, oldest first."""
    return numbered_files(os.path.join(outdir, "checkpoints"), "resume_", ".pt")


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
