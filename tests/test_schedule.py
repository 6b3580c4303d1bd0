"""tools/schedule.py: the learning-rate schedule and the per-step draws, as functions of the step and images seen."""

import pytest
import torch

from tools.schedule import epoch_order, learning_rate, seed_for, step_draws


def test_learning_rate_follows_the_edm2_schedule():
    """ref / sqrt(max(t / t_ref, 1)), times a linear ramp-up; t_ref = 0 means constant after the ramp (Config C)."""
    assert learning_rate(0, 1e-2, 1000, 4000) == 0
    assert learning_rate(500, 1e-2, 1000, 4000) == pytest.approx(5e-3)
    assert learning_rate(4000, 1e-2, 1000, 4000) == pytest.approx(1e-2)
    assert learning_rate(16000, 1e-2, 1000, 4000) == pytest.approx(5e-3)   # 1 / sqrt(4)
    assert learning_rate(16000, 4e-4, 1000, 0) == pytest.approx(4e-4)      # Config C: constant after warm-up
    assert learning_rate(500, 1e-2, 0, 0) == 1e-2                          # no ramp-up


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    a, b = epoch_order(0, 3, 100), epoch_order(0, 3, 100)
    assert torch.equal(a, b) and torch.equal(a.sort().values, torch.arange(100))
    assert not torch.equal(a, epoch_order(0, 4, 100)) and not torch.equal(a, epoch_order(1, 3, 100))


def test_step_draws_are_a_function_of_seed_and_step():
    one = step_draws(0, 7, 8, (1, 4, 4), -1.2, 1.2, "cpu")
    again = step_draws(0, 7, 8, (1, 4, 4), -1.2, 1.2, "cpu")
    other = step_draws(0, 8, 8, (1, 4, 4), -1.2, 1.2, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(one, again))
    assert not torch.equal(one[1], other[1])
    sigma = step_draws(0, 0, 100_000, (1,), -1.2, 1.2, "cpu")[0]
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.02) and sigma.log().std().item() == pytest.approx(1.2, abs=0.02)


def test_seed_for_is_stable_and_distinguishes_its_inputs():
    assert seed_for(0, 1) == seed_for(0, 1) and seed_for(0, 1) != seed_for(1, 0) and 0 <= seed_for(5, 6, 7) < 2 ** 63
