"""tools/schedule.py: the learning-rate schedule as a function of the images seen."""

import pytest

from tools.schedule import learning_rate


def test_learning_rate_follows_the_edm2_schedule():
    """ref / sqrt(max(t / t_ref, 1)), times a linear ramp-up; t_ref = 0 means constant after the ramp (Config C)."""
    assert learning_rate(0, 1e-2, 1000, 4000) == 0
    assert learning_rate(500, 1e-2, 1000, 4000) == pytest.approx(5e-3)
    assert learning_rate(4000, 1e-2, 1000, 4000) == pytest.approx(1e-2)
    assert learning_rate(16000, 1e-2, 1000, 4000) == pytest.approx(5e-3)   # 1 / sqrt(4)
    assert learning_rate(16000, 4e-4, 1000, 0) == pytest.approx(4e-4)      # Config C: constant after warm-up
    assert learning_rate(500, 1e-2, 0, 0) == 1e-2                          # no ramp-up
