"""Folder datasets: train/test layout and labels, what is loaded and skipped, clear errors, the decoded-image cache."""

import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tools import data
from tools.cli import UserError
from tools.config import load_config
from tools.data import load_dataset, trained_images

from conftest import DIGITS, one_line_error

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}


def make_image(path, colour, size=(20, 24)):
    """A flat-coloured image; the format follows the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG")


def folder_cfg(root, cache, channels=3):
    return load_config("config/digits/E.yaml", ["data.dataset=folder", f"data.root={root}", f"data.cache={cache}",
                                                "network.img_resolution=16", f"network.img_channels={channels}"])


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


@pytest.fixture
def split_root(tmp_path):
    """train/{cat 3, dog 2, eel 1} and test/{dog 2, eel 1}: test lacks a class, so its labels must come from train."""
    root = tmp_path / "data"
    for split, counts in (("train", {"cat": 3, "dog": 2, "eel": 1}), ("test", {"dog": 2, "eel": 1})):
        for cls, n in counts.items():
            for i in range(n):
                make_image(str(root / split / cls / f"{i}.png"), COLOURS[cls])
    return root


def test_train_and_test_folders_share_class_labels(split_root, tmp_path, capsys):
    cfg = folder_cfg(split_root, tmp_path / "cache")
    images, labels = load_dataset(cfg, "train")
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]  # cat, dog, eel: sorted class names
    test_images, test_labels = load_dataset(cfg, "test")
    assert test_labels.tolist() == [1, 1, 2]  # dog and eel keep their training labels although test has no cat
    for k, cls in enumerate(COLOURS):  # each label's pixels are its class's colour (PNG, so exact)
        for x in (images[labels == k], test_images[test_labels == k]):
            assert (x == torch.tensor(COLOURS[cls], dtype=torch.uint8)[:, None, None]).all()
    out = capsys.readouterr().out
    assert f"folder dataset {split_root / 'train'}: 6 images in 3 classes (1-3 per class)" in out
    assert f"folder dataset {split_root / 'test'}: 3 images in 2 of 3 classes (1-2 per class)" in out


def test_val_folder_is_the_test_split_and_unknown_test_class_is_named(split_root, tmp_path):
    os.rename(split_root / "test", split_root / "val")
    cfg = folder_cfg(split_root, tmp_path / "cache")
    assert load_dataset(cfg, "test")[1].tolist() == [1, 1, 2]
    make_image(str(split_root / "val" / "fox" / "0.png"), (9, 9, 9))
    with pytest.raises(UserError, match=f"class folder {split_root / 'val' / 'fox'} has no counterpart"):
        load_dataset(cfg, "test")


def test_upper_case_extensions_load_and_other_files_are_reported(tmp_path, capsys):
    root = tmp_path / "data"
    make_image(str(root / "a" / "0.JPG"), (10, 10, 10))
    make_image(str(root / "a" / "1.PNG"), (10, 10, 10))
    make_image(str(root / "b" / "0.jpeg"), (250, 250, 250))
    for name in ("a/notes.txt", "b/labels.txt", "b/.DS_Store"):
        (root / name).write_text("not an image")
    images, labels = load_dataset(folder_cfg(root, tmp_path / "cache"), "train")
    assert images.shape == (3, 3, 16, 16) and labels.tolist() == [0, 0, 1]
    assert (images[2].float().mean() - 250).abs() < 3  # JPEG: close to its colour
    out = capsys.readouterr().out
    assert f"folder dataset {root}: 3 images in 2 classes (1-2 per class); skipped 3 files (2 .txt, 1 .DS_Store)" in out


def test_flat_folder_is_one_class(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        make_image(str(root / f"{i}.png"), (i, i, i))
    images, labels = load_dataset(folder_cfg(root, tmp_path / "cache"), "train")
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 0]


def test_truncated_image_is_named_in_one_line(split_root, tmp_path):
    bad = split_root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(UserError) as e:
        load_dataset(folder_cfg(split_root, tmp_path / "cache"), "train")
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "cache" / "decoded") or not any(
        f.endswith(".npy") for f in os.listdir(tmp_path / "cache" / "decoded"))  # nothing half-decoded is cached


def test_no_test_folder_trains_but_refuses_the_test_split(tmp_path):
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        make_image(str(root / cls / "0.png"), COLOURS[cls])
    cfg = folder_cfg(root, tmp_path / "cache")
    assert load_dataset(cfg, "train")[1].tolist() == [0, 1]
    with pytest.raises(UserError, match="has no test/ or val/ sub-folder") as e:
        load_dataset(cfg, "test")  # never the training images as held-out ones
    assert os.path.join(str(root), "test", "<class>") in str(e.value) and "\n" not in str(e.value)
    make_image(str(root / "train" / "cat" / "0.png"), COLOURS["cat"])  # train/ without test/ beside it
    with pytest.raises(UserError, match="has no test/ or val/ sub-folder"):
        load_dataset(cfg, "test")


def test_one_channel_network_gets_grey_images(split_root, tmp_path):
    images, _ = load_dataset(folder_cfg(split_root, tmp_path / "cache", channels=1), "train")
    assert images.shape == (6, 1, 16, 16)
    r, g, b = COLOURS["cat"]
    assert abs(int(images[0, 0, 0, 0]) - (r * 299 + g * 587 + b * 114) / 1000) <= 1  # ITU-R 601 luma, as PIL's "L"


def test_decoded_cache_lives_in_data_cache_and_follows_the_files(split_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cfg = folder_cfg(split_root, cache)
    before = snapshot(split_root)
    images, labels = load_dataset(cfg, "train")
    assert snapshot(split_root) == before  # the dataset folder is only read
    cached = [f for f in os.listdir(cache / "decoded") if f.endswith(".npy")]
    assert len(cached) == 1 and cached[0].startswith("folder-train-16px-3ch-")

    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded although the cache is valid"))
    again, again_labels = load_dataset(cfg, "train")
    assert torch.equal(again, images) and torch.equal(again_labels, labels)

    monkeypatch.setattr(data, "_decode", decode)
    path = split_root / "train" / "cat" / "0.png"
    make_image(str(path), (0, 0, 0))  # same size, new content and mtime
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse file-system clock still sees the change
    images2, _ = load_dataset(cfg, "train")
    assert (images2[0] == 0).all() and torch.equal(images2[1:], images[1:])
    make_image(str(split_root / "train" / "eel" / "1.png"), COLOURS["eel"])
    assert load_dataset(cfg, "train")[1].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert len([f for f in os.listdir(cache / "decoded") if f.endswith(".npy")]) == 3


def test_concurrent_loads_decode_once(split_root, tmp_path, monkeypatch):
    """Ranks starting together: the lock lets one decode, the others read its file."""
    calls, decode = [], data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: calls.append(1) or decode(*a))
    cfg, results = folder_cfg(split_root, tmp_path / "cache"), []
    threads = [threading.Thread(target=lambda: results.append(load_dataset(cfg, "train")[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and all(torch.equal(r, results[0]) for r in results)
    assert np.array_equal(results[0].numpy(), load_dataset(cfg, "train")[0].numpy())


def test_max_images_cuts_what_is_trained_on_and_nothing_else():
    """data.max_images keeps the first N training images (the fixed shuffled order) for training; the whole splits
    stay what the metrics' references are made of."""
    full = load_config(DIGITS)
    small = load_config(DIGITS, ["data.max_images=300"])
    train_full, labels_full = load_dataset(full, "train")
    train, labels = trained_images(small)
    assert torch.equal(train, train_full[:300]) and torch.equal(labels, labels_full[:300])
    assert torch.equal(trained_images(full)[0], train_full) and torch.equal(load_dataset(small, "train")[0], train_full)
    assert "data.max_images" in one_line_error(load_config, DIGITS, ["data.max_images=-1"])
