"""Mixed precision in one place, honoured on every device (README, "Precision and determinism")."""

import contextlib
import os

import torch

PRECISIONS = ("bf16", "fp16", "tf32", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def matmul_precision(precision):
    """TF32 matmuls and convolutions on for 'tf32', off otherwise, while the block (and a backward pass in it) runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def autocast(device, precision):
    amp = torch.autocast(torch.device(device).type, dtype=DTYPES[precision]) if precision in DTYPES else contextlib.nullcontext()
    with matmul_precision(precision), amp:
        yield


def use_deterministic(on):
    """train.deterministic: cuBLAS's fixed workspace, deterministic cuDNN and torch algorithms (else warn once)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
