"""Distributed setup read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process works too.

SLURM's `srun` without torchrun starts N processes that each believe they are alone; they would all
train into one run directory, so init() refuses that and shows the torchrun command instead.
"""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from tools.cli import UserError

TIMEOUT = datetime.timedelta(minutes=30)  # a collective of shared work waits this long for a rank that died or hangs
# Waiting for rank 0's work alone (a dataset classifier, Inception statistics, scoring 50k samples, a post-hoc EMA) goes
# through a gloo group of its own with this timeout: NCCL's watchdog would abort a job whose ranks sat in an NCCL
# collective for longer than TIMEOUT. torchrun still ends every rank when one fails.
WAIT_TIMEOUT = datetime.timedelta(hours=24)
_waits = None  # the gloo group of broadcast(), on_rank0() and barrier()


def check_launcher(environ=os.environ):
    """UserError when SLURM started several tasks of a script that torchrun did not launch."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" not in environ and tasks > 1:
        raise UserError(f"srun started {tasks} independent copies of this script, which would all write one run directory; "
                        "run one task per node that calls torchrun instead: srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES "
                        "--nproc_per_node=GPUS_PER_NODE --rdzv-backend=c10d --rdzv-endpoint=$(scontrol show hostnames | head -n1):29500 "
                        "SCRIPT ARGS (README: Launching)")


def init():
    """Start the process group when launched by torchrun. Returns (rank, world_size, device)."""
    check_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1 and not dist.is_initialized():
        global _waits
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
        _waits = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return rank, world_size, device


@contextlib.contextmanager
def session():
    """init() for an entry point; the process group is shut down on exit only if this call started it, so
    scripts that call each other's main() (tools/ema_sweep.py) share one group. On a normal exit every rank
    waits for the others first (leave_together); after an error it does not, since a peer may be gone."""
    owner = not dist.is_initialized()
    try:
        yield init()
        if owner:
            leave_together()
    finally:
        if owner:
            shutdown()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def max_over_ranks(values):
    """The elementwise maximum of a list of numbers over the ranks, through the CPU wait group: no device sync."""
    flags = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_waits)
    return flags.tolist()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank (which may wait for it as long as WAIT_TIMEOUT)."""
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=_waits)
        return box[0]
    return obj


def on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) run by rank 0 alone, its result broadcast to every rank. A UserError on rank 0 is
    raised on every rank (with the same one line), so no rank is left waiting in a collective."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            error = str(e)
    result, error = broadcast((result, error))
    if error is not None:
        e = UserError(error)
        e.shared = True
        raise e
    return result


def barrier():
    """Every rank waits for the others, as long as WAIT_TIMEOUT."""
    if dist.is_initialized():
        dist.barrier(group=_waits)


def leave_together():
    """Wait until every rank has finished before the process group is torn down. Rank 0 often works on alone at
    the end (a probe's classifier, a summary) while the others are done; a gloo rank that tore its group down
    and exited meanwhile was once seen to abort (SIGABRT), which made torchrun kill rank 0 mid-write. Best
    effort: a rank that waits past the collective timeout leaves anyway rather than fail the run."""
    try:
        barrier()
    except RuntimeError:  # timed out (rank 0 still busy, or gone): nothing is left to share
        pass


def shutdown():
    global _waits
    if dist.is_initialized():
        dist.destroy_process_group()
    _waits = None


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)
