"""Shared fixtures (trained runs) and helpers of the test suite; puts the repository root on the import path."""

import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's modules, as its scripts see them when run from the root

from tools.cli import UserError  # noqa: E402
from tools.config import load_config  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
DIGITS = "config/digits/E.yaml"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run_script(*args, env=None, check=True, timeout=600):
    """Run a repository script the way a user would; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_here(*args):
    """train.py's main in this process: the run a user's command makes, without an interpreter's start-up (seconds)."""
    import train
    train.main([str(a) for a in args])


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory):
    """A digits Config E run trained for 4 epochs (about 30 s on 2 cores), shared by the tests that need weights."""
    outdir = str(tmp_path_factory.mktemp("digits-E"))
    train_here("--config", "config/digits/E.yaml", "--outdir", outdir, "train.epochs=4", "train.grid_epochs=0", "train.eval_epochs=0",
               "train.checkpoint_epochs=2")
    return outdir


@pytest.fixture(scope="session")
def metric_cache(tmp_path_factory):
    """A data.cache shared by the tests that score samples, so the digits classifier trains once (~20 s)."""
    return str(tmp_path_factory.mktemp("cache"))


THREE_EMA_FAST = ["network.model_channels=8", "train.batch_size=128", "train.grid_epochs=0", "train.eval_epochs=0", "train.checkpoint_epochs=2",
        "ema.snapshot_epochs=0.5"]


@pytest.fixture(scope="session")
def three_ema_run(tmp_path_factory):
    """6 epochs of digits E tracking power EMAs at sigma_rel 0.05, 0.10 and, directly, the target 0.075."""
    outdir = tmp_path_factory.mktemp("three_ema")
    train_here("--config", "config/digits/E.yaml", "--outdir", outdir, *THREE_EMA_FAST, "train.epochs=6",
               "ema.sigma_rels=[0.05,0.10,0.075]")
    return outdir


def flat(state):
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


COND = "config/digits/E-cond.yaml"
COND_EPOCHS = 8  # ~1 min on 2 cores; its samples are of the requested class about half the time (chance: 10%)


@pytest.fixture(scope="session")
def cond_run(tmp_path_factory):
    """Conditional digits Config E as configured (label dropout 0.1), trained briefly: checkpoints at epochs 4
    (the autoguidance guide) and 8, the training grid at the end."""
    outdir = str(tmp_path_factory.mktemp("digits-E-cond"))
    train_here("--config", COND, "--outdir", outdir, f"train.epochs={COND_EPOCHS}", "train.checkpoint_epochs=4",
               "train.keep_checkpoints=0", f"train.grid_epochs={COND_EPOCHS}", "train.log_steps=11", "ema.snapshot_epochs=4", "train.eval_epochs=0")
    return outdir


def sample_in_process(capsys, *args):
    import sample
    capsys.readouterr()
    sample.main(list(args))
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- one-line errors

def one_line_error(fn, *args, **kwargs):
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def flip_byte(path, needle):
    """Flip the lowest bit of the first byte of `needle` in the file, in place (bit rot, a bad copy)."""
    data = open(path, "rb").read()
    i = data.find(needle)
    assert i >= 0, "needle not in file"
    with open(path, "r+b") as f:
        f.seek(i)
        f.write(bytes([data[i] ^ 1]))


def weights(value, n=1000):
    """A tensor whose bytes are easy to find in the file (a run of one float)."""
    return torch.full((n,), float(value))


def assert_one_line_exit_2(proc, needle):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- the probe

PROBE_BLOCK = "dec.8x8_block1"  # the digits default: second 8x8 decoder block, as for CIFAR


def copy_run(src, dst, epoch=4):
    """A private copy of the shared run (checkpoint mtimes kept), so the probe's files stay out of it."""
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copy2(os.path.join(src, "checkpoints", f"epoch_{epoch}.pt"), os.path.join(dst, "checkpoints"))
    shutil.copy2(os.path.join(src, "config.yaml"), dst)
    return str(dst)


def run_probe(capsys, outdir, *args):
    """probe.py in this process (so tests can patch it); returns (stdout, stderr)."""
    import probe  # the entry script, called in-process
    capsys.readouterr()
    probe.main(["--config", os.path.join(ROOT, DIGITS), "--outdir", outdir, *args])
    return capsys.readouterr()


def accuracy_of(stdout):
    """The number on the first line, `test accuracy: 93.46% (...)`."""
    m = re.match(r"test accuracy: ([\d.]+)%", stdout)
    assert m, stdout
    return float(m.group(1))


def cached_features(outdir, split="train", block=PROBE_BLOCK, sigma="0.06", epoch=4):
    path = os.path.join(outdir, "probe", "features", f"epoch_{epoch}", "classic", block, f"sigma={sigma}", f"{split}.pt")
    return torch.load(path, weights_only=True)["features"]


def random_images(n, rng, shape=(3, 6, 5)):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def random_stats(d, rng, n=None):
    """mu and a random SPD covariance (full rank when n > d)."""
    a = rng.standard_normal((d, n or 2 * d))
    return rng.standard_normal(d), a @ a.T / a.shape[1]


def pytorch_fid_distance(*stats):
    from pytorch_fid.fid_score import calculate_frechet_distance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...)
        return calculate_frechet_distance(*stats)


def digit_images(n):
    """n 16 x 16 gray uint8 digits from scikit-learn, without loading a config."""
    from sklearn.datasets import load_digits
    images = torch.from_numpy(np.round(load_digits().images[:n] * (255 / 16)).astype(np.uint8))[:, None]
    return torch.nn.functional.interpolate(images.float(), size=16, mode="nearest").to(torch.uint8)


@pytest.fixture(scope="session")
def digits_cfg(metric_cache):
    return load_config(os.path.join(ROOT, DIGITS), [f"data.cache={metric_cache}"])
