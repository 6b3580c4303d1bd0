"""Sample PNGs written by a background thread pool, resumable by done_seeds() without an fsync per file (docs/DESIGN.md)."""

import contextlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from tools.checkpoint import atomic_write, host_name, write_error
from tools.cli import UserError

LEGACY_RECORD = "legacy.json"  # the PNGs of a folder that had no records when its first writer with records opened it


def image_path(out, seed):
    return os.path.join(out, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")


def records_folder(out):
    """<out>.done, beside the samples: scorers glob `out` recursively."""
    return os.path.normpath(out) + ".done"


def done_seeds(out, seeds=None):
    """The seeds (of `seeds`, default all) on disk that a completion record lists; without records (atomic PNGs), all on disk."""
    folder = records_folder(out)
    found = None if os.path.isdir(folder) else _seeds_on_disk(out)
    if found is None or os.path.isdir(folder):  # records, or a writer made them while `out` was listed
        found = _read_records(folder) & _seeds_on_disk(out)
    return found if seeds is None else found.intersection(seeds)


def _entries(folder):
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _seeds_on_disk(out):
    found = set()
    for folder in (e for e in _entries(out) if e.is_dir()):
        for e in _entries(folder.path):
            stem = e.name[:-4]
            if (e.name.endswith(".png") and stem.isascii() and stem.isdigit() and e.is_file()
                    and image_path("", int(stem)) == os.path.join(folder.name, e.name)):
                found.add(int(stem))
    return found


def _runs(seeds):
    """Sorted unique seeds -> [[first, last, step], ...]; rank-strided seeds k, k + world, ... make one run."""
    runs = []
    for s in seeds:
        if runs and runs[-1][0] == runs[-1][1]:  # a run of one seed takes any step
            runs[-1][1:] = [s, s - runs[-1][0]]
        elif runs and s - runs[-1][1] == runs[-1][2]:
            runs[-1][1] = s
        else:
            runs.append([s, s, 1])
    return runs


def _read_record(path):
    """The seeds of one record; one that does not parse counts as empty (its seeds are sampled again)."""
    try:
        with open(path, "rb") as f:
            return {s for first, last, step in json.load(f)["seeds"] for s in range(int(first), int(last) + 1, int(step))}
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"warning: completion record {path} is unreadable ({type(e).__name__}); its seeds are sampled again", file=sys.stderr)
        return set()


def _read_records(folder):
    return set().union(*(_read_record(e.path) for e in _entries(folder) if e.name.endswith(".json")))


def _write_record(path, writer, seeds):
    data = json.dumps({"writer": writer, "seeds": _runs(sorted(seeds))}, separators=(",", ":")) + "\n"
    atomic_write(path, lambda f: f.write(data.encode()))


def _open_records(out):
    """Create <out>.done/ with legacy.json listing `out`'s PNGs, staged, renamed (first wins), parent fsynced: power-loss safe."""
    folder = records_folder(out)
    if os.path.isdir(folder):
        return
    staging = f"{folder}.tmp-{host_name()}-{os.getpid()}-{secrets.token_hex(4)}"
    os.makedirs(staging)
    try:
        _write_record(os.path.join(staging, LEGACY_RECORD), "legacy", _seeds_on_disk(out))
        os.rename(staging, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fd = os.open(os.path.dirname(folder) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_user_error(error, path):
    """OS errors (a full disk) as a one-line UserError of this rank alone; a bug unchanged."""
    if not isinstance(error, UserError):
        error = write_error(path, error) or error
    if isinstance(error, UserError):
        error.shared = False
    return error


def _write_plain(path, image, level):
    """No temp file, no fsync; a failed write removes its partial file."""
    try:
        with open(path, "wb") as f:
            image.save(f, format="PNG", compress_level=level)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise


class SampleWriter:
    """PNGs and this writer's completion record; errors raise in the next write() or close(). sync=False: safe on kill, not power loss."""

    def __init__(self, out, threads=2, max_pending=1024, record_every=1000, record_seconds=10.0, sync=True, compress_level=1):
        self.out = os.path.normpath(out)
        self.writer = f"{host_name()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.record_path = os.path.join(records_folder(self.out), f"{self.writer}.json")
        self.record_every, self.record_seconds, self.sync, self.compress_level = record_every, record_seconds, sync, compress_level
        try:
            os.makedirs(self.out, exist_ok=True)
            _open_records(self.out)
        except OSError as e:
            raise _as_user_error(e, records_folder(self.out)) from None
        self._vouched = _read_records(records_folder(self.out))  # seeds some record lists: rewritten atomically
        self._lock, self._record_lock = threading.Lock(), threading.Lock()
        self._slots, self._pool = threading.Semaphore(max_pending), ThreadPoolExecutor(threads, thread_name_prefix="sample-writer")
        self._done, self._unrecorded, self._recorded_at = set(), 0, time.monotonic()
        self.pending, self._error, self._closed, self._folders = 0, None, False, set()

    def write(self, seed, array):
        """Queue the PNG of `seed`: `array` uint8 [H, W, 1 or 3], copied (the caller may reuse it)."""
        array = np.asarray(array)
        if self._closed or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3) or seed < 0:
            raise ValueError(f"write({seed}, {array.dtype} {list(array.shape)}): needs an open writer, a seed >= 0 and uint8 [H, W, 1 or 3]")
        self._raise_error()
        array = np.array(array[:, :, 0] if array.shape[2] == 1 else array, order="C")
        self._slots.acquire()
        with self._lock:
            self.pending += 1
        self._pool.submit(self._save, int(seed), array)

    def close(self, check=True):
        """Wait for the pending images, write the final record, raise the pool's first error (if `check`)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
            with self._record_lock:
                self._record()
        if check:
            self._raise_error()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close(check=kind is None)  # an exception from the body is not masked by a write error

    def _raise_error(self):
        if self._error is not None:
            raise self._error

    def _fail(self, error, path):
        with self._lock:
            self._error = self._error or _as_user_error(error, path)

    def _save(self, seed, array):
        path = image_path(self.out, seed)
        try:
            image, folder = Image.fromarray(array), os.path.dirname(path)
            if folder not in self._folders:
                os.makedirs(folder, exist_ok=True)
                self._folders.add(folder)
            if seed in self._vouched:  # a record vouches for this seed: never leave it half written
                atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=self.compress_level))
            else:
                _write_plain(path, image, self.compress_level)
            with self._lock:
                self._done.add(seed)
                self._unrecorded += 1
        except Exception as e:
            self._fail(e, path)
        finally:
            with self._lock:
                self.pending -= 1
            self._slots.release()
        due = self._unrecorded >= self.record_every or time.monotonic() - self._recorded_at >= self.record_seconds
        if due and self._unrecorded and self._record_lock.acquire(blocking=False):  # no worker waits for another's record
            try:
                self._record()
            finally:
                self._record_lock.release()

    def _record(self):
        """Sync the files closed so far, then list them in this writer's record (atomically)."""
        with self._lock:
            seeds, fresh = set(self._done), self._unrecorded
            self._recorded_at = time.monotonic()
        if not fresh:
            return
        try:
            if self.sync:
                os.sync()
            _write_record(self.record_path, self.writer, seeds)
        except Exception as e:
            self._fail(e, self.record_path)
            return
        with self._lock:
            self._unrecorded -= fresh
