"""Interruptions and concurrent writers: SIGTERM mid-epoch and SIGKILL at any moment resume to the same bits,
a time-based checkpoint cadence, and a second training on one run directory is refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, run_script

# 23 steps per epoch (1,497 digits / 64), small network: a run of 2 epochs takes seconds, and a signal lands mid-epoch.
FAST = ["network.model_channels=8", "network.dropout=0.1", "train.batch_size=64", "train.grid_epochs=0", "train.eval_epochs=0", "train.log_steps=1",
        "ema.snapshot_epochs=0.5", "train.checkpoint_epochs=1", "train.epochs=2"]


def command(outdir, *overrides):
    return [sys.executable, "train.py", "--config", "config/digits/E.yaml", "--outdir", str(outdir), *FAST, *overrides]


def start(outdir, *overrides):
    return subprocess.Popen(command(outdir, *overrides), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def loss_rows(outdir):
    """The training rows of metrics.jsonl; a line cut short by a kill is skipped."""
    rows = []
    try:
        with open(os.path.join(outdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return [r for r in rows if "loss" in r]


def wait_for_rows(proc, outdir, n, timeout=300):
    deadline = time.time() + timeout
    while len(loss_rows(outdir)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training too slow"
        time.sleep(0.05)


def final_state(outdir):
    ckpt = torch.load(os.path.join(outdir, "checkpoints", "epoch_2.pt"), map_location="cpu", weights_only=True)
    return {"net": ckpt["net"], "ema": ckpt["emas"]["classic"], "t_img": ckpt["t_img"]}


def assert_same(a, b):
    assert a["t_img"] == b["t_img"]
    for part in ("net", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("uninterrupted")
    run_script(*command(outdir)[1:])
    return final_state(outdir)


def test_sigterm_mid_epoch_checkpoints_and_resumes_bit_exact(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for_rows(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM") and "Traceback" not in err, err
    resume = [f for f in os.listdir(tmp_path / "checkpoints") if f.startswith("resume_") and f.endswith(".pt")]
    assert len(resume) == 1
    t_img = int(resume[0][len("resume_"):-len(".pt")])
    assert t_img % (23 * 64) != 0, "the signal should have landed mid-epoch"  # 23 steps per epoch
    proc = run_script(*command(tmp_path)[1:])
    assert f"({t_img / 1000:.1f} kimg)" in proc.stdout  # resumed from the mid-epoch checkpoint
    assert_same(final_state(tmp_path), uninterrupted)
    assert not [f for f in os.listdir(tmp_path / "checkpoints") if f.startswith("resume_")]  # superseded, removed


def test_sigkill_at_any_moment_resumes_bit_exact(uninterrupted, tmp_path):
    """Killed three times without warning (during steps, snapshot or checkpoint writes, whatever comes; checkpoints every
    0.12 s between epochs), then resumed: the same bits as one go, no temp file of a killed writer left, and the
    time-based checkpoints superseded by the epoch ones."""
    for rows in (4, 20, 30):
        proc = start(tmp_path, "train.checkpoint_minutes=0.002")
        wait_for_rows(proc, tmp_path, rows)
        proc.kill()
        proc.communicate()
    proc = run_script(*command(tmp_path)[1:])
    assert f"resumed {tmp_path} at epoch" in proc.stdout  # from a checkpoint the kills left, not from scratch
    assert_same(final_state(tmp_path), uninterrupted)
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files if ".tmp" in f]
    assert not leftovers, leftovers
    with open(tmp_path / "metrics.jsonl") as f:
        saved = [json.loads(line) for line in f if '"checkpoint"' in line and line.endswith("}\n")]
    timed = [r for r in saved if r.get("reason") == "0.002 minutes"]
    assert timed and any(r["epoch"] < 1 for r in timed) and saved[-1]["checkpoint"].endswith("epoch_2.pt")
    assert sorted(f for f in os.listdir(tmp_path / "checkpoints") if f.endswith(".pt")) == ["epoch_1.pt", "epoch_2.pt"]


def test_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    first = start(tmp_path, "train.epochs=200")
    wait_for_rows(first, tmp_path, 2)
    log = open(tmp_path / "log.txt").read()
    second = run_script(*command(tmp_path, "train.lr=1e-3")[1:], check=False)
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr and "is being trained by" in second.stderr
    assert open(tmp_path / "log.txt").read().startswith(log) and "train.lr=1e-3" not in open(tmp_path / "log.txt").read()
    with open(tmp_path / "config.yaml") as f:
        assert yaml.safe_load(f)["train"]["lr"] != 1e-3  # still the first run's config
    first.kill()
    first.communicate()
    third = run_script(*command(tmp_path, "train.epochs=1")[1:])  # the killed run's lock is stale: taken over
    holder = open(tmp_path / "train.lock").read()
    assert "done:" in third.stdout and f"pid {first.pid} " not in holder and "train.epochs=1" in holder
