"""Two gloo ranks on CPU, as a cluster user runs them. One 2-rank training with everything on (augmentation, dropout,
the gradient noise scale, the evaluation) against one rank whose micro-batch is the per-rank batch; its checkpoint
resumed on one rank; then sample --score, ema_sweep (sampling, scoring, the probe and a post-hoc EMA on 2 ranks) and
compare, and sample --fid auto with no cached reference."""

import filecmp
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DIGITS, ROOT, run_script
from tools import inception
from tools.config import load_config
from tools.data import load_dataset

# 512 images, batch 256: 2 steps per epoch, each logged; dropout, augmentation (all transforms and the x-flip), the
# gradient noise scale (2 ranks, or 2 micro-batches) and the evaluation every epoch are on.
FAST = ["network.model_channels=8", "network.dropout=0.1", "data.max_images=512", "train.batch_size=256", "train.grid_epochs=0",
        "ema.snapshot_epochs=1", "train.checkpoint_epochs=1", "train.epochs=2", "train.log_steps=1", "augment.p=0.5",
        "augment.xflip=0.5", "train.eval_epochs=1", "train.eval_images=64", "train.eval_samples=40", "sample.steps=4",
        "sample.batch=16"]


def torchrun(*args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def rows(run, kind=None):
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [r for r in lines if ("img_per_s" in r if kind == "train" else r.get("kind") == kind)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_close_weights(a, b):
    """Network, loss head and classic EMA equal up to float round-off (another rank count sums the gradients in
    another order)."""
    for x, y in zip((a["net"], a["loss_head"], a["emas"]["classic"]), (b["net"], b["loss_head"], b["emas"]["classic"])):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """This module's own data.cache: its dataset classifier is trained by the 2-rank run's rank 0 whatever ran before."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, cache):
    run = str(tmp_path_factory.mktemp("two-rank") / "E")
    torchrun("train.py", "--config", DIGITS, "--outdir", run, *FAST, f"data.cache={cache}", port=29531)
    return run


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, two_rank_run, cache):
    """The same run on one rank, in two micro-batches of the per-rank batch of two ranks (in this process)."""
    import train
    run = str(tmp_path_factory.mktemp("one-rank") / "E")
    train.main(["--config", os.path.join(ROOT, DIGITS), "--outdir", run, *FAST, "train.batch_gpu=128", f"data.cache={cache}"])
    return run


def test_two_ranks_train_what_one_rank_does_in_micro_batches(two_rank_run, one_rank_run):
    """Step by step the same losses, augmented fractions and noise-scale estimates, the same validation losses, and
    weights equal to round-off: data order, noise, dropout masks and augmentation follow the sample, not the rank."""
    one, two = rows(one_rank_run, "train"), rows(two_rank_run, "train")
    assert len(one) == len(two) == 4
    assert [r["augmented_fraction"] for r in two] == [r["augmented_fraction"] for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    assert all(r["gns_b_simple"] > 0 for r in one)
    # The measured norms agree to round-off (seen 5e-6): the global |G|^2 and a rank's (a micro-batch's) |g|^2 of 128
    # images, E|g|^2 = |G|^2 + tr(Sigma) / 128. tr(Sigma) = 256 (|g|^2 - |G|^2) multiplies that round-off by ~230 (seen
    # 1.2e-3); an image on another rank or in another micro-batch would move it by tens of percent.
    for a, b in zip(one, two):
        assert b["gns_grad_sq"] == pytest.approx(a["gns_grad_sq"], rel=5e-5), (a, b)
        small = [r["gns_grad_sq"] + r["gns_trace_sigma"] / 128 for r in (a, b)]
        assert small[1] == pytest.approx(small[0], rel=5e-5), (a, b)
        for k in ("gns_b_simple", "gns_trace_sigma"):
            assert b[k] == pytest.approx(a[k], rel=1e-2), (k, a, b)
    evals = [(rows(run, "eval"), rows(run, "curve")) for run in (one_rank_run, two_rank_run)]
    assert [len(e) for pair in evals for e in pair] == [2, 2, 2, 2]
    for a, b in zip(evals[0][0], evals[1][0]):
        np.testing.assert_allclose(b["val_loss_by_sigma"] + b["train_loss_by_sigma"],
                                   a["val_loss_by_sigma"] + a["train_loss_by_sigma"], rtol=1e-4)
    assert_close_weights(load(os.path.join(one_rank_run, "checkpoints", "epoch_2.pt")),
                         load(os.path.join(two_rank_run, "checkpoints", "epoch_2.pt")))


def test_evaluation_during_two_rank_training_equals_one_process(two_rank_run, cache, capsys):
    """The validation loss and quality curve that 2 ranks computed while training (chunks of 16 images shared out)
    equal one process evaluating the same checkpoint afterwards: bit for bit, but for the Frechet distance, which is
    held to 1e-6 relative. Why: a block of 10 samples has a covariance of rank 9 in the classifier's 128 feature
    dimensions, and Tr sqrtm(S1 S2) takes square roots of its ~0 eigenvalues, which turns a round-off difference of
    1e-15 in the features into ~1e-8 relative in the FD (measured: 3e-7 on FDs of 20-40). A torchrun rank
    (OMP_NUM_THREADS=1, one torch thread) and a plain process may round differently, and on one machine this test
    failed in the full suite only: it compared exactly, against whichever dataset classifier an earlier test had left
    in the session's shared cache. Now the FD has its tolerance, and the classifier this module's own cache."""
    from tools import evaluation
    during = sorted((r for r in rows(two_rank_run, "eval") + rows(two_rank_run, "curve") if r["epoch"] == 2),
                    key=lambda r: r["kind"])
    assert [r["kind"] for r in during] == ["curve", "eval"] and len(rows(two_rank_run, "eval")) == 2
    capsys.readouterr()
    evaluation.main(["--outdir", two_rank_run, "--epoch", "2", "--samples", "40", f"data.cache={cache}"])
    after = sorted((json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")),
                   key=lambda r: r["kind"])
    for a, b in zip(after, during):
        fd = [k for k in a if k.startswith("FD_")]
        assert fd == ["FD_classifier", "FD_classifier_std"] or a["kind"] == "eval"
        for k in fd:
            assert a[k] == pytest.approx(b[k], rel=1e-6), k
        assert {k: v for k, v in a.items() if k not in fd + ["eval_s"]} == {k: v for k, v in b.items() if k not in fd + ["eval_s"]}


def test_a_two_rank_run_resumes_on_one_rank(two_rank_run, tmp_path, capsys):
    """The README's promise: the epoch-1 checkpoint of 2 ranks, resumed on one, ends where 2 ranks ended."""
    import train
    run = tmp_path / "resumed"
    os.makedirs(run / "checkpoints")
    shutil.copy2(os.path.join(two_rank_run, "checkpoints", "epoch_1.pt"), run / "checkpoints")
    shutil.copy2(os.path.join(two_rank_run, "config.yaml"), run)
    train.main(["--config", str(run / "config.yaml"), "--outdir", str(run), "train.eval_epochs=0"])
    assert f"resumed {run} at epoch 1" in capsys.readouterr().out
    assert_close_weights(load(os.path.join(two_rank_run, "checkpoints", "epoch_2.pt")), load(run / "checkpoints" / "epoch_2.pt"))


def test_two_rank_pipeline(two_rank_run, tmp_path, capsys):
    """sample --score on 2 ranks (3 images per forward) writes the same files as one process (8 per forward); ema_sweep
    samples, scores and probes a post-hoc EMA on 2 ranks, built once; compare reads the run."""
    import sample
    run = two_rank_run
    proc = torchrun("sample.py", "--outdir", run, "--seeds", "0-79", "--steps", "4", "--batch", "3", "--score",
                    "--score-blocks", "2", port=29532)
    assert "quality (classifier): FD_classifier" in proc.stdout and "2 blocks of 40" in proc.stdout
    samples = os.path.join(run, "samples", "epoch_2-classic-heun4-fp32")
    assert len(os.listdir(os.path.join(samples, "000000"))) == 80 and os.path.isfile(samples + ".quality.json")
    sample.main(["--outdir", run, "--seeds", "0-15", "--steps", "4", "--batch", "8", "--out", str(tmp_path / "one")])
    for seed in range(16):
        name = os.path.join("000000", f"{seed:06d}.png")
        assert filecmp.cmp(os.path.join(samples, name), tmp_path / "one" / name, shallow=False), seed

    torchrun("-m", "tools.ema_sweep", "--outdir", run, "--sigma-rels", "0.1", "--num-images", "40", "sample.steps=4",
             "probe.C_grid=[1.0]", port=29534)
    assert sorted(os.listdir(os.path.join(run, "posthoc"))) == ["sigma_rel-0.1000-000000001024.pt",
                                                                "sigma_rel-0.1000-000000001024.pt.sha256"]  # built once, used twice
    sweep = json.load(open(os.path.join(run, "ema_sweep_epoch_2.json")))
    assert sweep[0]["sigma_rel"] == 0.1 and sweep[0]["fd"] > 0 and 0 <= sweep[0]["probe_acc"] <= 100

    proc = run_script("-m", "tools.compare", run, "--out", str(tmp_path / "compare"))
    assert "FD_classifier" in proc.stdout
    assert {"val_loss_vs_kimg.png", "curve_KID_vs_kimg.png"} <= set(os.listdir(tmp_path / "compare"))
    log = open(os.path.join(run, "log.txt")).read()
    assert all(f"{s} --outdir" in log for s in ("sample.py", "tools/ema_sweep.py")) and "\r" not in log


def test_two_rank_fid_auto_reference_covers_the_whole_split(two_rank_run, tmp_path):
    """--fid auto on 2 ranks with no cached reference: every rank computes its share of the statistics, which
    equal a single process's, over all training images; the samples are then scored (random Inception weights)."""
    from tools import fid
    root, cache = tmp_path / "folder", tmp_path / "cache"
    digits, labels = load_dataset(load_config(DIGITS), "train")
    for i in range(20):  # a small own dataset: grey 16x16 digits in train/<class>/
        os.makedirs(root / "train" / str(int(labels[i])), exist_ok=True)
        Image.fromarray(digits[i, 0].numpy()).save(root / "train" / str(int(labels[i])) / f"{i}.png")
    weights = tmp_path / "random-inception.pth"
    torch.save(inception.random_inception_state_dict(), weights)
    data = ["data.dataset=folder", f"data.root={root}", f"data.cache={cache}"]
    proc = torchrun("sample.py", "--outdir", two_rank_run, "--seeds", "0-9", "--steps", "3", "--out", str(tmp_path / "s"),
                    "--fid", "auto", "--inception-weights", str(weights), *data, port=29535)
    assert "fid: " in proc.stdout and "on 2 rank(s)" in proc.stdout
    scored = json.load(open(f"{tmp_path / 's'}.fid.json"))
    assert scored["count"] == 10

    cfg = load_config(os.path.join(two_rank_run, "config.yaml"), data)
    ref = fid.reference_path(cfg)
    with np.load(ref) as f:
        mu2, sigma2 = f["mu"], f["sigma"]
    assert json.load(open(ref[:-4] + ".json"))["count"] == 20
    fid.main(["ref", "--config", os.path.join(two_rank_run, "config.yaml"), "--out", str(tmp_path / "one.npz"),
              "--inception-weights", str(weights), *data])
    with np.load(tmp_path / "one.npz") as f:
        mu1, sigma1 = f["mu"], f["sigma"]
    # Equal up to float32 Inception arithmetic at other batch sizes; half of the split would move mu by O(10%).
    np.testing.assert_allclose(mu2, mu1, rtol=0, atol=1e-4 * np.abs(mu1).max())
    np.testing.assert_allclose(sigma2, sigma1, rtol=0, atol=1e-4 * np.abs(sigma1).max())
