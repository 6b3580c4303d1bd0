"""Mixed precision, decided in one place: the autocast context of a job on a device.

Training follows train.precision, sampling (sample.py, the training grids, the quality curve) sample.precision,
feature extraction for the probe probe.precision. The precision is honoured on every device, so a CPU runs the
code path of a GPU run (CPU autocast supports bf16 and fp16; it is slower than fp32 there, which is why the
digits configs ask for fp32). fp16 in training goes with a GradScaler (tools/train_state.py).
"""

import contextlib
import os

import torch

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision):
    """A context manager running the enclosed forward passes in `precision` (bf16 | fp16 | fp32) on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


def use_deterministic(on):
    """train.deterministic: kernels that give the same bits on every run on the same GPU model and software
    (cuBLAS's fixed workspace, cuDNN's deterministic algorithms, torch's deterministic mode; an op that has no
    deterministic kernel warns once). CPU kernels are deterministic already. Off leaves torch's defaults."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
