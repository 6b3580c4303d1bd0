"""probe.py: deterministic features and accuracy, a cache that spares the network, block names that match
the network, selection that never sees the test split, and a digits model that probes far above chance."""

import json
import os

import pytest

from conftest import DIGITS, PROBE_BLOCK, accuracy_of, copy_run, run_script
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


def test_probe_reads_a_conditional_run(cond_run, tmp_path, capsys):
    """probe.py takes its features from the unconditional forward (the label dropped) of a conditional network."""
    import probe
    capsys.readouterr()
    probe.main(["--outdir", cond_run])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("test accuracy:") and float(first.split()[2].rstrip("%")) > 30, first  # chance: 10%


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
