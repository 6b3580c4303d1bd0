"""probe.py: deterministic features and accuracy, a cache that spares the network, block names that match
the network, selection that never sees the test split, and a digits model that probes far above chance."""

import json
import os

import pytest
import torch

from conftest import COND_EPOCHS, DIGITS, PROBE_BLOCK, accuracy_of, cached_features, copy_run, run_script
from tools.cli import UserError


def test_cli_on_digits_beats_chance_by_a_wide_margin(trained_digits_run, tmp_path):
    run = copy_run(trained_digits_run, tmp_path / "run")
    lines = run_script("probe.py", "--config", DIGITS, "--outdir", run).stdout.splitlines()
    acc = accuracy_of(lines[0])
    assert acc > 80, lines  # chance: 10%; the 32 pooled channels of this 4-epoch model reach ~95%
    assert lines[1].startswith("raw pixels:")
    with open(os.path.join(run, "checkpoints", "epoch_4.probe.json")) as f:
        result = json.load(f)[f"{PROBE_BLOCK}@sigma=0.06/classic/sklearn"]
    assert result["test_accuracy_pct"] == pytest.approx(acc, abs=0.005)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run, "tensorboard")).Reload()
    (scalar,) = events.Scalars(f"probe/{PROBE_BLOCK}@sigma=0.06/classic")
    assert (scalar.step, scalar.value) == (result["t_img"], pytest.approx(acc, abs=0.005))


def test_probe_reads_a_conditional_run_without_its_labels(cond_run, tmp_path, capsys):
    """probe.py takes its features from the unconditional forward (the label dropped) of a conditional network: the
    cached features are those of the label-dropped forward, which differ from the forward given the true labels."""
    import probe
    from tools.data import load_dataset, to_float
    from tools.edm import Denoiser
    from tools.rng import PROBE, image_normals
    from tools.runs import load_net, resolve
    run = copy_run(cond_run, tmp_path / "run", epoch=COND_EPOCHS)
    capsys.readouterr()
    probe.main(["--outdir", run])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("test accuracy:") and float(first.split()[2].rstrip("%")) > 30, first  # chance: 10%

    cfg, _ = resolve(None, run)
    net, _ = load_net(cfg, run, COND_EPOCHS, "classic", "cpu")
    images, labels = (x[:32] for x in load_dataset(cfg, "train"))
    pooled = []
    net.dec[PROBE_BLOCK.split(".")[1]].register_forward_hook(lambda m, i, o: pooled.append(o.mean(dim=(2, 3))))
    x = to_float(images) + 0.06 * image_normals((PROBE, 0), range(32), images.shape[1:])  # the training split's stream
    one_hot = torch.nn.functional.one_hot(labels, cfg["network"]["label_dim"]).float()
    with torch.no_grad():
        for given in (torch.zeros_like(one_hot), one_hot):
            Denoiser(net, cfg["diffusion"]["sigma_data"])(x, 0.06, class_labels=given)
    dropped, labelled = pooled
    cached = cached_features(run, epoch=COND_EPOCHS)[:32]
    torch.testing.assert_close(cached, dropped, rtol=1e-5, atol=1e-6)
    assert (labelled - dropped).abs().max() > 100 * (cached - dropped).abs().max() + 1e-4


@pytest.mark.parametrize("flags,message", [
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--sigma", "-0.5"], "--sigma must be > 0, got -0.5"),
    (["--epoch", "-2"], "--epoch must be >= 0, got -2"),
    (["probe.holdout=1.5"], "probe.holdout must be in [0, 1)"),
])
def test_probe_flags_meet_the_config_ranges(tmp_path, flags, message):
    import probe
    with pytest.raises(UserError) as e:
        probe.main(["--config", DIGITS, "--outdir", str(tmp_path), *flags])
    assert str(e.value).startswith(message), str(e.value)
