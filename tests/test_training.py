"""train.py: exact resume of C, E and G, the learning-rate schedule, snapshots, continuing, bad input (world-size
independence: tests/test_multirank.py)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import DIGITS, ROOT, run_script

# A smaller network and a larger batch than the digits default: 5 steps per epoch, seconds per run. Dropout and
# augmentation on (every CIFAR config uses both), so resume covers their masks and draws.
FAST = ["network.model_channels=8", "network.dropout=0.1", "train.batch_size=256", "train.grid_epochs=0", "train.eval_epochs=0",
        "train.log_steps=1", "ema.snapshot_epochs=1", "train.checkpoint_epochs=1", "augment.p=0.3", "augment.xflip=0.5",
        "train.lr_rampup_epochs=1", "train.lr_ref_epochs=2"]
CONFIGS = ["config/digits/C.yaml", "config/digits/E.yaml", "config/digits/G.yaml"]


def train(outdir, *overrides, config=DIGITS, check=True):
    return run_script("train.py", "--config", config, "--outdir", str(outdir), *FAST, *overrides, check=check)


def train_here(outdir, *overrides, config=DIGITS):
    """train.py's main in this process (no interpreter start-up); its output reaches pytest's capture."""
    import train as entry
    entry.main(["--config", os.path.join(ROOT, config), "--outdir", str(outdir), *FAST, *overrides])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def losses(outdir):
    with open(os.path.join(outdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def one_go(tmp_path_factory):
    """one_go(config): the run directory of 3 epochs of the config in one go, trained on first use."""
    runs = {}

    def get(config=DIGITS):
        if config not in runs:
            runs[config] = tmp_path_factory.mktemp("one_go")
            train_here(runs[config], "train.epochs=3", config=config)
        return runs[config]
    return get


@pytest.mark.parametrize("config", CONFIGS)
def test_exact_resume(one_go, config, tmp_path, capsys):
    """C, E and G with dropout and augmentation, stopped after epoch 1 and resumed twice (once through a corrupt
    newest checkpoint): bit-identical to one go."""
    reference = one_go(config)
    train_here(tmp_path, "train.epochs=1", config=config)
    train_here(tmp_path, "train.epochs=2", config=config)
    with open(tmp_path / "checkpoints" / "epoch_2.pt", "r+b") as f:  # a crash mid-copy, a bad disk: the newest is corrupt
        f.truncate(1000)
    capsys.readouterr()
    train_here(tmp_path, "train.epochs=3", config=config)
    out, err = capsys.readouterr()
    assert "epoch_2.pt: checksum mismatch" in err and f"resumed {tmp_path} at epoch 1" in out, (out, err)
    a, b = load(reference / "checkpoints" / "epoch_3.pt"), load(tmp_path / "checkpoints" / "epoch_3.pt")
    assert_same_state(a["net"], b["net"])
    assert_same_state(a["emas"]["classic"], b["emas"]["classic"])
    for pa, pb in zip(a["emas"]["power"], b["emas"]["power"]):
        assert_same_state(pa, pb)
    assert a["t_img"] == b["t_img"] == 3 * 5 * 256
    # the run really trained, and augmented: weights moved from their initialisation, images were transformed
    first = load(reference / "checkpoints" / "epoch_1.pt")["net"]
    assert any(not torch.equal(first[k], a["net"][k]) for k in a["net"] if first[k].is_floating_point())
    assert all(0.5 < r["augmented_fraction"] < 1 for r in losses(reference))


def test_logged_learning_rate_follows_the_edm2_schedule(one_go):
    """Ramp-up over 1 epoch, t_ref 2 epochs (of 5 x 256 images), 3 epochs. Read as properties of the curve (t = images
    seen before the step): lr grows in proportion to t during the ramp-up, holds at its reference value until t_ref,
    then falls as 1 / sqrt(t) (EDM2 eq. 121)."""
    ref_lr, epoch_img = 1e-2, 5 * 256
    rows = losses(one_go())
    assert len(rows) == 15
    t = np.array([r["kimg"] * 1000 - 256 for r in rows])
    lr = np.array([r["lr"] for r in rows])
    ramp, flat, decay = t < epoch_img, (t >= epoch_img) & (t <= 2 * epoch_img), t > 2 * epoch_img
    assert (ramp.sum(), flat.sum(), decay.sum()) == (5, 6, 4)
    assert lr[0] == 0 and np.all(np.diff(lr[ramp]) > 0)
    np.testing.assert_allclose(lr[ramp][1:] / t[ramp][1:], ref_lr / epoch_img, rtol=1e-12)
    np.testing.assert_allclose(lr[flat], ref_lr, rtol=1e-12)
    np.testing.assert_allclose(lr[decay] * np.sqrt(t[decay]), ref_lr * np.sqrt(2 * epoch_img), rtol=1e-12)


def test_snapshots_written_at_image_cadence(one_go):
    run = one_go()
    files = sorted(f for f in os.listdir(run / "snapshots") if f.endswith(".pt"))
    assert files == [f"snapshot_{t:012d}.pt" for t in (1280, 2560, 3840)]
    assert all(os.path.isfile(run / "snapshots" / (f + ".sha256")) for f in files)  # each with its checksum
    snap = load(run / "snapshots" / files[-1])
    assert [e["sigma_rel"] for e in snap["emas"]] == [0.05, 0.10]
    assert all(v.dtype == torch.float32 for e in snap["emas"] for v in e["net"].values() if v.is_floating_point())


def test_continue_finished_run_by_raising_epochs(one_go, tmp_path):
    shutil.copytree(one_go(), tmp_path / "run")
    proc = train(tmp_path / "run", "train.epochs=4")
    assert f"resumed {tmp_path / 'run'} at epoch 3" in proc.stdout
    assert load(tmp_path / "run" / "checkpoints" / "epoch_4.pt")["t_img"] == 4 * 5 * 256


def test_nonfinite_loss_stops_cleanly(tmp_path):
    """A run whose weights blow up (Config C, an absurd learning rate) stops with one line and leaves its
    last good checkpoint intact."""
    train(tmp_path, "train.epochs=1", config="config/digits/C.yaml")
    before = open(tmp_path / "checkpoints" / "epoch_1.pt", "rb").read()
    proc = train(tmp_path, "train.epochs=3", "train.lr=1e30", "train.max_nonfinite_steps=3", config="config/digits/C.yaml", check=False)
    assert proc.returncode == 2
    assert "non-finite for 3 consecutive steps" in proc.stderr and "epoch_1.pt" in proc.stderr, proc.stderr[-2000:]
    assert open(tmp_path / "checkpoints" / "epoch_1.pt", "rb").read() == before
    assert not (tmp_path / "checkpoints" / "epoch_2.pt").exists()


def assert_one_line_exit_2(proc, needle):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]


def test_train_rejects_batch_size_0_before_creating_the_run(tmp_path):
    outdir = tmp_path / "run"
    proc = run_script("train.py", "--config", DIGITS, "--outdir", str(outdir), "train.batch_size=0", check=False)
    assert_one_line_exit_2(proc, "train.batch_size must be >= 1, got 0")
    assert not outdir.exists()


def test_train_rejects_a_non_network_unet_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(open(os.path.join(ROOT, DIGITS)).read().replace("unet: unetE.py", "unet: sample.py"))
    proc = run_script("train.py", "--config", str(path), "--dry-run", check=False)
    assert_one_line_exit_2(proc, "unet: 'sample.py' is not a network file; allowed: unetC.py, unetE.py, unetG.py")
    assert proc.stdout == ""
