"""Mixed precision, decided in one place: the autocast context of a job on a device.

Training follows train.precision, sampling (sample.py, the training grids, the quality curve) sample.precision,
feature extraction for the probe probe.precision. Autocast applies on CUDA only: the CPU always runs float32
(bf16 matmuls on a CPU are slower, and CPU runs are for development). fp16 in training goes with a GradScaler
(tools/train_state.py); at inference it needs none.
"""

import contextlib

import torch

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision):
    """A context manager running the enclosed forward passes in `precision` (bf16 | fp16 | fp32) on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if torch.device(device).type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=DTYPES[precision])
