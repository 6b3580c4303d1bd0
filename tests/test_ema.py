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


def kept_weight(halflife_img, rampup_ratio, t1, t2, batch):
    """The weight the classic EMA at t2 images keeps on the network it averaged up to t1: the network's weight is
    1 until t1 and 0 after (float64, so rounding stays far below what is compared)."""
    net = torch.nn.Linear(1, 1, bias=False, dtype=torch.float64)
    torch.nn.init.ones_(net.weight)
    emas = EMAs(net, dict(EMA_CFG, classic_halflife_kimg=halflife_img / 1000, classic_rampup_ratio=rampup_ratio, sigma_rels=[]))
    torch.nn.init.zeros_(net.weight)
    for t in range(t1 + batch, t2 + 1, batch):
        emas.update(net, t, batch)
    return emas.classic.ema_model.weight.item()


def test_classic_warmup_halflife_is_a_fraction_of_the_images_seen():
    """During warm-up the half-life at t images is ratio * t, so d ln(w) = -ln 2 dt / (ratio t): the weight kept at t2
    on the network of t1 is (t1 / t2)^(ln 2 / ratio). Past the warm-up (ratio * t > half-life) the configured
    half-life holds: one half-life of images halves the weight."""
    ratio, t1, t2, batch = 0.05, 10_000, 15_000, 5
    closed_form = (t1 / t2) ** (math.log(2) / ratio)  # 3.6e-3
    # Each step decays by the half-life at its end, ratio * t, not averaged over the step: to first order in batch / t
    # the log-weight comes out (ln 2 / ratio) (batch / 2) (1 / t1 - 1 / t2) = 1.2e-3 high (observed: 1.16e-3).
    discretisation = math.log(2) / ratio * batch / 2 * (1 / t1 - 1 / t2)
    assert kept_weight(10 ** 9, ratio, t1, t2, batch) == pytest.approx(closed_form, rel=2 * discretisation)
    # ratio * t1 = 50k images > the 10k half-life: 10k more images halve the weight, however they are batched
    assert kept_weight(10_000, ratio, 1_000_000, 1_010_000, 500) == pytest.approx(0.5, rel=1e-12)


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
