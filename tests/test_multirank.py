"""Two gloo ranks on CPU through the whole pipeline, as a cluster user runs it:
train -> sample --score -> probe -> ema_sweep -> compare, and sample --fid auto with no cached reference."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_script
from tools import inception
from tools.config import load_config
from tools.data import load_dataset

FAST = ["network.model_channels=8", "data.max_images=512", "train.batch_size=256", "train.grid_epochs=0", "ema.snapshot_epochs=1",
        "train.checkpoint_epochs=1", "train.epochs=2"]


def torchrun(*args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, metric_cache):
    """Trained on 2 ranks with the evaluation every epoch (validation loss on 64 images, a quality curve of 40 samples)."""
    run = str(tmp_path_factory.mktemp("two-rank") / "E")
    torchrun("train.py", "--config", "config/digits/E.yaml", "--outdir", run, *FAST, "train.eval_epochs=1", "train.eval_images=64",
             "train.eval_samples=40", "sample.steps=4", "sample.batch=16", f"data.cache={metric_cache}", port=29531)
    return run


def test_evaluation_during_two_rank_training_equals_one_process(two_rank_run, metric_cache):
    """The validation loss and quality curve that 2 ranks computed while training (chunks of 16 images shared out)
    are bit-identical to one process evaluating the same checkpoint afterwards."""
    rows = [json.loads(line) for line in open(os.path.join(two_rank_run, "metrics.jsonl"))]
    during = [r for r in rows if r.get("kind") in ("eval", "curve")]
    assert [(r["kind"], r["epoch"]) for r in during] == [("eval", 1), ("curve", 1), ("eval", 2), ("curve", 2)]
    proc = run_script("-m", "tools.evaluation", "--outdir", two_rank_run, "--epoch", "2", "--samples", "40", f"data.cache={metric_cache}")
    after = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "eval_s"} for r in rs]
    assert strip(after) == strip(during[2:])


def test_two_rank_pipeline(two_rank_run, metric_cache, tmp_path):
    run, cache = two_rank_run, f"data.cache={metric_cache}"
    proc = torchrun("sample.py", "--outdir", run, "--seeds", "0-79", "--steps", "4", "--score", "--score-blocks", "2", cache, port=29532)
    assert "quality (classifier): FD_classifier" in proc.stdout and "2 blocks of 40" in proc.stdout
    samples = os.path.join(run, "samples", "epoch_2-classic-heun4-fp32")
    assert len(os.listdir(os.path.join(samples, "000000"))) == 80 and os.path.isfile(samples + ".quality.json")

    proc = torchrun("probe.py", "--outdir", run, "probe.C_grid=[1.0]", port=29533)
    assert proc.stdout.startswith("test accuracy:")

    proc = torchrun("-m", "tools.ema_sweep", "--outdir", run, "--sigma-rels", "0.1", "--num-images", "40", "sample.steps=4",
                    "probe.C_grid=[1.0]", cache, port=29534)
    assert sorted(os.listdir(os.path.join(run, "posthoc"))) == ["sigma_rel-0.1000-000000001024.pt",
                                                                "sigma_rel-0.1000-000000001024.pt.sha256"]  # built once, used twice
    sweep = json.load(open(os.path.join(run, "ema_sweep_epoch_2.json")))
    assert sweep[0]["sigma_rel"] == 0.1 and sweep[0]["fd"] > 0 and 0 <= sweep[0]["probe_acc"] <= 100

    proc = run_script("-m", "tools.compare", run, "--out", str(tmp_path / "compare"))
    assert "FD_classifier" in proc.stdout
    assert {"val_loss_vs_kimg.png", "curve_KID_vs_kimg.png"} <= set(os.listdir(tmp_path / "compare"))
    log = open(os.path.join(run, "log.txt")).read()
    assert all(f"{s} --outdir" in log for s in ("sample.py", "probe.py", "tools/ema_sweep.py")) and "\r" not in log


def test_two_rank_fid_auto_reference_covers_the_whole_split(two_rank_run, tmp_path):
    """--fid auto on 2 ranks with no cached reference: every rank computes its share of the statistics, which
    equal a single process's, over all training images; the samples are then scored (random Inception weights)."""
    from tools import fid
    root, cache = tmp_path / "folder", tmp_path / "cache"
    digits, labels = load_dataset(load_config("config/digits/E.yaml"), "train")
    for i in range(30):  # a small own dataset: grey 16x16 digits in train/<class>/
        os.makedirs(root / "train" / str(int(labels[i])), exist_ok=True)
        Image.fromarray(digits[i, 0].numpy()).save(root / "train" / str(int(labels[i])) / f"{i}.png")
    weights = tmp_path / "random-inception.pth"
    torch.save(inception.random_inception_state_dict(), weights)
    data = ["data.dataset=folder", f"data.root={root}", f"data.cache={cache}"]
    proc = torchrun("sample.py", "--outdir", two_rank_run, "--seeds", "0-19", "--steps", "3", "--out", str(tmp_path / "s"),
                    "--fid", "auto", "--inception-weights", str(weights), *data, port=29535)
    assert "fid: " in proc.stdout and "on 2 rank(s)" in proc.stdout
    scored = json.load(open(f"{tmp_path / 's'}.fid.json"))
    assert scored["count"] == 20

    cfg = load_config(os.path.join(two_rank_run, "config.yaml"), data)
    ref = fid.reference_path(cfg)
    with np.load(ref) as f:
        mu2, sigma2 = f["mu"], f["sigma"]
    assert json.load(open(ref[:-4] + ".json"))["count"] == 30
    run_script("-m", "tools.fid", "ref", "--config", os.path.join(two_rank_run, "config.yaml"), "--out", str(tmp_path / "one.npz"),
               "--inception-weights", str(weights), *data)
    with np.load(tmp_path / "one.npz") as f:
        mu1, sigma1 = f["mu"], f["sigma"]
    # Equal up to float32 Inception arithmetic at other batch sizes; half of the split would move mu by O(10%).
    np.testing.assert_allclose(mu2, mu1, rtol=0, atol=1e-4 * np.abs(mu1).max())
    np.testing.assert_allclose(sigma2, sigma1, rtol=0, atol=1e-4 * np.abs(sigma1).max())


