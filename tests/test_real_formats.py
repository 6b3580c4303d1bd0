"""CIFAR-10, CIFAR-100 and Tiny-ImageNet read from files in their real layouts (tests/real_formats.py writes small
fakes): labels and pixels as written, damaged files named in one line, Tiny-ImageNet's classes from wnids.txt; then
each dataset through train.py, FID reference statistics, sample.py --score and probe.py."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, accuracy_of, one_line_error
from real_formats import write_cifar10, write_cifar100, write_python2_pickle, write_tinyimagenet
from tools.config import load_config
from tools.data import load_dataset


def config(dataset, root, cache, *extra, unet="E"):
    return load_config(os.path.join(ROOT, "config", dataset, f"{unet}.yaml"), [f"data.root={root}", f"data.cache={cache}", *extra])


def unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_pixels_and_labels_are_what_the_files_hold(dataset, tmp_path):
    folder = write_cifar10(tmp_path) if dataset == "cifar10" else write_cifar100(tmp_path)
    cfg = config(dataset, tmp_path, tmp_path / "cache")
    for split, files in {"train": ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
                         if dataset == "cifar10" else ["train"],
                         "test": ["test_batch"] if dataset == "cifar10" else ["test"]}.items():
        batches = [unpickle(os.path.join(folder, f)) for f in files]
        key = "labels" if dataset == "cifar10" else "fine_labels"
        images, labels = load_dataset(cfg, split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64
        assert labels.tolist() == sum((b[key] for b in batches), [])
        # row-major 3072 bytes per image: the red plane, then green, then blue, each 32 rows of 32
        first = batches[0]["data"][1]
        assert torch.equal(images[1], torch.from_numpy(first.reshape(3, 32, 32)))
        assert images[1, 1, 0, 5] == first[1024 + 5] and images[1, 2, 31, 31] == first[3071]


def test_damaged_cifar_files_are_named_in_one_line(tmp_path):
    folder = write_cifar10(tmp_path)
    cfg = config("cifar10", tmp_path, tmp_path / "cache")
    path = os.path.join(folder, "data_batch_3")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # an interrupted copy
    message = one_line_error(load_dataset, cfg, "train")
    assert path in message and "truncated or corrupt" in message
    os.remove(path)
    message = one_line_error(load_dataset, cfg, "train")
    assert message == f"{path} not found"
    write_python2_pickle(path, {"data": np.zeros((4, 1024), np.uint8), "labels": [0, 1, 2, 3]})  # greyscale, 32x32
    message = one_line_error(load_dataset, cfg, "train")
    assert path in message and "'data' should be uint8 [N, 3072]" in message
    write_python2_pickle(path, {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]})
    assert "0..9" in one_line_error(load_dataset, cfg, "train")
    assert load_dataset(cfg, "test")[0].shape == (40, 3, 32, 32)  # the test split does not read the training files


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({"data": Payload(), "labels": []}, f, protocol=2)
    message = one_line_error(load_dataset, config("cifar10", tmp_path, tmp_path / "cache"), "test")
    assert "posix.mkdir" in message and not marker.exists()


def test_a_missing_cifar_folder_says_where_to_extract(tmp_path):
    message = one_line_error(load_dataset, config("cifar100", tmp_path, tmp_path / "cache"), "train")
    assert "cifar100 not found" in message and "cifar-100-python.tar.gz" in message and str(tmp_path) in message


def test_tinyimagenet_classes_come_from_wnids_txt(tmp_path):
    base = write_tinyimagenet(tmp_path, classes=4, per_class=3, val=8)
    wnids = open(os.path.join(base, "wnids.txt")).read().split()
    assert wnids != sorted(wnids)  # so that a sorted listing of train/ would give other labels
    os.makedirs(os.path.join(base, "train", "n99999999", "images"))  # a folder not in wnids.txt is not a class
    cfg = config("tinyimagenet", tmp_path, tmp_path / "cache")
    images, labels = load_dataset(cfg, "train")
    assert images.shape == (12, 3, 64, 64) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for k, w in enumerate(wnids):  # each label's images are the files of its wnid's folder
        name = sorted(os.listdir(os.path.join(base, "train", w, "images")))[0]
        with Image.open(os.path.join(base, "train", w, "images", name)) as im:
            expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)  # the greyscale original becomes RGB
        assert np.array_equal(images[3 * k].numpy(), expected)
    val_images, val_labels = load_dataset(cfg, "test")
    rows = [line.split("\t") for line in open(os.path.join(base, "val", "val_annotations.txt")).read().splitlines()]
    assert val_images.shape == (8, 3, 64, 64) and val_labels.tolist() == [wnids.index(r[1]) for r in rows]

    with open(os.path.join(base, "val", "val_annotations.txt"), "a") as f:
        f.write("val_99.JPEG\tn00000000\t0\t0\t63\t63\n")
    assert "line 9" in one_line_error(load_dataset, cfg, "test")
    with open(os.path.join(base, "wnids.txt"), "a") as f:
        f.write("n12345678\n")
    message = one_line_error(load_dataset, cfg, "train")
    assert "n12345678" in message and "has no images" in message


def run_entry(script, capsys, *args):
    """An entry script's main() in this process; returns its stdout."""
    import importlib
    capsys.readouterr()
    importlib.import_module(script).main(list(args))
    return capsys.readouterr().out


