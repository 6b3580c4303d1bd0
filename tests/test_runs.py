"""Reading a run (tools/runs.py), launch checks (tools/dist.py) and plain logs for batch jobs (tools/log.py)."""

import os

import pytest

from conftest import run_script
from tools import dist
from tools.cli import UserError
from tools.log import _Plain
from tools.runs import resolve


def test_outdir_alone_reads_the_runs_config(trained_digits_run):
    cfg, outdir = resolve(None, trained_digits_run, ["sample.steps=5"])
    assert outdir == trained_digits_run and cfg["train"]["epochs"] == 4 and cfg["sample"]["steps"] == 5
    cfg, outdir = resolve("config/digits/E.yaml", trained_digits_run)  # --config replaces the run's own
    assert cfg["train"]["epochs"] == 20 and outdir == trained_digits_run
    with pytest.raises(UserError, match="no config.yaml"):
        resolve(None, os.path.dirname(trained_digits_run))
    with pytest.raises(UserError, match="--outdir RUN"):
        resolve(None, None)


def test_srun_without_torchrun_is_refused():
    with pytest.raises(UserError, match="srun started 4 independent copies.*torchrun --nnodes"):
        dist.check_launcher({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1"})
    dist.check_launcher({"SLURM_STEP_NUM_TASKS": "4", "RANK": "1", "WORLD_SIZE": "4"})  # torchrun inside srun
    dist.check_launcher({"SLURM_STEP_NUM_TASKS": "1"})                                  # one task: a plain run
    dist.check_launcher({})


def test_srun_refusal_is_one_line_before_any_work(tmp_path):
    proc = run_script("train.py", "--config", "config/digits/E.yaml", "--outdir", str(tmp_path / "run"),
                      env={"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "torchrun" in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_plain_progress_lines(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 70.0, 80.0, 200.0])
    monkeypatch.setattr("tools.log.time.time", lambda: next(clock))
    bar = _Plain(total=4, initial=0, desc="training", unit="step", every_s=60)  # start at t = 0
    bar.set_postfix(loss="0.1234")
    for _ in range(4):
        bar.update(1)  # t = 10 (quiet), 70 (a line), 80 (quiet), 200 (the last: a line)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "\r" not in "".join(lines)
    assert "training 2/4 steps (50.0%)" in lines[0] and "loss=0.1234" in lines[0]
    assert "training 4/4 steps (100.0%)" in lines[1]


def test_batch_job_log(trained_digits_run, tmp_path):
    """Not a terminal: plain lines, no carriage returns, and OUTDIR/log.txt holds what was printed."""
    proc = run_script("sample.py", "--outdir", trained_digits_run, "--seeds", "0-3", "--steps", "3", "--out", str(tmp_path / "s"))
    assert "\r" not in proc.stdout + proc.stderr
    log = open(os.path.join(trained_digits_run, "log.txt")).read()
    assert "sample.py --outdir" in log and f"samples: {tmp_path / 's'}" in log


def test_a_mistake_under_torchrun_is_printed_once(trained_digits_run):
    """Both ranks meet the same missing checkpoint: one line from rank 0, none from rank 1."""
    import subprocess
    import sys
    from conftest import ROOT
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "sample.py",
           "--outdir", trained_digits_run, "--epoch", "3", "--seeds", "0-3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: no checkpoint for epoch 3 in {os.path.join(trained_digits_run, 'checkpoints')} (available: 2, 4)"], proc.stderr
