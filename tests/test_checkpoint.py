"""Files under faults (tools/checkpoint.py): a flipped byte is refused, not loaded; a full disk ends in one
line and leaves the previous file intact; temp files of dead writers can be cleaned; a log that cannot be
written does not stop the console. Small state dicts and fake snapshots, no training."""

import errno
import hashlib
import io
import os
import subprocess
import sys

import pytest
import torch

from conftest import flip_byte, one_line_error, weights
from tools import checkpoint
from tools.checkpoint import append_text, atomic_save, atomic_write, checkpoint_path, load, load_epoch, load_newest, manifest_path, remove, remove_stale_temp, temp_path, verify

DISK_FULL = "disk full while writing"


class FullDisk(io.FileIO):
    """A file on a disk with `room` bytes left: what fits is written, then the write fails with ENOSPC."""

    def __init__(self, path, mode, room):
        super().__init__(path, mode)
        self.left = room

    def write(self, data):
        view = memoryview(data).cast("B")
        written = super().write(view[:self.left]) if self.left else 0
        self.left -= written
        if written < len(view):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return written


def fake_writes(monkeypatch, make):
    """Files tools.checkpoint opens for writing come from make(path, mode), or the real open() where it returns None."""
    def fake_open(path, mode="r", *args, **kwargs):
        fake = make(os.fspath(path), mode) if "w" in mode or "a" in mode else None
        return open(path, mode, *args, **kwargs) if fake is None else fake
    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)  # the module's open(): the builtin elsewhere


def fill_disk(monkeypatch, room):
    fake_writes(monkeypatch, lambda path, mode: FullDisk(path, mode, room))


# ---------------------------------------------------------------------------------------------------- checksums

def test_manifest_holds_the_digest_in_sha256sum_format(tmp_path):
    path = str(tmp_path / "a.pt")
    atomic_save({"w": weights(1.0)}, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert open(manifest_path(path)).read() == f"{digest}  a.pt\n"  # `sha256sum -c a.pt.sha256` checks it
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "a.pt.sha256"]


def test_flipped_byte_in_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capsys):
    outdir = str(tmp_path)
    for epoch in (1, 2):
        atomic_save({"net": {"w": weights(epoch)}, "epoch": epoch}, checkpoint_path(outdir, epoch))
    flip_byte(checkpoint_path(outdir, 2), weights(2).numpy().tobytes())
    # the flip is in the weights: torch.load itself takes the file, with one weight changed
    raw = torch.load(checkpoint_path(outdir, 2), weights_only=True)
    assert (raw["net"]["w"] != 2).sum() == 1

    error = one_line_error(load, checkpoint_path(outdir, 2))
    assert "checksum mismatch" in error and checkpoint_path(outdir, 2) in error
    assert load_newest(outdir)["epoch"] == 1
    assert "warning:" in capsys.readouterr().err
    assert "checksum mismatch" in one_line_error(load_epoch, outdir, 2)  # an explicit epoch: the one line


def test_file_without_manifest_loads_unverified(tmp_path):
    """Plain torch.save, or a crash between a file and its manifest."""
    old = str(tmp_path / "epoch_1.pt")
    torch.save({"net": {"w": weights(1.0)}}, old)
    assert load(old)["net"]["w"][0] == 1
    atomic_save({"net": {"w": weights(2.0)}}, str(tmp_path / "epoch_2.pt"))
    os.remove(manifest_path(tmp_path / "epoch_2.pt"))
    assert load(str(tmp_path / "epoch_2.pt"))["net"]["w"][0] == 2


def test_stale_manifest_fails_and_writers_replace_it(tmp_path):
    path = str(tmp_path / "a.pt")
    atomic_save({"w": weights(1.0)}, path)
    torch.save({"w": weights(2.0)}, path)  # replaced by other means: the old file's manifest stays behind
    assert "checksum mismatch" in one_line_error(load, path)
    atomic_save({"w": weights(3.0)}, path)  # a new manifest with the new file
    assert load(path)["w"][0] == 3
    atomic_write(path, lambda f: torch.save({"w": weights(4.0)}, f))  # no manifest asked: the old one goes
    assert not os.path.exists(manifest_path(path)) and load(path)["w"][0] == 4


def test_crash_before_the_new_manifest_never_pairs_old_digest_with_new_file(tmp_path, monkeypatch):
    """The write of the manifest fails (stands in for a crash after the rename): the new file is in place
    without manifest and loads unverified; the old file's digest is gone, not left to judge the new file."""
    path = str(tmp_path / "a.pt")
    atomic_save({"w": weights(1.0)}, path)
    fake_writes(monkeypatch, lambda p, mode: FullDisk(p, mode, 0) if ".sha256.tmp-" in p else None)
    assert f"{DISK_FULL} {manifest_path(path)}" in one_line_error(atomic_save, {"w": weights(2.0)}, path)
    assert os.listdir(tmp_path) == ["a.pt"] and load(path)["w"][0] == 2


