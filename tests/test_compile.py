"""The compiled paths (torch.compile, inductor on the CPU) against eager on the same weights, data and noise: the
training graph (forced weight normalisation, backward) and the sampling graph (eval mode) of one small network,
and the --compile flag of sample.py reaching the network. Inductor's compile time grows with the number of layers,
not their width (on 2 CPU cores, cold: ~90 s for the training graph of two resolutions, ~50 s for one), so the
network here has one resolution with its encoder, decoder, skip and attention blocks, at 8 channels."""

import torch

from conftest import DIGITS
from tools.batches import Batches
from tools.config import load_config
from tools.edm import Denoiser
from tools.generate import sample_seeds
from tools.train_state import TrainState

SMALL = ["network.model_channels=8", "network.channel_mult=[1]", "network.attn_resolutions=[16]", "train.batch_size=32"]


class NoLog:
    def add_losses(self, loss, sigma):
        self.loss = loss.detach().clone()

    def add_augmented(self, vectors):
        pass

    def add_step(self, grad_norm, finite):
        self.grad_norm = grad_norm.detach().clone()


def test_compiled_training_steps_and_sampling_match_eager():
    """Three optimizer steps, one eager and one compiled state from the same initialisation: per-image losses and
    gradient norms agree to float32 rounding (1e-5 relative on the first step, before any update; seen 2e-7), and
    the weights after three Adam steps to 1e-3 (seen 1.1e-4: Adam's normalised update makes rounding count where
    a gradient is near 0; weights are ~1 in size). Then the compiled network in eval mode, given the eager weights,
    samples the eager images to 1e-4 (6 Heun steps from the same seeds; a pixel level of 8 bits is 7.8e-3)."""
    cfg = load_config(DIGITS, [*SMALL, "sample.steps=6"])
    device = torch.device("cpu")
    data = Batches(cfg, 0, 1, device)
    eager, compiled = TrainState(cfg, device), TrainState(cfg, device)
    compiled.edm.compile()  # the model the training loop steps: network, preconditioning and loss
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
    compiled.edm.net.load_state_dict(eager.edm.net.state_dict())
    compiled.edm.net.compile()  # as sample.py --compile does
    images = []
    for state in (eager, compiled):
        state.edm.net.eval()
        with torch.no_grad():
            images.append(sample_seeds(Denoiser(state.edm.net, cfg["diffusion"]["sigma_data"]), cfg, range(8), device))
    with torch.no_grad():  # the comparison is not vacuous: three steps moved the output layer off its zero start
        assert eager.edm.net(torch.randn(8, 1, 16, 16), torch.zeros(8)).std() > 1e-2
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-4)


def test_sample_compile_flag_compiles_the_network(trained_digits_run, tmp_path, monkeypatch):
    """sample.py --compile hands the network it samples with to torch.compile (recorded here, then run eagerly; the
    compiled graph's numerics are the test above), and without the flag nothing is compiled."""
    import sample
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *a, **k: compiled.append(type(module).__name__))
    args = ["--config", DIGITS, "--outdir", trained_digits_run, "--seeds", "0-3", "--steps", "3", "--batch", "4"]
    sample.main([*args, "--out", str(tmp_path / "eager")])
    assert compiled == []
    sample.main([*args, "--compile", "--out", str(tmp_path / "compiled")])
    assert compiled == ["UNet"]
