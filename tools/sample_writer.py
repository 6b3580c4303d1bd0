"""Sample PNGs written in the background, resumable without an fsync per file.

    with SampleWriter(out) as w:
        for seed, image in ...:
            w.write(seed, image)   # uint8 [H, W, C], C = 1 or 3; blocks while max_pending images are pending
    done = done_seeds(out, seeds)  # on restart: the seeds not to sample again

Layout: OUT/<seed - seed % 1000:06d>/<seed:06d>.png (image_path), and nothing else inside OUT: scorers
glob *.png recursively. Images are encoded and written plainly (no temp file, no fsync) by a small thread
pool while the caller samples.

What is done is decided by completion records, not by a file's existence. They live beside the sample
folder, in <OUT>.done/, one JSON file per writer (<host>-<pid>-<random>.json, so ranks, hosts and later
resumes never overwrite each other's) holding {"writer": id, "seeds": [[first, last, step], ...]}
(rank-strided seeds make one run each). A writer adds a seed only once its file is closed, and rewrites
its record atomically (tools.checkpoint.atomic_write) every `record_every` images or `record_seconds`
seconds and at close. done_seeds is the union of all records, less the seeds whose file is gone.

A process killed at any moment (SIGKILL) leaves at worst a truncated PNG that no record lists: done_seeds
leaves it out, it is sampled again and its file overwritten. A seed some record already lists (its file
deleted by hand, say) is rewritten atomically instead (temp file, fsync, rename), so that the old record
never vouches for half a file.

Power loss (or a kernel crash) can also lose data the kernel had not written yet. Before each record a
writer calls os.sync(), one pass for the whole batch (about 10 ms for a few MB; it also flushes other
processes' dirty data on the machine), so a record only ever lists files that had reached the disk; the
record itself is fsynced. After a power loss a recorded file is intact unless the storage ignores cache
flushes (some network file systems and VM disks do); unrecorded files may be truncated, empty or garbage
and are sampled again; the newest record may be lost, and with it up to record_every images or
record_seconds of work. A file system without a journal (ext4 without one, as on the development machine)
may need fsck after a power loss, whatever any program does.

Sample folders from before this module (no <OUT>.done/) were written atomically, one fsync per file:
done_seeds counts every PNG there as done. The first writer on such a folder lists them in
<OUT>.done/legacy.json, and <OUT>.done/ appears in one rename with that record inside, so a reader never
sees the folder half converted.
"""

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

from tools import checkpoint
from tools.checkpoint import _host, _write_error, atomic_write
from tools.cli import UserError

RECORDS_SUFFIX = ".done"
LEGACY_RECORD = "legacy.json"


