"""Small fake datasets in the real on-disk layouts of CIFAR-10, CIFAR-100 and Tiny-ImageNet, for the tests.

The CIFAR files are written as the originals were, Python 2 pickles (protocol 2): dict keys and strings as Python 2
byte strings, the images a numpy uint8 array [N, 3072] pickled as numpy 1 did (numpy.core.multiarray._reconstruct),
the labels a list of ints.
"""

import os
import pickle
import struct

import numpy as np
from PIL import Image


class _Global:
    """A module-level name written into the pickle as it is spelled here (numpy's names of the original files)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce requires a callable
        raise NotImplementedError


class Python2Pickler(pickle._Pickler):
    """Protocol 2 with Python 2's byte strings (BINSTRING) for str and bytes, and numpy arrays as numpy 1 reduced them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f):
        super().__init__(f, protocol=2)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_name(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[str] = dispatch[bytes] = save_py2_str
    dispatch[_Global] = save_name

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            return (_Global("numpy.core.multiarray", "_reconstruct"), (_Global("numpy", "ndarray"), (0,), "b"),
                    (1, obj.shape, obj.dtype, False, obj.tobytes()))
        if isinstance(obj, np.dtype):
            return _Global("numpy", "dtype"), (obj.str[1:], 0, 1), (3, "|", None, None, None, -1, -1, 0)
        return NotImplemented


def write_python2_pickle(path, obj):
    with open(path, "wb") as f:
        Python2Pickler(f).dump(obj)


def _cifar_batch(rng, n, label_keys, name):
    """A batch dict with the original keys; images are class-dependent so that a classifier can tell classes apart."""
    batch = {"batch_label": name, "filenames": [f"image_{i:05d}.png" for i in range(n)]}
    for key, classes in label_keys.items():
        batch[key] = [int(c) for c in rng.integers(0, classes, n)]
    main = batch[next(iter(label_keys))]
    base = (np.array(main)[:, None] * 97 % 256).astype(np.int64)  # a class-dependent brightness
    batch["data"] = np.clip(base + rng.integers(-40, 41, (n, 3072)), 0, 255).astype(np.uint8)
    return batch


def write_cifar10(root, per_batch=20, test=40, seed=0):
    """ROOT/cifar-10-batches-py/ with data_batch_1..5 (per_batch images each), test_batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for i in range(1, 6):
        write_python2_pickle(os.path.join(folder, f"data_batch_{i}"),
                             _cifar_batch(rng, per_batch, {"labels": 10}, f"training batch {i} of 5"))
    write_python2_pickle(os.path.join(folder, "test_batch"), _cifar_batch(rng, test, {"labels": 10}, "testing batch 1 of 1"))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_python2_pickle(os.path.join(folder, "batches.meta"), {"num_cases_per_batch": per_batch, "label_names": names,
                                                                "num_vis": 3072})
    return folder


def write_cifar100(root, train=100, test=40, seed=0):
    """ROOT/cifar-100-python/ with train, test (fine and coarse labels) and meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        write_python2_pickle(os.path.join(folder, name), _cifar_batch(rng, n, {"fine_labels": 100, "coarse_labels": 20}, name))
    write_python2_pickle(os.path.join(folder, "meta"), {"fine_label_names": [f"fine{i}" for i in range(100)],
                                                        "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return folder


def write_tinyimagenet(root, classes=3, per_class=12, val=9, seed=0):
    """ROOT/tiny-imagenet-200/ with wnids.txt (`classes` wnids, in descending order), train/<wnid>/images/*.JPEG
    and <wnid>_boxes.txt, val/images/ and val/val_annotations.txt; one training image is greyscale, as some of the
    originals are. Returns the folder."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{1443537 + 7919 * (classes - 1 - k):08d}" for k in range(classes)]  # descending
    base = os.path.join(root, "tiny-imagenet-200")

    def image(path, k, grey=False):
        pixels = np.clip(k * 80 % 256 + rng.integers(-30, 31, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels[..., 0] if grey else pixels).save(path, "JPEG")

    for k, w in enumerate(wnids):
        os.makedirs(os.path.join(base, "train", w, "images"))
        with open(os.path.join(base, "train", w, f"{w}_boxes.txt"), "w") as boxes:
            for i in range(per_class):
                name = f"{w}_{i}.JPEG"
                image(os.path.join(base, "train", w, "images", name), k, grey=(k, i) == (0, 0))
                boxes.write(f"{name}\t0\t0\t63\t63\n")
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        for i in range(val):
            k = i % len(wnids)
            image(os.path.join(base, "val", "images", f"val_{i}.JPEG"), k)
            f.write(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63\n")
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("".join(w + "\n" for w in wnids))
    open(os.path.join(base, "train", ".DS_Store"), "w").close()  # a file browser's leftover: not a class
    return base
