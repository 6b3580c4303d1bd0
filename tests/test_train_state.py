"""tools/train_state.py: a step with non-finite gradients changes nothing and is counted exactly, without a host sync per step;
resuming in another precision."""

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
        batch = data.batch(step - 1)
        if step in bad_steps:
            batch = batch._replace(images=torch.full_like(batch.images, float("nan")))
        state.step(state.edm, batch, data.micro, 1e-3, NoLog())
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
    assert all(torch.isfinite(p).all() for p in state.params)  # the bad steps were skipped


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_nonfinite_step_changes_neither_weights_nor_optimizer(precision):
    """A NaN image makes every gradient NaN: the step leaves the weights, Adam's moments and its step count as they
    were (fused Adam skips it: found_inf in fp32 and bf16, GradScaler in fp16), and counts it. Config C: no forced
    weight normalisation, which would rescale the weights by its eps after any step."""
    cfg = load_config(os.path.join(ROOT, "config/digits/C.yaml"), ["network.model_channels=8", "train.batch_size=32",
                                                                   f"train.precision={precision}"])
    device = torch.device("cpu")
    data, state = Batches(cfg, 0, 1, device), TrainState(cfg, device)
    state.step(state.edm, data.batch(0), data.micro, 1e-3, NoLog())
    weights = [p.detach().clone() for p in state.params]
    moments = {k: v.clone() for k, v in state.opt.state[state.params[0]].items()}
    good = state.nonfinite_steps
    batch = data.batch(1)
    state.step(state.edm, batch._replace(images=torch.full_like(batch.images, float("nan"))), data.micro, 1e-3, NoLog())
    assert state.nonfinite_steps == good + 1
    assert all(torch.equal(a, b) for a, b in zip(weights, state.params))
    assert all(torch.equal(v, state.opt.state[state.params[0]][k]) for k, v in moments.items())


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


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Records every call that makes the host wait for the device on a GPU: reading a tensor's values (item, tolist,
    bool/float/int of a tensor, nonzero, cpu, numpy) and copies to a device that do not say non_blocking=True
    (from pageable memory such a copy waits for the device's queue). On a CPU they cost nothing, but the code path is
    the GPU's, so a CPU run shows where a GPU run would wait."""

    READS = {"item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "argwhere"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        moves = name in ("to", "copy_", "cuda") and any(isinstance(a, (str, torch.device)) for a in (*args[1:], kwargs.get("device")))
        if name in self.READS or (moves and not kwargs.get("non_blocking")):
            import traceback
            self.calls.append((name, "".join(traceback.format_stack(limit=6)[:-1])))
        return func(*args, **kwargs)


def test_a_training_step_never_waits_for_the_device(tmp_path):
    """Six optimizer steps of a run with augmentation (every transform and the x-flip), dropout, two micro-batches and
    the gradient noise scale on, through the training loop's own step: no call that would make a GPU's host wait."""
    from tools.training import Run
    cfg = load_config(os.path.join(ROOT, DIGITS), [
        "network.model_channels=8", "network.dropout=0.1", "data.max_images=512", "train.batch_size=64", "train.batch_gpu=32",
        "augment.p=0.5", "augment.xflip=0.5", "train.eval_epochs=0", "train.grid_epochs=0", f"train.outdir={tmp_path}"])
    run = Run(cfg, torch.device("cpu"))
    assert run.state.noise_scale is not None and run.state.noise_scale.available and run.data.steps_per_epoch == 8
    run.train_step()  # the epoch's data order is copied once, at its first step
    with HostSyncs() as syncs:
        for _ in range(6):
            run.train_step()
    assert not syncs.calls, "\n".join(f"{name}:\n{where}" for name, where in syncs.calls[:3])
    run.log.close()
