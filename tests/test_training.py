"""train.py: exact resume, world-size independence, schedules, bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import DIGITS, ROOT, run_script

# A smaller network and a larger batch than the digits default: 5 steps per epoch, seconds per run.
# Dropout on (the digits default is 0, every CIFAR config uses it), so resume and world-size tests cover its masks.
FAST = ["network.model_channels=8", "network.dropout=0.1", "train.batch_size=256", "train.grid_epochs=0", "train.eval_epochs=0",
        "train.log_steps=1", "ema.snapshot_epochs=1", "train.checkpoint_epochs=1"]


def train(outdir, *overrides, config="config/digits/E.yaml", check=True):
    return run_script("train.py", "--config", config, "--outdir", str(outdir), *FAST, *overrides, check=check)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def losses(outdir):
    with open(os.path.join(outdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("one_go")
    train(outdir, "train.epochs=3")
    return outdir


@pytest.mark.parametrize("config", ["config/digits/E.yaml"])
def test_exact_resume(one_go, tmp_path, config):
    """Stopped after epoch 1, resumed twice (once through a corrupt newest checkpoint): bit-identical to one go."""
    train(tmp_path, "train.epochs=1", config=config)
    train(tmp_path, "train.epochs=2", config=config)
    with open(tmp_path / "checkpoints" / "epoch_2.pt", "r+b") as f:  # a crash mid-copy, a bad disk: the newest is corrupt
        f.truncate(1000)
    proc = train(tmp_path, "train.epochs=3", config=config)
    assert "epoch_2.pt: checksum mismatch" in proc.stderr or "epoch_2.pt is unreadable" in proc.stderr, proc.stderr
    a, b = load(one_go / "checkpoints" / "epoch_3.pt"), load(tmp_path / "checkpoints" / "epoch_3.pt")
    assert_same_state(a["net"], b["net"])
    assert_same_state(a["emas"]["classic"], b["emas"]["classic"])
    for pa, pb in zip(a["emas"]["power"], b["emas"]["power"]):
        assert_same_state(pa, pb)
    assert a["t_img"] == b["t_img"] == 3 * 5 * 256
    # the run really trained: weights moved from their initialisation
    first = load(one_go / "checkpoints" / "epoch_1.pt")["net"]
    assert any(not torch.equal(first[k], a["net"][k]) for k in a["net"] if first[k].is_floating_point())


def test_world_size_two_matches_one(one_go, tmp_path):
    """The same global batch split over 2 gloo ranks gives the same loss curve, dropout masks included."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "train.py",
           "--config", "config/digits/E.yaml", "--outdir", str(tmp_path), *FAST, "train.epochs=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(one_go), losses(tmp_path)
    assert len(one) == len(two) == 15
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    a, b = load(one_go / "checkpoints" / "epoch_3.pt"), load(tmp_path / "checkpoints" / "epoch_3.pt")
    for k in a["net"]:
        torch.testing.assert_close(b["net"][k], a["net"][k], rtol=1e-4, atol=1e-5)


def test_logged_learning_rate_follows_schedule(one_go):
    """lr = ref / sqrt(max(t / t_ref, 1)) * min(t / rampup, 1), t = images seen before the step."""
    epoch_img = 5 * 256
    for r in losses(one_go):
        t = r["kimg"] * 1000 - 256
        assert r["lr"] == pytest.approx(1e-2 / np.sqrt(max(t / (4 * epoch_img), 1)) * min(t / (2 * epoch_img), 1), rel=1e-12)


def test_snapshots_written_at_image_cadence(one_go):
    files = sorted(f for f in os.listdir(one_go / "snapshots") if f.endswith(".pt"))
    assert files == [f"snapshot_{t:012d}.pt" for t in (1280, 2560, 3840)]
    assert all(os.path.isfile(one_go / "snapshots" / (f + ".sha256")) for f in files)  # each with its checksum
    snap = load(one_go / "snapshots" / files[-1])
    assert [e["sigma_rel"] for e in snap["emas"]] == [0.05, 0.10]
    assert all(v.dtype == torch.float32 for e in snap["emas"] for v in e["net"].values() if v.is_floating_point())


def test_continue_finished_run_by_raising_epochs(one_go, tmp_path):
    shutil.copytree(one_go, tmp_path / "run")
    proc = train(tmp_path / "run", "train.epochs=4")
    assert "resumed" in proc.stdout
    assert load(tmp_path / "run" / "checkpoints" / "epoch_4.pt")["t_img"] == 4 * 5 * 256


def test_nonfinite_loss_stops_cleanly(tmp_path):
    """A run whose weights blow up (Config C, an absurd learning rate) stops with one line and leaves its
    last good checkpoint intact."""
    train(tmp_path, "train.epochs=1", config="config/digits/C.yaml")
    before = open(tmp_path / "checkpoints" / "epoch_1.pt", "rb").read()
    proc = train(tmp_path, "train.epochs=3", "train.lr=1e30", "train.max_nonfinite_steps=3", config="config/digits/C.yaml", check=False)
    assert proc.returncode == 2
    assert "non-finite for 3 consecutive steps" in proc.stderr and "epoch_1.pt" in proc.stderr, proc.stderr[-2000:]
    assert open(tmp_path / "checkpoints" / "epoch_1.pt", "rb").read() == before
    assert not (tmp_path / "checkpoints" / "epoch_2.pt").exists()


def assert_one_line_exit_2(proc, needle):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]


def test_train_rejects_batch_size_0_before_creating_the_run(tmp_path):
    outdir = tmp_path / "run"
    proc = run_script("train.py", "--config", DIGITS, "--outdir", str(outdir), "train.batch_size=0", check=False)
    assert_one_line_exit_2(proc, "train.batch_size must be >= 1, got 0")
    assert not outdir.exists()


def test_train_rejects_a_non_network_unet_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(open(os.path.join(ROOT, DIGITS)).read().replace("unet: unetE.py", "unet: sample.py"))
    proc = run_script("train.py", "--config", str(path), "--dry-run", check=False)
    assert_one_line_exit_2(proc, "unet: 'sample.py' is not a network file; allowed: unetC.py, unetE.py, unetG.py")
    assert proc.stdout == ""