def image_path(out, seed):
    """OUT/<seed - seed % 1000:06d>/<seed:06d>.png: a thousand files per folder."""
    return os.path.join(out, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")


def records_folder(out):
    """<out>.done beside the sample folder: inside it, scorers that glob recursively would meet the records."""
    return os.path.normpath(out) + RECORDS_SUFFIX


def done_seeds(out, seeds=None):
    """The seeds (of `seeds`, default all) whose PNG in `out` is complete: listed in a record and on disk, or,
    in a folder without records (written before this module, every file atomically), simply on disk."""
    folder = records_folder(out)
    if not os.path.isdir(folder):
        on_disk = _seeds_on_disk(out)
        if not os.path.isdir(folder):  # still none: no writer of this module started while the folder was listed
            return _subset(on_disk, seeds)
    return _subset(_read_records(folder) & _seeds_on_disk(out), seeds)


def _subset(found, seeds):
    return found if seeds is None else found.intersection(seeds)


def _seeds_on_disk(out):
    """The seeds whose PNG is at image_path(out, seed), from one listing per thousand-folder (no stat per seed)."""
    found = set()
    try:
        with os.scandir(out) as entries:
            folders = [e for e in entries if e.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return found
    for folder in folders:
        try:
            with os.scandir(folder.path) as entries:
                names = [e.name for e in entries if e.name.endswith(".png") and e.is_file()]
        except FileNotFoundError:  # removed meanwhile
            continue
        for name in names:
            stem = name[:-4]
            if stem.isascii() and stem.isdigit() and image_path("", int(stem)) == os.path.join(folder.name, name):
                found.add(int(stem))
    return found


def _runs(seeds):
    """Sorted unique seeds -> [[first, last, step], ...], greedily; seeds k, k + world, ... make one run."""
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
    """The seeds of one record; a record that does not parse is reported and counts as empty (its seeds
    are sampled again, the safe side)."""
    try:
        with open(path, "rb") as f:
            runs = json.load(f)["seeds"]
        return {s for first, last, step in runs for s in range(int(first), int(last) + 1, int(step))}
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"warning: completion record {path} is unreadable ({type(e).__name__}); its seeds will be sampled again",
              file=sys.stderr, flush=True)
        return set()


def _read_records(folder):
    """The union of the records in `folder` (temp files of records being rewritten are not *.json)."""
    seeds = set()
    try:
        with os.scandir(folder) as entries:
            paths = [e.path for e in entries if e.name.endswith(".json")]
    except FileNotFoundError:
        return seeds
    for path in paths:
        seeds |= _read_record(path)
    return seeds


def _write_record(path, writer, seeds):
    data = json.dumps({"writer": writer, "seeds": _runs(sorted(seeds))}, separators=(",", ":")) + "\n"
    atomic_write(path, lambda f: f.write(data.encode()))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_records(out):
    """Create <out>.done/ if it does not exist yet, with legacy.json listing the PNGs already in `out`.

    The folder is listed before <out>.done/ exists, and writers of this module write PNGs only once it
    exists, so every PNG listed was written atomically by the code before. The folder is staged and renamed
    into place (a rename never replaces a non-empty folder: the first writer wins, the others drop theirs),
    then its entry is fsynced, so that a power loss cannot make the folder look unconverted while plain
    PNGs lie in it."""
    folder = records_folder(out)
    if os.path.isdir(folder):
        return
    legacy = _seeds_on_disk(out)
    staging = f"{folder}.tmp-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    os.makedirs(staging)
    try:
        _write_record(os.path.join(staging, LEGACY_RECORD), "legacy", legacy)
        os.rename(staging, folder)
    except OSError:
        if not os.path.isdir(folder):
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _fsync_dir(os.path.dirname(folder) or ".")


def _as_user_error(error, path):
    """A worker's exception as the caller should see it: OS errors (a full disk, an unwritable folder) as a
    one-line UserError of this rank alone; anything else (a bug) unchanged."""
    if not isinstance(error, UserError):
        error = _write_error(path, error) or error
    if isinstance(error, UserError):
        error.shared = False
    return error


def _encode(image, f, level):
    image.save(f, format="PNG", compress_level=level)


def _write_plain(path, image, level):
    """Encode `image` into `path` without temp file or fsync; a failed write removes its partial file."""
    try:
        with checkpoint._open_for_writing(path) as f:
            _encode(image, f, level)
    except BaseException:
        try:
            os.remove(path)
        except OSError:
            pass
        raise


class SampleWriter:
    """Writes sample PNGs into `out` on `threads` background threads, at most `max_pending` images accepted
    but not yet written (write() blocks meanwhile, so memory stays flat), and keeps this writer's completion
    record in <out>.done/ (see the module's docstring). An error in the pool (a full disk) is raised by the
    next write() or by close(), as a one-line UserError for OS errors. `sync=False` skips the os.sync() before
    each record: kills stay safe, power loss does not. PNG is lossless at every `compress_level` (zlib's 0-9):
    1, the default, encodes faster than Pillow's 6 for files ~5-8% larger on photo-like 32x32 images; 0 is
    faster still but stores the pixels uncompressed (~1.8x the size).

    max_pending should hold two of the caller's batches, or the caller waits for the pool at every batch
    (the default, 1024 images, is 3 MB of 32x32 RGB, 12 MB of 64x64).

    Writers running at the same time must not share a seed (ranks split them): a seed another writer records
    after this one started would be rewritten in place, not atomically."""

    def __init__(self, out, threads=2, max_pending=1024, record_every=1000, record_seconds=10.0, sync=True, compress_level=1):
        if threads < 1 or max_pending < 1 or record_every < 1 or compress_level not in range(10):
            raise ValueError("threads, max_pending and record_every must be >= 1, compress_level in 0..9")
        self.out = os.path.normpath(out)
        self.writer = f"{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.record_path = os.path.join(records_folder(self.out), f"{self.writer}.json")
        self.record_every, self.record_seconds, self.sync = record_every, record_seconds, sync
        self.compress_level = compress_level
        try:
            os.makedirs(self.out, exist_ok=True)
            _open_records(self.out)
        except (OSError, UserError) as e:
            raise _as_user_error(e, records_folder(self.out)) from None
        self._vouched = _read_records(records_folder(self.out))  # seeds some record lists: rewritten atomically
        self._lock, self._record_lock = threading.Lock(), threading.Lock()
        self._slots = threading.Semaphore(max_pending)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sample-writer")
        self._done, self._unrecorded, self._recorded_at = set(), 0, time.monotonic()
        self._pending, self._error, self._closed, self._folders = 0, None, False, set()

    @property
    def pending(self):
        """Images accepted by write() whose files are not written yet."""
        return self._pending

    def write(self, seed, array):
        """Queue the PNG of `seed`: `array` uint8 [H, W, C], C = 1 or 3, copied (the caller may reuse it)."""
        if self._closed:
            raise ValueError("write() on a closed SampleWriter")
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in (1, 3):
            raise ValueError(f"an image must be uint8 [H, W, 1 or 3], got {array.dtype} {list(array.shape)}")
        if int(seed) < 0:
            raise ValueError(f"seeds are non-negative, got {seed}")
        self._raise_error()
        array = np.array(array[:, :, 0] if array.shape[2] == 1 else array, order="C")
        self._slots.acquire()
        with self._lock:
            self._pending += 1
        self._pool.submit(self._save, int(seed), array)

    def close(self, check=True):
        """Wait for the pending images, write the final record, then raise the pool's first error (if `check`)."""
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
            if self._error is None:
                self._error = _as_user_error(error, path)

    def _save(self, seed, array):
        path = image_path(self.out, seed)
        try:
            image, folder = Image.fromarray(array), os.path.dirname(path)
            if folder not in self._folders:
                os.makedirs(folder, exist_ok=True)
                self._folders.add(folder)
            if seed in self._vouched:
                atomic_write(path, lambda f: _encode(image, f, self.compress_level))
            else:
                _write_plain(path, image, self.compress_level)
            with self._lock:
                self._done.add(seed)
                self._unrecorded += 1
        except Exception as e:
            self._fail(e, path)
        finally:
            with self._lock:
                self._pending -= 1
            self._slots.release()
        self._record_if_due()

    def _record_if_due(self):
        """Rewrite the record after record_every images or record_seconds; one record at a time, and a worker
        never waits for another's record (the next due check catches up)."""
        due = self._unrecorded >= self.record_every or time.monotonic() - self._recorded_at >= self.record_seconds
        if due and self._unrecorded and self._record_lock.acquire(blocking=False):
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
