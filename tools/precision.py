"""Mixed precision, decided in one place: the numerics of a job on a device.

Training follows train.precision, sampling (sample.py, the training grids, the quality curve) sample.precision,
feature extraction for the probe probe.precision, each one of
  bf16, fp16  autocast to that dtype (fp16 training goes with a GradScaler, tools/train_state.py);
  tf32        float32 tensors, matmuls and convolutions in TF32 on GPUs that have it;
  fp32        float32 throughout (cuDNN's TF32 default turned off too).
The precision is honoured on every device, so a CPU runs the code path of a GPU run (CPU autocast supports bf16
and fp16; it is slower than fp32 there, which is why the digits configs ask for fp32; TF32 is a GPU matter).
"""

import contextlib
import os

import torch

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def matmul_precision(precision):
    """TF32 matmuls and convolutions on for 'tf32' and off otherwise while the block runs (the backward pass
    included, where it runs inside)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def autocast(device, precision):
    """Forward passes in `precision` (bf16 | fp16 | tf32 | fp32) on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    with matmul_precision(precision):
        if precision in DTYPES:
            with torch.autocast(torch.device(device).type, dtype=DTYPES[precision]):
                yield
        else:
            yield


def use_deterministic(on):
    """train.deterministic: kernels that give the same bits on every run on the same GPU model and software
    (cuBLAS's fixed workspace, cuDNN's deterministic algorithms, torch's deterministic mode; an op that has no
    deterministic kernel warns once). CPU kernels are deterministic already. Off leaves torch's defaults."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
