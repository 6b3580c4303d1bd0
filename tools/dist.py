"""Distributed setup read from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process works too."""

import os

import torch
import torch.distributed as dist


def init():
    """Start the process group when launched by torchrun. Returns (rank, world_size, device)."""
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return rank, world_size, device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op on one process); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs, flush=True)
