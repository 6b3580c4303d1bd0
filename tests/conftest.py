import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_script(*args, env=None, check=True, timeout=600):
    """Run a repository script the way a user would; returns the CompletedProcess (text output)."""
    import subprocess
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory):
    """A digits Config E run trained for 4 epochs (about 30 s on 2 cores), shared by the tests that need weights."""
    outdir = str(tmp_path_factory.mktemp("digits-E"))
    run_script("train.py", "--config", "config/digits/E.yaml", "--outdir", outdir, "train.epochs=4", "train.grid_epochs=0", "train.eval_epochs=0",
               "train.checkpoint_epochs=2")
    return outdir


@pytest.fixture(scope="session")
def metric_cache(tmp_path_factory):
    """A data.cache shared by the tests that score samples, so the digits classifier trains once (~20 s)."""
    return str(tmp_path_factory.mktemp("cache"))
