"""tools/cli.py: flag parsers, and user errors printed once in one line (also under torchrun)."""

import os

import pytest

from tools.cli import UserError, parse_seeds


def test_a_mistake_under_torchrun_is_printed_once(trained_digits_run):
    """Both ranks meet the same missing checkpoint: one line from rank 0, none from rank 1."""
    import subprocess
    import sys

    from conftest import ROOT
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", "sample.py",
           "--outdir", trained_digits_run, "--epoch", "3", "--seeds", "0-3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == [f"error: no checkpoint for epoch 3 in {os.path.join(trained_digits_run, 'checkpoints')} (available: 2, 4)"], proc.stderr


@pytest.mark.parametrize("text", ["5-2", "-3", "", "1,,2", "a-b", "0-", "3--5", "0-1.5"])
def test_bad_seeds_are_one_line(text):
    from sample import parse_seeds
    with pytest.raises(UserError, match=r"--seeds must look like 0-49999 or 0,5,10-19 \(non-negative integers"):
        parse_seeds(text)


def test_good_seeds():
    from sample import parse_seeds
    assert parse_seeds(" 0 - 2,7,7,4") == [0, 1, 2, 4, 7]


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