@pytest.mark.parametrize("dataset,unet,precision", [("cifar10", "G-cond", "bf16"), ("cifar100", "E", "fp16"),
                                                    ("tinyimagenet", "C", "bf16")])
def test_each_dataset_trains_gets_references_samples_scores_and_probes(dataset, unet, precision, tmp_path, capsys):
    """Small networks of the dataset's own config (one epoch, in the config's autocast precision): the files are read
    by every job a real run has."""
    root, cache, run = tmp_path / "data", tmp_path / "cache", str(tmp_path / "run")
    {"cifar10": lambda: write_cifar10(root, per_batch=8, test=16), "cifar100": lambda: write_cifar100(root, train=40, test=16),
     "tinyimagenet": lambda: write_tinyimagenet(root, classes=3, per_class=8, val=12)}[dataset]()
    overrides = [f"data.root={root}", f"data.cache={cache}", "network.model_channels=8", "network.emb_channels=32",
                 "network.channels_per_head=4", "train.epochs=1", "train.batch_size=8", "train.grid_epochs=0",
                 "train.eval_epochs=0", "train.checkpoint_epochs=1", "ema.snapshot_epochs=0", "sample.steps=2", "probe.C_grid=[1.0]",
                 *(f"{s}.precision={precision}" for s in ("train", "sample", "probe"))]
    path = os.path.join(ROOT, "config", dataset, f"{unet}.yaml")
    run_entry("train", capsys, "--config", path, "--outdir", run, *overrides)
    assert os.path.isfile(os.path.join(run, "checkpoints", "epoch_1.pt"))

    from tools import fid
    ref = str(tmp_path / "ref.npz")
    fid.main(["ref", "--config", path, "--out", ref, "--random-weights", "--batch", "64", *overrides])
    train_images = len(load_dataset(load_config(path, overrides), "train")[0])
    meta = json.load(open(ref[:-4] + ".json"))
    assert meta["count"] == train_images and meta["dataset"] == dataset and meta["extractor"] == "inception-v3-RANDOM"

    out = run_entry("sample", capsys, "--outdir", run, "--seeds", "0-19", "--score", "--score-blocks", "2",
                    "--metric-features", "classifier")
    folder = os.path.join(run, "samples", f"epoch_1-classic-heun2-{precision}")
    assert len(os.listdir(os.path.join(folder, "000000"))) == 20 and "quality (classifier)" in out
    quality = json.load(open(folder + ".quality.json"))
    assert quality["count"] == 20 and np.isfinite(quality["FD_classifier"])

    out = run_entry("probe", capsys, "--outdir", run, "--block", "dec.8x8_block0")
    assert 0 <= accuracy_of(out) <= 100
