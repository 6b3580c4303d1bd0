"""Evaluation during training (tools/evaluation.py): the validation loss is the training loss on fixed images, noise
levels and noise, the same at every evaluation; memorising a tiny training set widens the train/validation gap;
the curves continue across a resume without repeats; a cadence of 0 evaluates nothing."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import run_script, train_here
from tools import inception
from tools.checkpoint import load_epoch, read_jsonl
from tools.config import build_edm
from tools.data import load_dataset, to_float
from tools.evaluation import HELDOUT, TRAIN, Evaluator, fixed_subset
from tools.rng import EVALUATION, image_normals
from tools.runs import resolve

FAST = ["network.model_channels=8", "data.max_images=512", "train.batch_size=256", "train.grid_epochs=0", "train.log_steps=1",
        "ema.snapshot_epochs=0", "train.checkpoint_epochs=1", "train.eval_epochs=1", "train.eval_images=64", "train.eval_samples=40",
        "sample.steps=4"]


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "eval_s"} for r in rows]


def rows_of(outdir, kind):
    return [r for r in read_jsonl(os.path.join(outdir, "metrics.jsonl")) if r.get("kind") == kind]


def test_validation_loss_is_the_training_loss_at_fixed_sigmas_and_noise(trained_digits_run):
    cfg, run = resolve(None, trained_digits_run, ["train.eval_epochs=1", "train.eval_images=64", "train.eval_samples=0",
                                                  "sample.batch=24"])  # chunks of 24: 24, 24, 16 images
    ckpt = load_epoch(run, 4, required=("emas", "loss_head"))
    edm = build_edm(cfg)
    edm.net.load_state_dict(ckpt["emas"]["classic"])
    edm.loss.load_state_dict(ckpt["loss_head"])
    assert edm.loss.logvar_linear.weight.abs().max() > 0  # the learned weighting u(sigma) is part of the loss compared
    train_images, train_labels = load_dataset(cfg, "train")
    evaluator = Evaluator(cfg, train_images, train_labels, 0, 1, torch.device("cpu"))
    first = evaluator(edm.net, edm.loss, ckpt["t_img"], 4)
    assert without_time(evaluator(edm.net, edm.loss, ckpt["t_img"], 4)) == without_time(first)  # bit-identical, every field
    (row,) = first
    assert row["kind"] == "eval" and row["images"] == 64 and row["sigmas"] == cfg["train"]["eval_sigmas"]

    # The training loss function (EDMLoss, what train.py's step calls) of the EMA weights, in one batch of 64.
    heldout, _ = load_dataset(cfg, "test")
    edm.net.eval()
    for split, images, logged in ((HELDOUT, heldout, row["val_loss_by_sigma"]), (TRAIN, train_images, row["train_loss_by_sigma"])):
        idx = fixed_subset(len(images), 64, split)
        assert len(set(idx.tolist())) == 64
        y, noise = to_float(images[idx]), image_normals((EVALUATION, split), idx.tolist(), images.shape[1:], "cpu")
        with torch.no_grad():
            direct = [edm.loss.at(edm.denoiser, y, torch.full((64,), s), noise).double().mean().item() for s in row["sigmas"]]
        np.testing.assert_allclose(logged, direct, rtol=1e-6)
    assert row["val_loss"] == pytest.approx(np.mean(row["val_loss_by_sigma"]), rel=1e-12)
    assert row["gap"] == pytest.approx(row["val_loss"] - row["train_loss"], rel=1e-12)
    # One noise image per image index, whatever it is drawn with; different images and splits get different noise.
    both = image_normals((EVALUATION, HELDOUT), [3, 5], (1, 16, 16), "cpu")
    assert torch.equal(both[1], image_normals((EVALUATION, HELDOUT), [5], (1, 16, 16), "cpu")[0])
    assert not torch.equal(both[0], both[1]) and not torch.equal(both[1], image_normals((EVALUATION, TRAIN), [5], (1, 16, 16), "cpu")[0])

    # Cadence 0 (how trained_digits_run was trained): nothing evaluated, no summary.
    assert not rows_of(trained_digits_run, "eval") and not rows_of(trained_digits_run, "curve")
    assert not os.path.exists(os.path.join(trained_digits_run, "eval_summary.json"))


def digits_folder(root, n, classes=False):
    """A folder dataset of the first n training and n test digits: root/train/, root/test/ (with class sub-folders:
    only the classes among the first n training digits, so that every test class is a training class)."""
    from PIL import Image
    cfg, _ = resolve("config/digits/E.yaml")
    train_classes = set(load_dataset(cfg, "train")[1][:n].tolist())
    for split in ("train", "test"):
        images, labels = load_dataset(cfg, split)
        kept = [i for i in range(len(images)) if not classes or int(labels[i]) in train_classes][:n]
        for i in kept:
            folder = root / split / (str(int(labels[i])) if classes else "")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i, 0].numpy()).save(folder / f"{i}.png")
    return ["data.dataset=folder", f"data.root={root}"]


def test_memorising_a_tiny_training_set_widens_the_gap(tmp_path):
    """16 training digits, 1 step per epoch for 150 epochs: the network learns those 16 images far better than 16
    held-out ones, and the gap between the two losses grows from one evaluation to the next."""
    data = digits_folder(tmp_path / "data", 16)
    run = tmp_path / "run"
    train_here("--config", "config/digits/E.yaml", "--outdir", run, *data,
               f"data.cache={tmp_path / 'cache'}", "train.batch_size=16", "train.epochs=150",
               "train.eval_epochs=25", "train.eval_samples=0", "train.grid_epochs=0", "train.checkpoint_epochs=150",
               "train.lr_rampup_epochs=10", "train.lr_ref_epochs=0", "ema.classic_halflife_kimg=0.3", "ema.snapshot_epochs=0",
               "ema.sigma_rels=[0.1]", "train.log_steps=50")
    evals = rows_of(run, "eval")
    assert [r["epoch"] for r in evals] == [25, 50, 75, 100, 125, 150] and all(r["images"] == 16 for r in evals)
    gaps = [r["gap"] for r in evals]
    # seen: 0.078, 0.096, 0.165, 0.162, 0.278, 0.432; the training-subset loss falls from 0.87 to -0.05 (u(sigma) < 0),
    # the validation loss only from 0.95 to 0.32 and rises again after epoch 100
    assert gaps[-1] > 3 * gaps[0] and gaps[-1] > 0.25, gaps
    assert np.mean(gaps[3:]) > 2 * np.mean(gaps[:3]), gaps  # widening: the later gaps are far larger than the earlier
    summary = json.load(open(run / "eval_summary.json"))
    assert summary["final_gap"] == gaps[-1] and summary["eval_points"] == 6


def test_curves_continue_across_a_resume_without_repeats(tmp_path, metric_cache, capsys):
    """A run killed after its epoch-2 evaluation but before the epoch-2 checkpoint (simulated by deleting that
    checkpoint) replays epoch 2 on resume: metrics.jsonl and TensorBoard hold each point once, equal to one go."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cache = f"data.cache={metric_cache}"
    train_here("--config", "config/digits/E.yaml", "--outdir", tmp_path / "one", *FAST, cache, "train.epochs=3")
    two = tmp_path / "two"
    train_here("--config", "config/digits/E.yaml", "--outdir", two, *FAST, cache, "train.epochs=2")
    for name in ("epoch_2.pt", "epoch_2.pt.sha256"):
        os.remove(two / "checkpoints" / name)
    capsys.readouterr()
    train_here("--config", "config/digits/E.yaml", "--outdir", two, *FAST, cache, "train.epochs=3")
    assert f"resumed {two} at epoch 1 " in capsys.readouterr().out
    for kind in ("eval", "curve"):
        a, b = rows_of(tmp_path / "one", kind), rows_of(two, kind)
        assert [r["epoch"] for r in b] == [1, 2, 3]
        assert without_time(b) == without_time(a)  # bit-identical values: deterministic evaluation of bit-exact weights
    steps = [r["step"] for r in read_jsonl(two / "metrics.jsonl") if "img_per_s" in r]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # 2 steps an epoch, no training row repeated
    assert "KID" in rows_of(two, "curve")[0] and "memorised_fraction" in rows_of(two, "curve")[0]

    events = EventAccumulator(str(two / "tensorboard"))
    events.Reload()
    for tag in ("eval/val_loss", "quality_curve/KID", "train/loss"):
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len({s for s, _ in points}) == len(points), (tag, points)  # the killed run's epoch-2 points were purged
    val = [v for _, v in sorted((e.step, e.value) for e in events.Scalars("eval/val_loss"))]
    np.testing.assert_allclose(val, [r["val_loss"] for r in rows_of(two, "eval")], rtol=1e-6)  # float32 in TensorBoard

    summary = json.load(open(two / "eval_summary.json"))
    best = min(rows_of(two, "curve"), key=lambda r: r["KID"])
    assert summary["best_KID"] == best["KID"] and summary["best_KID_kimg"] == best["kimg"] and summary["curve_points"] == 3

    # Started afresh (checkpoints moved away, as the resume error suggests): the new run's rows are all written.
    shutil.move(two / "checkpoints", tmp_path / "old-checkpoints")
    train_here("--config", "config/digits/E.yaml", "--outdir", two, *FAST, cache, "train.epochs=1", "train.eval_samples=0")
    assert [r["epoch"] for r in rows_of(two, "eval")] == [1, 2, 3, 1]


