"""tools/batches.py: the training set and this rank's share of each batch; a config that cannot feed the network ends in one line."""

import os

from conftest import COND, run_script


def test_too_few_label_dims_for_the_classes_is_one_line(tmp_path):
    proc = run_script("train.py", "--config", COND, "--outdir", str(tmp_path), "network.label_dim=5", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "set network.label_dim=10" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
