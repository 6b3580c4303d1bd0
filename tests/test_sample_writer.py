"""tools/sample_writer.py: PNGs decode to the arrays written, completion records decide what is done (also
after SIGKILL at random moments and mid-file), concurrent writers keep their own records, the queue is
bounded, pool errors reach the caller as one line, folders from before records keep their PNGs."""

import errno
import io
import json
import os
import random
import signal
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from tools import checkpoint, sample_writer
from tools.checkpoint import atomic_write
from tools.cli import UserError
from tools.sample_writer import LEGACY_RECORD, SampleWriter, _read_record, done_seeds, image_path, records_folder


def fake_writes(monkeypatch, make):
    """Files the writer opens for writing (PNGs, and records and rewrites through tools.checkpoint) come from
    make(path, mode), or the real open() where it returns None."""
    def fake_open(path, mode="r", *args, **kwargs):
        fake = make(os.fspath(path), mode) if "w" in mode or "a" in mode else None
        return open(path, mode, *args, **kwargs) if fake is None else fake
    for module in (sample_writer, checkpoint):  # the modules' open(): the builtin elsewhere
        monkeypatch.setattr(module, "open", fake_open, raising=False)


def image(seed, shape=(8, 8, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def decodes_to(path, array):
    """Whether the PNG at `path` decodes to exactly `array` (False for a missing or truncated file)."""
    try:
        with Image.open(path) as im:
            back = np.asarray(im)
    except (OSError, SyntaxError, ValueError):
        return False
    return back.shape in (array.shape, array.shape[:2]) and np.array_equal(back.reshape(array.shape), array)


def wait_for(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def fork_writer(out, seeds, start=None, pace=0.0, **kwargs):
    """A child process (forked: no second import of torch) writing image(seed) for `seeds` into `out`,
    after reading one byte from the pipe `start` if given, at most one image per `pace` seconds. Returns its pid."""
    Image.init()  # PIL's plugins imported here: a forked child must not need the import lock
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if start is not None:
                os.read(start, 1)
            with SampleWriter(out, **kwargs) as w:
                for s in seeds:
                    w.write(s, image(s))
                    time.sleep(pace)
            code = 0
        finally:
            os._exit(code)
    return pid


def exit_code(pid):
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def one_line(error):
    assert "\n" not in str(error) and error.shared is False  # printed by the rank it happened on
    return str(error)


@pytest.mark.parametrize("level", [1, 0])  # the default, and the fastest (stored)
@pytest.mark.parametrize("channels", [1, 3])
def test_pngs_decode_to_the_arrays_written(tmp_path, channels, level):
    out = str(tmp_path / "samples")
    seeds = [0, 7, 999, 1000, 123456]
    arrays = {s: image(s, (channels, 12, 10)).transpose(1, 2, 0) for s in seeds}  # non-contiguous, as sample.py passes
    arrays[7] = (np.arange(12 * 10 * channels).reshape(12, 10, channels) % 7 * 30).astype(np.uint8)  # compressible
    buffer = np.zeros((12, 10, channels), np.uint8)
    with SampleWriter(out, compress_level=level) as w:
        for s in seeds:
            buffer[:] = arrays[s]
            w.write(s, buffer)  # the caller reuses its buffer at once: the writer must have copied it
            buffer[:] = 0
    for s in seeds:
        assert decodes_to(image_path(out, s), arrays[s])
        assert Image.open(image_path(out, s)).mode == ("L" if channels == 1 else "RGB")
    assert done_seeds(out) == set(seeds)
    inside = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]
    assert len(inside) == len(seeds) and all(p.endswith(".png") for p in inside)  # records live beside, in <out>.done
    assert os.listdir(records_folder(out)) and records_folder(out) == out + ".done"


def test_done_seeds_lists_exactly_what_was_written_and_closed(tmp_path):
    out = str(tmp_path / "samples")
    w = SampleWriter(out, record_every=10 ** 6, record_seconds=10 ** 6)
    for s in range(10):
        w.write(s, image(s))
    wait_for(lambda: w.pending == 0)
    assert all(os.path.exists(image_path(out, s)) for s in range(10)) and done_seeds(out) == set()  # on disk, not recorded
    w.close()
    assert done_seeds(out) == set(range(10))
    os.remove(image_path(out, 3))
    Image.fromarray(image(50)).save(image_path(out, 50))  # a file no writer recorded (a killed one's, say)
    assert done_seeds(out) == set(range(10)) - {3}
    assert done_seeds(out, [0, 1, 3, 50, 77]) == {0, 1}


def test_sigkill_at_random_moments_never_counts_a_broken_png(tmp_path):
    """Writers killed after random delays, each resuming the seeds not done; a last one completes the set.
    Without os.sync (it guards against power loss, not kills; its time depends on the whole machine's I/O)."""
    out, seeds, rng = str(tmp_path / "samples"), range(1500), random.Random(0)
    killed, done = 0, set()
    for round in range(6):
        left = [s for s in seeds if s not in done]
        # Paced (500 images/s at most): the ~10-50 ms from the target to the kill cannot let a fast machine finish.
        pid = fork_writer(out, left, pace=0.002, record_every=10, record_seconds=0.01, sync=False)
        # Killed once its records pass a random point in the first quarter of what is left, after a random moment more:
        # at any speed of the machine, the writer is busy when the kill comes (after a fixed time, a fast one is done).
        target = len(done) + rng.randint(1, len(left) // 4)
        try:
            wait_for(lambda: len(done_seeds(out, seeds)) >= target, seconds=60)
            time.sleep(rng.uniform(0, 0.01))
        finally:
            os.kill(pid, signal.SIGKILL)
            killed += exit_code(pid) == -signal.SIGKILL
        done, before = done_seeds(out, seeds), done
        assert done >= before and all(decodes_to(image_path(out, s), image(s)) for s in done - before)
        assert target <= len(done) < len(seeds)
    assert killed == 6  # every kill hit a running writer, after some of its records were out
    assert exit_code(fork_writer(out, [s for s in seeds if s not in done])) == 0
    assert done_seeds(out, seeds) == set(seeds)
    assert all(decodes_to(image_path(out, s), image(s)) for s in seeds)


class HangingFile(io.FileIO):
    """A file whose third write never returns: a writer caught in the middle of a PNG."""

    def __init__(self, path, mode="wb"):
        super().__init__(path, mode)
        self.writes = 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            self.flush()
            time.sleep(60)
        return super().write(data)


def test_kill_in_the_middle_of_a_png(tmp_path, monkeypatch):
    """A half-written file is never done, even when the writer records its other files meanwhile: a new seed
    leaves a truncated PNG no record lists; a seed that a record already lists (its file deleted by hand) is
    rewritten through a temp file, never in place."""
    out = str(tmp_path / "samples")
    with SampleWriter(out) as w:
        for s in range(4):
            w.write(s, image(s))
    os.remove(image_path(out, 2))
    fake_writes(monkeypatch, lambda path, mode: HangingFile(path, mode) if os.path.basename(path).startswith(("000002.png", "000005.png")) else None)
    pid = fork_writer(out, [2, 5, 6, 7], threads=3, record_every=1, sync=False)  # 2 and 5 hang, 6 and 7 get recorded
    folder = os.path.dirname(image_path(out, 2))
    try:
        wait_for(lambda: {6, 7} <= done_seeds(out) and os.path.exists(image_path(out, 5))
                 and os.path.getsize(image_path(out, 5)) > 0 and any(n.startswith("000002.png.tmp-") for n in os.listdir(folder)))
    finally:
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
    assert not decodes_to(image_path(out, 5), image(5)) and not os.path.exists(image_path(out, 2))
    assert done_seeds(out, range(8)) == {0, 1, 3, 6, 7}


def test_two_writers_keep_their_own_records(tmp_path):
    """Two processes started together on a folder from before records, interleaved seeds: the folder is
    converted once, and the union of the records covers everything."""
    out = str(tmp_path / "samples")
    for s in range(10):
        atomic_write(image_path(out, s), lambda f, s=s: Image.fromarray(image(s)).save(f, format="PNG"))
    start, go = os.pipe()
    pids = [fork_writer(out, range(10 + k, 600, 2), start=start, record_every=16) for k in (0, 1)]
    os.write(go, b"xx")
    assert [exit_code(pid) for pid in pids] == [0, 0]
    assert done_seeds(out) == set(range(600))
    folder = records_folder(out)
    records = {name: _read_record(os.path.join(folder, name)) for name in os.listdir(folder)}
    assert records.pop(LEGACY_RECORD) == set(range(10))
    assert sorted(map(min, records.values())) == [10, 11] and len(records) == 2
    assert all(seeds == set(range(min(seeds), 600, 2)) for seeds in records.values())
    assert all(decodes_to(image_path(out, s), image(s)) for s in range(600))


def test_queue_is_bounded(tmp_path, monkeypatch):
    """A caller faster than the pool blocks at max_pending images; the pool never holds more."""
    out, gate, seen = str(tmp_path / "samples"), threading.Event(), []
    w = SampleWriter(out, threads=2, max_pending=3)

    def wait_at_the_gate(path, mode):  # then the real open()
        seen.append(w.pending)
        gate.wait(10)

    fake_writes(monkeypatch, wait_at_the_gate)
    accepted = []
    caller = threading.Thread(target=lambda: [accepted.append(w.write(s, image(s))) for s in range(12)])
    caller.start()
    wait_for(lambda: len(accepted) == 3)
    time.sleep(0.2)
    assert len(accepted) == 3 and w.pending == 3 and caller.is_alive()
    gate.set()
    caller.join(10)
    w.close()
    assert max(seen) <= 3 and done_seeds(out) == set(range(12))


def test_memory_stays_flat(tmp_path):
    """9.4 MiB of images (a caller faster than the pool) through a writer of max_pending=4: memory peaks far
    below what an unbounded queue would hold."""
    tracemalloc.start()
    try:
        with SampleWriter(str(tmp_path / "samples"), max_pending=4, record_every=100) as w:
            for s in range(200):
                w.write(s, image(s, (128, 128, 3)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"


class FullDisk(io.FileIO):
    """A file on a disk with 20 bytes left: the PNG's first chunk does not fit."""

    left = 20

    def write(self, data):
        n = super().write(memoryview(data)[:self.left])
        self.left -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n


@pytest.mark.parametrize("code, line", [(errno.ENOSPC, "disk full while writing"), (errno.EACCES, "could not write")])
def test_pool_error_is_one_line_in_the_caller(tmp_path, monkeypatch, code, line):
    """Seed 2 fails: half written on a full disk (the part is removed), or refused (an unwritable folder)."""
    out = str(tmp_path / "samples")

    def failing_open(path, mode):
        if os.path.basename(path) == "000002.png" and code == errno.ENOSPC:
            return FullDisk(path, mode)
        if os.path.basename(path) == "000002.png":
            raise OSError(code, os.strerror(code), path)

    fake_writes(monkeypatch, failing_open)
    w = SampleWriter(out)
    for s in range(3):
        w.write(s, image(s))
    wait_for(lambda: w.pending == 0)
    with pytest.raises(UserError) as at_write:
        w.write(3, image(3))
    assert one_line(at_write.value).startswith(line) and image_path(out, 2) in str(at_write.value)
    with pytest.raises(UserError) as at_close:
        w.close()
    assert at_close.value is at_write.value
    assert done_seeds(out) == {0, 1} and not os.path.exists(image_path(out, 2))  # those written before still count

    with pytest.raises(UserError) as in_with:  # the with statement: raised at its end, all the same
        with SampleWriter(str(tmp_path / "other")) as w:
            w.write(2, image(2))
    assert one_line(in_with.value).startswith(line)


def test_a_record_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    out = str(tmp_path / "samples")
    w = SampleWriter(out)

    def full_for_records(path, mode):
        if path.startswith(records_folder(out) + os.sep):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fake_writes(monkeypatch, full_for_records)
    w.write(0, image(0))
    with pytest.raises(UserError) as e:
        w.close()
    assert one_line(e.value).startswith("disk full while writing " + records_folder(out))
    assert done_seeds(out) == set()  # unrecorded: sampled again, never silently taken as done


def test_folder_from_before_records_counts_its_pngs(tmp_path):
    """A folder written by the old atomic path (no <out>.done): its PNGs are done, a stray temp file is not;
    a writer on it lists them in legacy.json, and the answer of done_seeds never changes on the way."""
    out = str(tmp_path / "samples")
    for s in range(6):
        atomic_write(image_path(out, s), lambda f, s=s: Image.fromarray(image(s)).save(f, format="PNG"))
    with open(image_path(out, 6) + ".tmp-host-4242", "wb") as f:
        f.write(b"\x89PNG partial")
    assert not os.path.exists(records_folder(out)) and done_seeds(out) == set(range(6))
    w = SampleWriter(out)
    assert done_seeds(out) == set(range(6))
    for s in (6, 7):
        w.write(s, image(s))
    w.close()
    assert done_seeds(out) == set(range(8))
    assert json.load(open(os.path.join(records_folder(out), LEGACY_RECORD)))["seeds"] == [[0, 5, 1]]


def test_a_folder_converted_while_listed_is_read_by_its_records(tmp_path, monkeypatch):
    """The race of done_seeds with the first writer: a PNG seen while listing an unconverted folder may be a
    new writer's plain, unfinished file, so a folder converted meanwhile is read by its records instead."""
    from tools import sample_writer
    out = str(tmp_path / "samples")
    atomic_write(image_path(out, 0), lambda f: Image.fromarray(image(0)).save(f, format="PNG"))
    real_scan, calls = sample_writer._seeds_on_disk, []

    def scan_while_a_writer_starts(folder):
        found = real_scan(folder)
        if not calls:
            calls.append(folder)
            sample_writer._open_records(folder)  # a writer starts right after the listing ...
            open(image_path(folder, 9), "wb").close()  # ... and begins seed 9, which the listing is taken to have seen
            found.add(9)
        return found

    monkeypatch.setattr(sample_writer, "_seeds_on_disk", scan_while_a_writer_starts)
    assert done_seeds(out) == {0}


def test_each_record_lists_only_files_synced_before_it(tmp_path, monkeypatch):
    """Power loss: every version of a record is written after an os.sync() that followed the closing of
    every file it lists, so a record never vouches for data still in the page cache."""
    out, events = str(tmp_path / "samples"), []

    class LoggedFile(io.FileIO):
        data = b""

        def write(self, data):
            self.data += bytes(data)
            return super().write(data)

        def close(self):
            if not self.closed:
                super().close()
                events.append(("closed", self.name, self.data))

    fake_writes(monkeypatch, LoggedFile)
    monkeypatch.setattr(os, "sync", lambda: events.append(("sync",)))
    with SampleWriter(out, record_every=1) as w:
        for s in range(40):
            w.write(s, image(s))
    closed, synced, versions = set(), set(), 0
    for event in events:
        if event[0] == "sync":
            synced = set(closed)
        elif event[1].startswith(records_folder(out) + os.sep):
            runs = json.loads(event[2])["seeds"]
            assert {image_path(out, s) for a, b, c in runs for s in range(a, b + 1, c)} <= synced
            versions += 1
        else:
            closed.add(event[1])
    assert versions >= 2 and done_seeds(out) == set(range(40))  # one during the run at least, one at close
