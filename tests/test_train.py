"""train.py: bad input ends in one line before anything is written; --dry-run prints the config and the parameter count."""

import os

import pytest

from conftest import DIGITS, ROOT, run_script


@pytest.mark.parametrize("args,needle", [
    (["train.epohcs=2"], "unknown key train.epohcs"),
    (["train.epochs=two"], "train.epochs must be an integer"),
    (["unet=unetX.py"], "unet: 'unetX.py' is not a network file"),
    (["epochs=2"], "must look like section.key=value"),
    (["data.dataset=cifar10", "data.root=/nonexistent", "network.img_resolution=32", "network.img_channels=3"], "cifar10 not found"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, needle):
    proc = run_script("train.py", "--config", DIGITS, "--outdir", str(tmp_path), *args, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_missing_network_file_exits_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(open(os.path.join(ROOT, "config/digits/E.yaml")).read().replace("unet: unetE.py", "unet: unetZ.py"))
    proc = run_script("train.py", "--config", str(cfg), "--dry-run", check=False)
    assert proc.returncode == 2 and "unetZ.py" in proc.stderr and "unetC.py, unetE.py, unetG.py" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_config_and_count():
    proc = run_script("train.py", "--config", "config/cifar10/G.yaml", "--dry-run")
    assert "unet: unetG.py" in proc.stdout and "parameters: 39,544,093" in proc.stdout  # 39,542,685 + the augmentation layer
