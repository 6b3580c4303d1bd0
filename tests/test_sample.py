"""sample.py: checkpoints, flags and their one-line errors (the samplers themselves: tests/test_sampler.py)."""

import os

import pytest

from conftest import DIGITS, assert_one_line_exit_2, run_script
from tools.cli import UserError


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_script("sample.py", "--config", "config/digits/E.yaml", "--outdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no usable checkpoint") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be >= 2, got 0"),
    (["--steps", "-2"], "--steps must be >= 2, got -2"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--S_churn", "-1"], "--S_churn must be >= 0, got -1.0"),
    (["--S_noise", "nan"], "--S_noise must be >= 0, got nan"),
    (["--S_max", "-1"], "--S_max must be >= sample.S_min (0.0), got -1.0"),
    (["--S_min", "2", "--S_max", "1"], "--S_max must be >= --S_min (2.0), got 1.0"),
    (["--seeds", "5-2"], "--seeds must look like"),
    (["--score-blocks", "1"], "--score-blocks must be >= 2"),
    (["--epoch", "-1"], "--epoch must be >= 0, got -1"),
    (["--score", "--seeds", "0-38"], "--score needs at least 40 seeds (4 blocks of 10), got 39"),
    (["sample.steps=1"], "sample.steps must be >= 2, got 1"),
    (["--sampler", "ddim"], "--sampler must be one of heun, euler, dpmpp2m, lms"),
    (["--eta", "-0.5"], "--eta must be >= 0, got -0.5"),
    (["--rtol", "0"], "--rtol must be > 0, got 0.0"),
    (["sample.atol=-1"], "sample.atol must be > 0, got -1"),
])
def test_sample_flags_meet_the_config_ranges(tmp_path, flags, message):
    import sample
    with pytest.raises(UserError) as e:
        sample.main(["--config", DIGITS, "--outdir", str(tmp_path), *flags])
    assert str(e.value).startswith(message), str(e.value)
    assert os.listdir(tmp_path) == []  # nothing started


@pytest.mark.parametrize("flags,needle", [
    (["--seeds", "5-2"], "--seeds must look like 0-49999 or 0,5,10-19"),
    (["--steps", "0"], "--steps must be >= 2, got 0"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
])
def test_sample_rejects_bad_flags_before_sampling(tmp_path, flags, needle):
    proc = run_script("sample.py", "--config", DIGITS, "--outdir", str(tmp_path), *flags, check=False)
    assert_one_line_exit_2(proc, needle)
    assert "sampling" not in proc.stdout and os.listdir(tmp_path) == []


def test_sample_checks_the_inception_weights_load_before_sampling(tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(os.urandom(4096))
    outdir = tmp_path / "run"
    outdir.mkdir()
    proc = run_script("sample.py", "--config", DIGITS, "--outdir", str(outdir), "--seeds", "0-9", "--fid", "auto",
                      "--inception-weights", str(weights), check=False)
    # Without the check it would fail later, on the missing checkpoint (or, with one, after sampling).
    assert_one_line_exit_2(proc, f"{weights}: cannot read the Inception weights")
    assert "sampling" not in proc.stdout and os.listdir(outdir) == []


def test_sampler_list_shows_every_sampler_with_order_and_evaluations(capsys):
    import sample
    from tools.sampler import SAMPLERS
    sample.main(["--sampler", "list"])
    lines = capsys.readouterr().out.splitlines()
    for name, info in SAMPLERS.items():
        (line,) = [line for line in lines if line.split()[0] == name]
        per_step = "adaptive" if info.nfe_per_step is None else str(info.nfe_per_step)
        assert line.split()[1:3] == [str(info.order), per_step], line
