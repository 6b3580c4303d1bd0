"""Magnitude-preserving primitives (EDM2, Karras et al. 2024, sections 2.3 and 3).

Each function keeps the expected RMS of unit-RMS, uncorrelated inputs at 1.
"""

import numpy as np
import torch


EPS = 1e-4  # of normalize: a row of zeros stays finite


def normalize(x, dim=None, eps=EPS):
    """Scale every slice of x along `dim` to unit RMS: x / (eps + ||x|| * sqrt(n_slice / n_total)).

    dim=None normalises each slice along dim 0 (an output channel of a weight, a sample of a batch).
    The norm is taken in float32 so that bf16/fp16 activations do not overflow or lose precision.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):
    """SiLU divided by its RMS on a unit Gaussian, E[silu(z)^2]^(1/2) = 0.596 (EDM2 eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """((1-t) a + t b) / sqrt((1-t)^2 + t^2): unit RMS for unit-RMS, uncorrelated a and b, of which b carries the
    share t^2 / ((1-t)^2 + t^2) of the energy (t = 0.3: 16%; t = 0.5: half). Mixed dtypes promote as `+` does
    (lerp itself does not, and autocast leaves it alone)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).lerp(b.to(dtype), t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate unit-RMS a and b along `dim` into a unit-RMS result in which b's channels carry the share
    t^2 / ((1-t)^2 + t^2) of the energy, whatever the channel counts Na and Nb (EDM2 eq. 103; t = 0.5: half)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / np.sqrt(Na) * (1 - t)
    wb = C / np.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


@torch.no_grad()
def force_weight_norm_(module):
    """Forced weight normalisation (EDM2 section 2.4, Config E): rescale every weight that asks for it
    back to unit-RMS rows, in place and outside the autograd graph: normalize(w) for each.

    The training loop calls this once before training and after every optimizer step, so the forward
    pass itself stays free of in-place parameter writes (safe under DDP, autocast and torch.compile).
    Layers opt in with `forced_weight_norm = True`; Config C layers do not, so this is a no-op there.
    One norm kernel per weight, the rest three foreach calls for all of them (docs/PERFORMANCE.md).
    """
    weights = [m.weight for m in module.modules() if getattr(m, "forced_weight_norm", False)]
    if not weights:
        return
    norms = [torch.linalg.vector_norm(w.reshape(len(w), -1), dim=1, keepdim=True, dtype=torch.float32) for w in weights]
    torch._foreach_mul_(norms, [w[0].numel() ** -0.5 for w in weights])  # the RMS of each row
    torch._foreach_add_(norms, EPS)
    torch._foreach_div_(weights, [n.view(-1, *[1] * (w.ndim - 1)) for n, w in zip(norms, weights)])
