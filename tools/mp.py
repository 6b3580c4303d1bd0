"""Magnitude-preserving primitives (EDM2 sections 2.3 and 3): unit-RMS, uncorrelated inputs give a unit-RMS output."""

import numpy as np
import torch

EPS = 1e-4  # of normalize: a row of zeros stays finite


def normalize(x, dim=None, eps=EPS):
    """x / (eps + ||x|| * sqrt(n_slice / n_total)): unit RMS along `dim` (default: every dim but 0), the norm in float32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):
    """SiLU divided by its RMS on a unit Gaussian, E[silu(z)^2]^(1/2) = 0.596 (EDM2 eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """((1-t) a + t b) / sqrt((1-t)^2 + t^2), in the dtype `+` would give (lerp alone does not promote)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype).lerp(b.to(dtype), t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation in which b carries the share t^2 / ((1-t)^2 + t^2) of the energy (EDM2 eq. 103)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / np.sqrt(Na) * (1 - t)
    wb = C / np.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


@torch.no_grad()
def force_weight_norm_(module):
    """Forced weight normalisation (EDM2 section 2.4): w = normalize(w) in place where `forced_weight_norm` is set."""
    weights = [m.weight for m in module.modules() if getattr(m, "forced_weight_norm", False)]
    if not weights:
        return
    norms = [torch.linalg.vector_norm(w.reshape(len(w), -1), dim=1, keepdim=True, dtype=torch.float32) for w in weights]
    torch._foreach_mul_(norms, [w[0].numel() ** -0.5 for w in weights])  # the RMS of each row
    torch._foreach_add_(norms, EPS)
    torch._foreach_div_(weights, [n.view(-1, *[1] * (w.ndim - 1)) for n, w in zip(norms, weights)])