def test_remove_takes_the_manifest_along(tmp_path):
    path = str(tmp_path / "epoch_1.pt")
    atomic_save({"w": weights(1.0)}, path)
    remove(path)
    assert os.listdir(tmp_path) == []
    remove(path)  # already gone: not an error


# ---------------------------------------------------------------------------------------------------- full disk

def test_full_disk_during_torch_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "epoch_1.pt")
    atomic_save({"w": weights(1.0)}, path)
    before = sorted(os.listdir(tmp_path)), open(manifest_path(path)).read()
    room = 1000  # past the zip's first records: torch reports the failed write as a RuntimeError
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save({"w": weights(2.0, 10_000)}, FullDisk(str(tmp_path / "probe"), "wb", room))
    os.remove(tmp_path / "probe")
    fill_disk(monkeypatch, room)
    error = one_line_error(atomic_save, {"w": weights(2.0, 10_000)}, path)
    assert error == f"{DISK_FULL} {path}; earlier files are intact, free space and run again"
    assert (sorted(os.listdir(tmp_path)), open(manifest_path(path)).read()) == before  # no temp file left
    monkeypatch.undo()
    assert load(path)["w"][0] == 1
    verify(path)


@pytest.mark.parametrize("room", [0, 100])
def test_full_disk_during_plain_write_leaves_the_previous_file(tmp_path, monkeypatch, room):
    path = str(tmp_path / "stats.json")
    atomic_write(path, lambda f: f.write(b"old"))
    fill_disk(monkeypatch, room)
    assert DISK_FULL in one_line_error(atomic_write, path, lambda f: f.write(b"x" * 10_000))
    assert os.listdir(tmp_path) == ["stats.json"] and open(path, "rb").read() == b"old"


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    path = str(tmp_path / "a.bin")

    def fail(error):
        def write(f):
            f.write(b"partial")
            raise error
        return write

    message = "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
    with pytest.raises(RuntimeError, match="unexpected pos"):  # torch's message, but the disk has room: as it is
        atomic_write(path, fail(RuntimeError(message)))
    with pytest.raises(TypeError):  # a bug: its traceback
        atomic_write(path, fail(TypeError("cannot pickle")))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail(KeyboardInterrupt()))
    assert "could not write" in one_line_error(atomic_write, path, fail(OSError(errno.EIO, os.strerror(errno.EIO))))
    assert os.listdir(tmp_path) == []  # no temp file after any of them
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: checkpoint.shutil._ntuple_diskusage(10**9, 10**9, 0))
    assert DISK_FULL in one_line_error(atomic_write, path, fail(RuntimeError(message)))  # torch's message, no space


def test_append_text_on_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    append_text(path, '{"epoch": 1}\n')
    append_text(path, '{"epoch": 2}\n')
    fill_disk(monkeypatch, 5)
    assert one_line_error(append_text, path, '{"epoch": 3, "loss": 0.5}\n').startswith(f"{DISK_FULL} {path};")
    assert open(path).read() == '{"epoch": 1}\n{"epoch": 2}\n'


# ---------------------------------------------------------------------------------------------------- temp files

def test_remove_stale_temp_removes_only_dead_writers_on_this_host(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    target = str(tmp_path / "checkpoints" / "epoch_3.pt")
    os.makedirs(os.path.dirname(target))
    live = temp_path(target)
    assert live.endswith(f"-{os.getpid()}") and checkpoint.TEMP_NAME.fullmatch(os.path.basename(live))
    dead = live[:-len(str(os.getpid()))] + str(child.pid)
    other_host = f"{target}.tmp-not{checkpoint.host_name()}-{child.pid}"
    old_style = f"{target}.tmp{child.pid}"  # a name without a host: not ours to judge, kept
    for p in (live, dead, other_host, old_style, target):
        open(p, "wb").write(b"partial")
    assert remove_stale_temp(str(tmp_path)) == [dead]
    assert sorted(os.listdir(os.path.dirname(target))) == sorted(os.path.basename(p) for p in (live, other_host, old_style, target))
    assert remove_stale_temp(str(tmp_path / "missing")) == []


def test_temp_names_are_not_taken_for_results(tmp_path):
    """Checkpoint, snapshot and PNG listings match whole names: a temp file or a manifest is not one of them."""
    from tools.checkpoint import list_checkpoints
    from tools.fid import png_paths
    target = checkpoint_path(str(tmp_path), 1)
    os.makedirs(os.path.dirname(target))
    for p in (temp_path(target), target + ".sha256"):
        open(p, "wb").write(b"x")
    open(temp_path(str(tmp_path / "000000.png")), "wb").write(b"x")
    assert list_checkpoints(str(tmp_path)) == [] and png_paths(str(tmp_path)) == []
