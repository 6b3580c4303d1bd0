"""tools/dist.py: launch checks (srun without torchrun) and ranks that leave a session together."""

import os

import pytest
import torch

from conftest import run_script
from tools import dist
from tools.cli import UserError


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


def test_ranks_leave_a_session_together(tmp_path):
    """A rank that is done does not tear the process group down while rank 0 still works alone (a gloo rank that
    does so can abort, and torchrun then kills rank 0)."""
    torch.multiprocessing.spawn(_session_worker, args=(29541, str(tmp_path / "t")), nprocs=2)
    read = lambda name: float((tmp_path / name).read_text())
    assert read("t.left1") >= read("t.done")


def _session_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import time

    from tools import dist
    with dist.session():
        dist.all_reduce_sum(torch.ones(3))
        if rank == 0:  # alone after the last collective, as probe.py's classifier and train.py's summary are
            time.sleep(1.0)
            with open(f"{out}.done", "w") as f:
                f.write(repr(time.time()))
    with open(f"{out}.left{rank}", "w") as f:
        f.write(repr(time.time()))


def test_waiting_for_rank0_outlasts_the_collective_timeout(tmp_path):
    """Rank 0 works alone for longer than the process group's timeout (a dataset classifier, Inception statistics,
    scoring 50k samples) while rank 1 waits for its result: the wait goes through the wait group (tools.dist.WAIT_TIMEOUT),
    so it neither times out nor, under NCCL, trips the watchdog; the shared group still works afterwards."""
    torch.multiprocessing.spawn(_slow_rank0_worker, args=(29545, str(tmp_path / "r")), nprocs=2)
    assert [(tmp_path / f"r{rank}").read_text() for rank in (0, 1)] == ["42 2.0", "42 2.0"]


def _slow_rank0_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime
    import time

    from tools import dist
    dist.TIMEOUT = datetime.timedelta(seconds=1)  # the shared collectives' timeout, made short
    with dist.session():
        value = dist.on_rank0(lambda: time.sleep(2.5) or 42)
        dist.barrier()
        total = dist.all_reduce_sum(torch.ones(1))
        with open(f"{out}{rank}", "w") as f:
            f.write(f"{value} {total.item()}")
