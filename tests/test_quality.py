"""The offline quality score: the dataset classifier, score_samples on sets of known quality, sample.py --score."""

import json
import os

import numpy as np
import torch
from PIL import Image

from conftest import random_images, run_script
from tools import quality
from tools.grid import PAD, enlarge, pairs_grid
from tools.data import load_dataset


def test_held_out_real_images_score_as_real(digits_cfg):
    """Real test images as 'samples': small FD, precision and recall high, every class covered, and about
    5% of them below the memorisation threshold (the threshold is their own 5th percentile)."""
    images, _ = load_dataset(digits_cfg, "test")
    r = quality.score_samples(digits_cfg, images, "classifier", blocks=3)
    assert r["count"] == 300 and r["block_size"] == 100 and r["extractor"] == "classifier"
    assert r["precision"] > 0.8 and r["recall"] > 0.5, r
    assert r["class_entropy"] > 0.95 * r["class_entropy_max"] and r["confidence"] > 0.9
    assert 0.02 <= r["memorised_fraction"] <= 0.08
    noise = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    bad = quality.score_samples(digits_cfg, noise, "classifier", blocks=3)
    assert bad["FD_classifier"] > 5 * (r["FD_classifier"] + 3 * r["FD_classifier_std"])  # noise: ~15x the FD of real images
    assert bad["precision"] < 0.25 and bad["memorised_fraction"] == 0  # real images: > 0.8


def test_copied_training_images_are_flagged_as_memorised(digits_cfg, tmp_path):
    train, _ = load_dataset(digits_cfg, "train")
    r = quality.score_samples(digits_cfg, train[:400], "classifier", blocks=4, pairs_path=str(tmp_path / "pairs.png"))
    assert r["memorised_fraction"] == 1.0 and r["memorised_fraction_std"] == 0
    assert r["precision"] > 0.8  # against an equally large random subset of the training set, not all of it
    assert os.path.isfile(tmp_path / "pairs.png")


def test_sample_score_prints_a_quality_line_offline(trained_digits_run, metric_cache, tmp_path):
    out = tmp_path / "samples"
    proc = run_script("sample.py", "--outdir", trained_digits_run,
                      "--seeds", "0-199", "--out", str(out), "--score", f"data.cache={metric_cache}", "sample.batch=200")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("quality (classifier):"))
    for name in ("FD_classifier:", "KID:", "precision:", "recall:", "class entropy:", "memorised:", "4 blocks of 50"):
        assert name in line, line
    result = json.load(open(f"{out}.quality.json"))
    assert sorted(os.listdir(out)) == ["000000"] and os.path.isfile(f"{out}.nearest_pairs.png")  # the folder holds samples only
    assert result["kind"] == "quality" and result["count"] == 200 and result["epoch"] == 4
    rows = [json.loads(l) for l in open(os.path.join(trained_digits_run, "metrics.jsonl")) if '"quality"' in l]
    assert rows[-1]["FD_classifier"] == result["FD_classifier"]


def test_nearest_pairs_show_the_closest_samples_first_beside_their_training_image(tmp_path):
    rng = np.random.default_rng(11)
    samples, train = random_images(6, rng, (3, 16, 16)), random_images(9, rng, (3, 16, 16))
    index, dists = np.array([8, 0, 3, 1, 2, 5]), np.array([9.0, 7.0, 1.0, 8.0, 3.0, 2.0])
    path = quality.save_nearest_pairs(str(tmp_path / "pairs.png"), torch.from_numpy(samples), train, index, dists, num=4)
    picture = torch.from_numpy(np.asarray(Image.open(path)).copy()).permute(2, 0, 1)
    closest = [2, 5, 4, 1]  # by distance
    expected = pairs_grid(torch.from_numpy(samples[closest]), torch.from_numpy(train[index[closest]]))
    assert torch.equal(picture, expected)
    top, left = 3 * PAD, 3 * PAD  # the first pair: sample 2 (4x) beside training image 3
    np.testing.assert_array_equal(picture[:, top:top + 64, left:left + 64].numpy(), enlarge(torch.from_numpy(samples[2:3]))[0].numpy())
    np.testing.assert_array_equal(picture[:, top:top + 64, left + 64 + PAD:left + 128 + PAD].numpy(),
                                  enlarge(torch.from_numpy(train[3:4]))[0].numpy())
    gray = quality.save_nearest_pairs(str(tmp_path / "gray.png"), samples[:, :1], train[:, :1], index, dists)
    assert np.asarray(Image.open(gray)).shape[:2] == pairs_grid(torch.from_numpy(samples[:, :1]), torch.from_numpy(train[:6, :1])).shape[1:]
