"""tools/train_state.py: non-finite gradients are zeroed and counted exactly, step by step, without a host sync per step."""

import os

import pytest
import torch

from conftest import DIGITS, ROOT
from tools.batches import Batches
from tools.cli import UserError
from tools.config import load_config
from tools.train_state import TrainState

LOG_STEPS = 10


class NoLog:
    def add_losses(self, loss, sigma):
        pass

    def add_step(self, grad_norm, finite):
        pass


def run_steps(tmp_path, bad_steps, steps, limit=3):
    """Train `steps` steps with NaN images at `bad_steps`, checking at every LOG_STEPS-th step as the loop does.
    Returns (the step whose check stopped the run or None, the state)."""
    cfg = load_config(os.path.join(ROOT, DIGITS), ["network.model_channels=8", "train.batch_size=32",
                                                   f"train.max_nonfinite_steps={limit}"])
    device = torch.device("cpu")
    data, state = Batches(cfg, 0, 1, device), TrainState(cfg, device)
    for step in range(1, steps + 1):
        y, *rest = data.batch(step - 1)
        if step in bad_steps:
            y = torch.full_like(y, float("nan"))
        state.step(state.edm, (y, *rest), data.micro, 1e-3, NoLog())
        if step % LOG_STEPS == 0:
            try:
                state.check_gradients(str(tmp_path))
            except UserError as e:
                assert f"non-finite for {limit} consecutive steps" in str(e)
                return step, state
    return None, state


def test_a_run_of_bad_steps_between_two_checks_stops_the_run(tmp_path):
    """Steps 2-4 bad, then good again: the run is caught at the next check, though no bad step is left by then."""
    stopped, state = run_steps(tmp_path, {2, 3, 4}, 10)
    assert stopped == 10 and state.nonfinite_steps == 3
    assert all(torch.isfinite(p).all() for p in state.params)  # the bad gradients were zeroed


def test_bad_steps_that_never_make_a_run_of_the_limit_do_not_stop_it(tmp_path):
    stopped, state = run_steps(tmp_path, {2, 3, 5, 6, 8, 9, 11, 12}, 20)
    assert stopped is None and state.nonfinite_steps == 8


def test_a_run_across_a_check_is_counted_whole(tmp_path):
    """Steps 9, 10, 11 are one run of 3: the check at 10 has seen 2; the check at 20 sees all 3."""
    stopped, _ = run_steps(tmp_path, {9, 10, 11}, 20)
    assert stopped == 20


@pytest.mark.parametrize("limit", [1])
def test_a_single_bad_step_with_limit_one_stops(tmp_path, limit):
    assert run_steps(tmp_path, {7}, 10, limit=limit)[0] == 10


def test_a_run_resumes_in_another_precision_with_a_note(tmp_path, capsys):
    """bf16 -> fp16 (whose GradScaler has state the bf16 checkpoint lacks) -> bf16: each goes on from the checkpoint."""
    import train
    run = str(tmp_path / "run")
    args = ["--config", os.path.join(ROOT, DIGITS), "--outdir", run, "network.model_channels=8", "train.batch_size=256",
            "data.max_images=256", "train.grid_epochs=0", "train.eval_epochs=0", "train.checkpoint_epochs=1", "train.gns=false"]
    for epochs, precision in ((1, "bf16"), (2, "fp16"), (3, "bf16")):
        capsys.readouterr()
        train.main([*args, f"train.epochs={epochs}", f"train.precision={precision}"])
        out = capsys.readouterr().out
        assert f"done: {epochs * 256 / 1000:.1f} kimg" in out
        if epochs > 1:
            assert f"resumed {run} at epoch {epochs - 1}" in out and "trained in" in out and f"goes on in {precision}" in out
    ckpt = torch.load(os.path.join(run, "checkpoints", "epoch_3.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["net"].values()) and ckpt["scaler"] == {}
