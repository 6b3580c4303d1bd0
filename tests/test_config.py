"""Out-of-range numbers stop a run before any work, in one line that names the key (or flag) and its range."""

import glob
import math
import os
import sys

import pytest
import torch

from conftest import ROOT
from tools.cli import UserError
from tools.batches import Batches
from tools.config import build_network, load_config
from tools.edm import LOSSES, EDMLoss
from tools.train_state import TrainState

DIGITS = "config/digits/E.yaml"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*", "*.yaml"))))
def test_every_shipped_config_validates(path):
    load_config(path)


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.batch_size=-4", "train.batch_size must be >= 1, got -4"),
    ("train.epochs=0", "train.epochs must be >= 1, got 0"),
    ("train.epochs=-3", "train.epochs must be >= 1, got -3"),
    ("train.checkpoint_epochs=0", "train.checkpoint_epochs must be >= 1, got 0"),
    ("train.log_steps=0", "train.log_steps must be >= 1, got 0"),
    ("train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("train.lr=.nan", "train.lr must be > 0, got nan"),
    ("train.lr=.inf", "train.lr must be finite, got inf"),
    ("train.batch_gpu=-16", "train.batch_gpu must be >= 0, got -16"),
    ("train.lr_rampup_epochs=-1", "train.lr_rampup_epochs must be >= 0"),
    ("train.lr_ref_epochs=-1", "train.lr_ref_epochs must be >= 0"),
    ("train.betas=[0.9,1.0]", "train.betas must be 2 numbers, each in [0, 1), got [0.9, 1.0]"),
    ("train.betas=[0.9]", "train.betas must be 2 numbers"),
    ("train.betas=[a,0.99]", "train.betas must be 2 numbers"),
    ("train.eps=0", "train.eps must be > 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("train.grid_epochs=-1", "train.grid_epochs must be >= 0"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be >= 1"),
    ("train.label_dropout=1", "train.label_dropout must be in [0, 1), got 1.0"),
    ("ema.classic_halflife_kimg=0", "ema.classic_halflife_kimg must be > 0"),
    ("ema.classic_rampup_ratio=-0.1", "ema.classic_rampup_ratio must be >= 0"),
    ("ema.sigma_rels=[0.05,0.3]", "ema.sigma_rels must be a list of numbers, each in (0, 1/sqrt(12))"),
    ("ema.sigma_rels=[0]", "ema.sigma_rels must be a list of numbers, each in (0, 1/sqrt(12))"),
    ("ema.snapshot_epochs=-1", "ema.snapshot_epochs must be >= 0"),
    ("sample.steps=1", "sample.steps must be >= 2, got 1"),
    ("sample.steps=0", "sample.steps must be >= 2, got 0"),
    ("sample.steps=-2", "sample.steps must be >= 2, got -2"),
    ("sample.sigma_min=0", "sample.sigma_min must be > 0"),
    ("sample.sigma_max=0.001", "sample.sigma_max must be > sample.sigma_min (0.002), got 0.001"),
    ("sample.sigma_max=.inf", "sample.sigma_max must be finite"),
    ("sample.rho=0", "sample.rho must be > 0"),
    ("sample.S_churn=-1", "sample.S_churn must be >= 0"),
    ("sample.S_min=-1", "sample.S_min must be >= 0"),
    ("sample.S_noise=-1", "sample.S_noise must be >= 0"),
    ("sample.batch=0", "sample.batch must be >= 1, got 0"),
    ("sample.num_images=0", "sample.num_images must be >= 1, got 0"),
    ("probe.sigma=0", "probe.sigma must be > 0"),
    ("probe.holdout=1", "probe.holdout must be in [0, 1)"),
    ("probe.C_grid=[]", "probe.C_grid must be a non-empty list of numbers, each > 0"),
    ("probe.C_grid=[0.1,-1]", "probe.C_grid must be a non-empty list of numbers, each > 0"),
    ("probe.grid_sigmas=[0.06,0]", "probe.grid_sigmas must be a non-empty list of numbers, each > 0"),
    ("probe.batch=0", "probe.batch must be >= 1"),
    ("diffusion.sigma_data=0", "diffusion.sigma_data must be > 0"),
    ("diffusion.P_std=0", "diffusion.P_std must be > 0"),
    ("diffusion.logvar_channels=0", "diffusion.logvar_channels must be >= 1"),
    ("network.img_resolution=0", "network.img_resolution must be >= 1"),
    ("network.img_resolution=sixteen", "network.img_resolution must be an integer"),
    ("network.img_resolution=10", "network.img_resolution must be divisible by 2^(len(channel_mult) - 1) = 4"),
    ("network.img_channels=0", "network.img_channels must be >= 1"),
    ("network.model_channels=0", "network.model_channels must be >= 1"),
    ("network.channel_mult=[]", "network.channel_mult must be a non-empty list of numbers, each >= 1"),
    ("network.channel_mult=[1,0]", "network.channel_mult must be a non-empty list of numbers, each >= 1"),
    ("network.channel_mult=[1,1.5]", "network.channel_mult must be a list of integers"),
    ("network.emb_channels=0", "network.emb_channels must be >= 1"),
    ("network.num_blocks=-1", "network.num_blocks must be >= 0"),
    ("network.channels_per_head=0", "network.channels_per_head must be >= 1"),
    ("network.dropout=1", "network.dropout must be in [0, 1)"),
    ("network.label_dim=-1", "network.label_dim must be >= 0"),
    ("network.attn_resolutions=[7]", "network.attn_resolutions must be among the UNet's resolutions [16, 8, 4]"),
])
def test_out_of_range_value_is_one_line_naming_key_and_range(override, message):
    with pytest.raises(UserError) as e:
        load_config(DIGITS, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("given", [
    {"train.batch_gpu=0": 0, "train.keep_checkpoints=0": 0, "train.grid_epochs=0": 0, "train.lr_ref_epochs=0": 0,
     "train.lr_rampup_epochs=0": 0},
    {"sample.steps=2": 2, "sample.S_max=.inf": math.inf, "sample.S_noise=0": 0, "sample.S_churn=0": 0},
    {"ema.snapshot_epochs=0": 0, "ema.classic_rampup_ratio=0": 0, "ema.sigma_rels=[0.01,0.28]": [0.01, 0.28],
     "train.label_dropout=0": 0},
    {"probe.holdout=0": 0, "network.dropout=0": 0, "network.num_blocks=0": 0, "network.label_dim=0": 0},
])
def test_boundary_values_that_mean_something_are_accepted(given):
    """A boundary value with a meaning (0 = off, inf = no limit) is kept as given, not clamped or replaced by a default."""
    cfg = load_config(DIGITS, list(given))
    for override, value in given.items():
        section, name = override.split("=", 1)[0].split(".")
        assert cfg[section][name] == value, override


@pytest.mark.parametrize("resolution,levels,ok", [(12, [1, 2, 2], True), (24, [1, 2, 2, 2], True), (6, [1, 2, 2], False),
                                                  (12, [1, 2, 2, 2], False)])
def test_resolution_rule_is_what_the_unet_needs(resolution, levels, ok):
    """The validator accepts exactly the resolutions the U-Net runs at: divisible by 2^(levels - 1), power of 2 or not."""
    overrides = [f"network.img_resolution={resolution}", f"network.channel_mult={levels}".replace(" ", ""),
                 "network.attn_resolutions=[]", "network.model_channels=8", "network.channels_per_head=8"]
    with torch.device("cpu"):
        if ok:
            net = build_network(load_config(DIGITS, overrides))
            x = torch.randn(2, 1, resolution, resolution)
            assert net(x, torch.ones(2)).shape == x.shape
        else:
            with pytest.raises(UserError, match="divisible by"):
                load_config(DIGITS, overrides)
            cfg = load_config(DIGITS)
            cfg["network"].update(img_resolution=resolution, channel_mult=levels, attn_resolutions=[], model_channels=8,
                                  channels_per_head=8)
            with pytest.raises(RuntimeError):  # what the validator saves the user from
                build_network(cfg)(torch.randn(2, 1, resolution, resolution), torch.ones(2))


def with_unet(tmp_path, name):
    """A copy of the digits config whose `unet:` is `name`."""
    path = tmp_path / "unet.yaml"
    path.write_text(open(os.path.join(ROOT, DIGITS)).read().replace("unet: unetE.py", f"unet: {name}"))
    return str(path)


def test_unet_must_be_a_network_file_and_is_not_imported_otherwise(tmp_path):
    imported_before = "sample" in sys.modules
    with pytest.raises(UserError) as e:
        load_config(with_unet(tmp_path, "sample.py"))
    message = str(e.value)
    assert message.startswith("unet: 'sample.py' is not a network file") and "unetC.py, unetE.py, unetG.py" in message
    assert imported_before or "sample" not in sys.modules
    for name in ("tools/config.py", "../unetE.py", "unetE", "unetZ.py"):
        with pytest.raises(UserError, match="is not a network file"):
            load_config(with_unet(tmp_path, name))


class ScaledSigma(EDMLoss):
    """A loss that draws every noise level `factor` times EDMLoss's, with an argument of its own."""

    def __init__(self, factor=0.5, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def sigma(self, normal):
        return self.factor * super().sigma(normal)


def test_a_registered_loss_is_what_training_draws_and_its_arguments_are_diffusion_keys(monkeypatch):
    """`loss: NAME` picks a class of tools.edm.LOSSES; its constructor's arguments (its own and, through **kwargs, EDMLoss's)
    are the diffusion keys, checked as network keys are; the training step's noise levels are the class's sigma()."""
    monkeypatch.setitem(LOSSES, "ScaledSigma", ScaledSigma)
    small = ["network.model_channels=8", "network.channel_mult=[1]", "network.attn_resolutions=[]", "train.batch_size=8"]
    cfg = load_config(DIGITS, ["loss=ScaledSigma", "diffusion.factor=0.25", "diffusion.P_mean=-1.0", *small])
    assert cfg["loss"] == "ScaledSigma" and cfg["diffusion"]["factor"] == 0.25 and cfg["diffusion"]["P_std"] == 1.2
    for bad, message in (("diffusion.facter=1", "unknown key diffusion.facter"), ("diffusion.P_std=0", "diffusion.P_std must be")):
        with pytest.raises(UserError, match=message):
            load_config(DIGITS, ["loss=ScaledSigma", bad])
    with pytest.raises(UserError, match=r"loss: 'Nope' is not a loss of tools/edm.py; allowed: EDMLoss, ScaledSigma"):
        load_config(DIGITS, ["loss=Nope"])
    sigmas = []
    for loss in (["loss=ScaledSigma", "diffusion.factor=0.25"], ["loss=EDMLoss"]):
        cfg = load_config(DIGITS, [*loss, "diffusion.P_mean=-1.0", *small])
        data, state = Batches(cfg, 0, 1, torch.device("cpu")), TrainState(cfg, torch.device("cpu"))
        log = type("Log", (), dict(add_losses=lambda self, loss, sigma: sigmas.append(sigma.clone()), add_augmented=lambda *a: None,
                                   add_step=lambda *a: None))()
        state.step(state.edm, data.batch(0), data.micro, 0.01, log)
    normal = data.batch(0).normals.rows(slice(0, 8)).randn()  # the step's first draw: the noise levels
    torch.testing.assert_close(sigmas[1], (normal * 1.2 - 1.0).exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sigmas[0], 0.25 * sigmas[1], rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------
# Command-line flags: the same ranges, named as typed.


# ----------------------------------------------------------------------------------------------------
# End to end: exit 2, one line on stderr, no traceback, nothing done.


