"""Distributed setup read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process works too."""

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from tools.cli import UserError

TIMEOUT = datetime.timedelta(minutes=30)  # a shared collective waits this long for a rank that died or hangs
# Waits for rank 0's work alone (classifier, Inception statistics, post-hoc EMA) use gloo: NCCL's watchdog aborts at TIMEOUT.
WAIT_TIMEOUT = datetime.timedelta(hours=24)
_waits = None  # the gloo group of broadcast(), on_rank0(), barrier() and max_over_ranks()


def check_launcher(environ=os.environ):
    """UserError when SLURM started several tasks without torchrun: each would think it is alone."""
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" not in environ and tasks > 1:
        raise UserError(f"srun started {tasks} independent copies of this script, all writing one run directory; run one task per node "
                        "that calls torchrun instead: srun --ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc_per_node=GPUS_PER_NODE "
                        "--rdzv-backend=c10d --rdzv-endpoint=$(scontrol show hostnames | head -n1):29500 SCRIPT ARGS (README: Launching)")


def init():
    """(rank, world_size, device); starts the process group when launched by torchrun."""
    global _waits
    check_launcher()
    world_size, rank, local_rank = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
        _waits = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return rank, world_size, device


@contextlib.contextmanager
def session():
    """init(); the call that started the group shuts it down, after a normal exit once every rank is done (docs/DESIGN.md)."""
    owner = not dist.is_initialized()
    try:
        yield init()
        if owner:
            with contextlib.suppress(RuntimeError):  # timed out: nothing is left to share
                barrier()
    finally:
        if owner:
            shutdown()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def max_over_ranks(values):
    """The elementwise maximum over the ranks, through the CPU wait group: no device sync."""
    flags = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_waits)
    return flags.tolist()


def broadcast(obj):
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0, group=_waits)
    return box[0]


def on_rank0(fn, *args, **kwargs):
    """fn(...) run by rank 0 alone, its result broadcast; its UserError is raised on every rank with the same line."""
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
    if dist.is_initialized():
        dist.barrier(group=_waits)


def shutdown():
    global _waits
    if dist.is_initialized():
        dist.destroy_process_group()
    _waits = None


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)