def test_conditional_run_evaluates_with_labels(tmp_path, metric_cache, capsys):
    """A class-conditional run: the validation loss it logged is the loss with the images' own labels, which differs
    from the loss with other labels (so an evaluation that lost or mixed up the labels would fail here); the quality
    curve carries the class accuracy of its samples."""
    import train
    run = tmp_path / "cond"
    train.main(["--config", "config/digits/E-cond.yaml", "--outdir", str(run), *FAST, f"data.cache={metric_cache}", "train.epochs=1"])
    assert "best quality-curve KID" in capsys.readouterr().out
    (curve,) = rows_of(run, "curve")
    (logged,) = rows_of(run, "eval")
    assert 0 <= curve["class_accuracy"] <= 1

    cfg, _ = resolve(None, str(run))
    ckpt = load_epoch(str(run), 1, required=("emas", "loss_head"))
    edm = build_edm(cfg)
    edm.net.load_state_dict(ckpt["emas"]["classic"])
    edm.loss.load_state_dict(ckpt["loss_head"])
    images, labels = load_dataset(cfg, "train")
    evaluator = Evaluator(cfg, images[:512], labels[:512], 0, 1, torch.device("cpu"))
    evaluator.num_samples = 0  # the validation loss only
    from tools.edm import Denoiser
    denoiser = Denoiser(edm.net.eval(), cfg["diffusion"]["sigma_data"])
    amp = lambda: torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        with_labels = evaluator.losses(denoiser, edm.loss, HELDOUT, amp)
        held_images, held_labels, idx = evaluator.splits[HELDOUT]
        evaluator.splits[HELDOUT] = (held_images, (held_labels + 1) % 10, idx)  # the same images and noise, other labels
        other = evaluator.losses(denoiser, edm.loss, HELDOUT, amp)
    np.testing.assert_allclose(logged["val_loss_by_sigma"], with_labels, rtol=1e-6)
    assert max(abs(a - b) for a, b in zip(with_labels, other)) > 1e-3, (with_labels, other)


