"""tools/ema.py: the classic EMA counts its half-life in images, and the EMAs average the network's weights."""

import math

import pytest
import torch

from tools.ema import EMAs, classic_ema_beta

EMA_CFG = dict(classic_halflife_kimg=1.0, classic_rampup_ratio=0.0, sigma_rels=[0.05, 0.10], snapshot_dtype="float32")


@pytest.mark.parametrize("batch", [100, 250])
def test_classic_halflife_is_counted_in_images(batch):
    """After one half-life of images the initial weights keep weight 1/2, whatever the batch size."""
    steps = 1000 // batch
    keep = math.prod(classic_ema_beta((k + 1) * batch, batch, 1000, 0.0) for k in range(steps))
    assert keep == pytest.approx(0.5, rel=1e-12)


def test_classic_warmup_caps_the_halflife_at_a_fraction_of_the_images_seen():
    """Early on the half-life is rampup_ratio * images seen: 5% of 1M images = 50k images, not the 500k asked for."""
    assert classic_ema_beta(1_000_000, 500, 500_000, 0.05) == pytest.approx(0.5 ** (500 / 50_000))
    assert classic_ema_beta(100_000_000, 500, 500_000, 0.05) == pytest.approx(0.5 ** (500 / 500_000))


def test_emas_average_the_weights():
    """The power EMAs forget the initialisation at the first step (beta = 0) and every EMA converges to weights that
    stop changing; the state dict round-trips."""
    net = torch.nn.Linear(3, 2, bias=False)
    emas = EMAs(net, EMA_CFG)
    with torch.no_grad():
        net.weight.fill_(2.0)
    emas.update(net, 100, 100)
    for ema in emas.power:
        assert torch.equal(ema.ema_model.weight, net.weight)
    for k in range(2, 200):
        emas.update(net, 100 * k, 100)
    torch.testing.assert_close(emas.classic.ema_model.weight, net.weight, rtol=0, atol=1e-5)
    other = EMAs(torch.nn.Linear(3, 2, bias=False), EMA_CFG)
    other.load_state_dict(emas.state_dict())
    assert torch.equal(other.classic.ema_model.weight, emas.classic.ema_model.weight)
