"""tools/mp.py: each primitive keeps unit RMS, and mp_sum / mp_cat give b the energy share their docstrings state."""

import pytest
import torch

from tools.mp import mp_cat, mp_silu, mp_sum, normalize


def share(t):
    return t ** 2 / ((1 - t) ** 2 + t ** 2)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_keeps_unit_rms_and_gives_b_its_share(t):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, 64, generator=g), torch.randn(4000, 64, generator=g)
    out = mp_sum(a, b, t)
    assert out.square().mean().item() == pytest.approx(1, abs=0.01)
    b_part = mp_sum(torch.zeros_like(a), b, t)  # what b contributes
    assert b_part.square().mean().item() == pytest.approx(share(t), abs=0.01)


@pytest.mark.parametrize("t,Na,Nb", [(0.5, 64, 64), (0.5, 96, 32), (0.3, 16, 112)])
def test_mp_cat_keeps_unit_rms_and_gives_b_its_share_whatever_the_widths(t, Na, Nb):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2000, Na, generator=g), torch.randn(2000, Nb, generator=g)
    out = mp_cat(a, b, dim=1, t=t)
    total = out.square().sum(1).mean().item()
    assert total / (Na + Nb) == pytest.approx(1, abs=0.01)
    assert out[:, Na:].square().sum(1).mean().item() / total == pytest.approx(share(t), abs=0.01)


def test_normalize_and_mp_silu_give_unit_rms():
    x = torch.randn(8, 3, 5, 5) * 7
    assert torch.allclose(normalize(x).square().mean(dim=(1, 2, 3)), torch.ones(8), atol=1e-3)
    assert mp_silu(torch.randn(200_000)).square().mean().item() == pytest.approx(1, abs=0.01)