def test_inception_joins_the_curve_where_local_weights_exist(tmp_path, monkeypatch):
    """train.eval_inception with FID_INCEPTION_WEIGHTS set (a fixed random Inception here; nothing is downloaded):
    the curve also carries Inception FD and KID, against the training split's statistics computed once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    weights = tmp_path / "random-inception.pth"
    torch.save(inception.random_inception_state_dict(), weights)
    data = digits_folder(tmp_path / "data", 40, classes=True)
    run = tmp_path / "run"
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(weights))
    train_here("--config", "config/digits/E.yaml", "--outdir", run, *data, *FAST, f"data.cache={tmp_path / 'cache'}",
               "train.batch_size=20", "train.epochs=1", "train.eval_inception=true")
    (curve,) = rows_of(run, "curve")
    assert curve["FID_inception"] > 0 and curve["KID_inception_std"] > 0 and curve["FD_classifier"] > 0
    refs = [f for f in os.listdir(tmp_path / "cache" / "fid-refs") if f.endswith(".npz")]
    assert len(refs) == 1, refs  # the training split's statistics, computed once
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"quality_curve/FID_inception", "quality_curve/KID_inception", "quality_curve/KID"} <= set(events.Tags()["scalars"])


def test_too_few_curve_samples_is_one_line(tmp_path):
    proc = run_script("train.py", "--config", "config/digits/E.yaml", "--outdir", str(tmp_path), *FAST, "train.eval_samples=20",
                      "--dry-run", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "train.eval_samples must be 0" in proc.stderr, proc.stderr
