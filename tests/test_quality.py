"""The offline quality score: the dataset classifier, score_samples on sets of known quality, sample.py --score."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import run_script
from tools import classifier, quality
from tools.config import load_config
from tools.data import load_dataset


@pytest.fixture(scope="module")
def digits_cfg(metric_cache):
    return load_config("config/digits/E.yaml", [f"data.cache={metric_cache}"])


def test_classifier_trains_once_reaches_97_percent_and_is_cached(digits_cfg):
    logs = []
    model = classifier.load_or_train(digits_cfg, log=logs.append)
    path = os.path.join(digits_cfg["data"]["cache"], "metric-classifiers", f"{model.tag}.pt")
    assert os.path.isfile(path)  # trained by the first test to use the shared cache, this one or another
    assert model.test_accuracy >= 0.97, model.test_accuracy
    test_images, test_labels = load_dataset(digits_cfg, "test")
    assert classifier.accuracy(model, test_images, test_labels) == model.test_accuracy  # the figure is reproducible
    logs.clear()
    again = classifier.load_or_train(digits_cfg, log=logs.append)
    assert logs == [] and again.tag == model.tag  # loaded from the cache, not retrained
    x = test_images[:50]
    assert np.array_equal(classifier.outputs(again, x)[0], classifier.outputs(model, x)[0])


def test_classifier_cache_key_follows_the_data(digits_cfg):
    """Other data (here: another resolution of digits) gets another classifier file."""
    tag = classifier.load_or_train(digits_cfg, log=lambda *_: None).tag
    cfg8 = load_config("config/digits/E.yaml", [f"data.cache={digits_cfg['data']['cache']}", "network.img_resolution=8",
                                                 "network.channel_mult=[1,2]", "network.attn_resolutions=[4]"])
    images, labels = load_dataset(cfg8, "train")
    assert classifier._fingerprint(images, labels) not in tag


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
