"""The compiled paths (torch.compile, inductor on the CPU) against eager on the same weights, data and noise:
training steps (forced weight normalisation and the loss inside the compiled step) and sampling."""

import os

import numpy as np
import torch
from PIL import Image

from conftest import DIGITS
from tools.batches import Batches
from tools.config import load_config
from tools.generate import image_path
from tools.train_state import TrainState

TINY = ["network.model_channels=8", "train.batch_size=32"]


class NoLog:
    def add_losses(self, loss, sigma):
        self.loss = loss.detach().clone()

    def add_augmented(self, vectors):
        pass

    def add_step(self, grad_norm, finite):
        self.grad_norm = grad_norm.detach().clone()


def test_compiled_training_steps_match_eager():
    """Three optimizer steps, one eager and one compiled state from the same initialisation: per-image losses and
    gradient norms agree to float32 rounding (1e-5 relative on the first step, before any update; seen 2e-7), and
    the weights after three Adam steps to 1e-3 (seen 1.1e-4: Adam's normalised update makes rounding count where
    a gradient is near 0; weights are ~1 in size)."""
    cfg = load_config(DIGITS, TINY)
    device = torch.device("cpu")
    data = Batches(cfg, 0, 1, device)
    eager, compiled = TrainState(cfg, device), TrainState(cfg, device)
    compiled.edm.net.compile()
    for step in range(3):
        logs = []
        for state in (eager, compiled):
            logs.append(NoLog())
            state.step(state.edm, data.batch(step), data.micro, 0.01, logs[-1])
        if step == 0:
            torch.testing.assert_close(logs[1].loss, logs[0].loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(logs[1].grad_norm, logs[0].grad_norm, rtol=1e-5, atol=0)
    for a, b in zip(eager.edm.parameters(), compiled.edm.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-3)


def test_sample_compile_writes_the_eager_images(trained_digits_run, tmp_path, capsys):
    """sample.py --compile on the same weights and seeds: every pixel within one 8-bit level of the eager image
    (float32 rounding of fused kernels through 6 Heun steps; seen: identical but for rounding at level boundaries)."""
    import sample  # the entry script, in this process: the compiled graph is what is tested, not start-up
    args = ["--config", DIGITS, "--outdir", trained_digits_run, "--seeds", "0-15", "--steps", "6", "--batch", "16"]
    sample.main([*args, "--out", str(tmp_path / "eager")])
    sample.main([*args, "--compile", "--out", str(tmp_path / "compiled")])
    read = lambda folder: np.stack([np.asarray(Image.open(image_path(str(folder), s)), dtype=np.int16) for s in range(16)])
    eager, compiled = read(tmp_path / "eager"), read(tmp_path / "compiled")
    assert np.abs(eager - compiled).max() <= 1 and (eager == compiled).mean() > 0.99
    assert os.path.exists(f"{tmp_path / 'compiled'}.grid.png")
