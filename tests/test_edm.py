"""tools/edm.py: the preconditioned denoiser and the loss with its learned uncertainty."""

import torch

from tools.edm import EDMLoss


def test_uncertainty_is_float32_under_autocast():
    """u(sigma) leaves autocast: exp(u) scales every sample's loss, and bf16 would cost up to ~1%."""
    loss = EDMLoss()
    torch.nn.init.normal_(loss.logvar_linear.weight)
    sigma = torch.logspace(-2, 1.9, 64)
    reference = loss.uncertainty(sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = loss.uncertainty(sigma)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, reference, rtol=0, atol=0)
