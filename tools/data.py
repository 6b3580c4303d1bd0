"""Datasets as uint8 tensors [N, C, H, W] plus int64 labels, held whole in memory (on the GPU when training there).

Nothing is downloaded: real datasets are read from `data.root`, and a missing one ends with a UserError
that says where to put which files. Image files (folder, tinyimagenet) are decoded once into
DATA_CACHE/decoded/; `data.root` is only ever read.
"""

import collections
import concurrent.futures
import fcntl
import hashlib
import json
import os
import pickle

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import tools.dist
from tools.checkpoint import atomic_write, files_named
from tools.cli import UserError

DATASETS = ("digits", "cifar10", "cifar100", "tinyimagenet", "folder")  # data.dataset
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # Matched in any case (.JPG).
DECODE_VERSION = 1  # Part of the decoded-image cache key: bump it when _decode changes its output.


def cache_dir(cfg, *parts):
    """DATA_CACHE/<parts...> (data.cache of the config, absolute): where derived files of a dataset live,
    so that the dataset folder itself is only read."""
    return os.path.join(os.path.abspath(cfg["data"]["cache"]), *parts)


def to_float(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.to(torch.float32) / 127.5 - 1


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255], rounding as PNG writing does."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _resize_uint8(images, resolution):
    """Bilinear (antialiased) resize of uint8 images [N, C, h, w] to resolution x resolution."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    x = torch.nn.functional.interpolate(images.to(torch.float32), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _digits(split, resolution):
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, values 0..16), a fixed 1,497 / 300 split."""
    from sklearn.datasets import load_digits  # lazy: scikit-learn costs seconds to import, and only digits runs need it
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(2024))
    idx = order[:1497] if split == "train" else order[1497:]
    return _resize_uint8(images[idx], resolution), labels[idx]


CIFAR = {  # dataset -> (folder, training files, test files, label key, classes), as in the "python version" archives
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


class _NumpyOnly(pickle.Unpickler):
    """An unpickler for the CIFAR files (Python 2 pickles of dicts, lists, strings and numpy arrays) that builds
    numpy arrays and nothing else: a file that names any other callable is refused, not run."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
               ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0]}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never does")
        return self.ALLOWED[module, name]


def _cifar_file(path, label_key, num_classes):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of one CIFAR batch file; UserError naming the file and what is
    wrong with it (missing, truncated, not a CIFAR batch)."""
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnly(f, encoding="latin1").load()  # Python 2 strings: latin1 gives numpy its raw bytes back
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except Exception as e:  # EOFError (truncated), UnpicklingError (corrupt), ValueError (bad array state), ...
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} cannot be read as a CIFAR batch ({type(e).__name__}: {reason}); the file is truncated or "
                        f"corrupt: extract the archive again") from None
    data, labels = (batch.get("data"), batch.get(label_key)) if isinstance(batch, dict) else (None, None)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path} is not a CIFAR batch: its 'data' should be uint8 [N, 3072], it is {what}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes):
        raise UserError(f"{path} is not a CIFAR batch of {num_classes} classes: its '{label_key}' should be {len(data)} "
                        f"labels in 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _cifar(name, root, split):
    """The images and (fine) labels of CIFAR-10 or CIFAR-100 from the pickled "python version" files, read here
    (a restricted unpickler; no md5 check, so a damaged file is named, not reported as missing)."""
    folder, train_files, test_files, label_key, num_classes = CIFAR[name]
    base = os.path.join(root, folder)
    if not os.path.isdir(base):
        archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        raise UserError(f"{name} not found: extract {archive} (https://www.cs.toronto.edu/~kriz/cifar.html, the python "
                        f"version) into {os.path.abspath(root)} so that {base} exists")
    parts = [_cifar_file(os.path.join(base, f), label_key, num_classes) for f in (train_files if split == "train" else test_files)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _decode(paths, resolution, channels):
    """uint8 [N, C, H, W] of image files: converted to grey (1 channel) or RGB (3), centre-cropped to a square and
    resized. Threads decode in parallel (PIL releases the GIL); a file PIL cannot read raises UserError naming it."""
    out = np.empty((len(paths), resolution, resolution, channels), dtype=np.uint8)

    def decode_one(i):
        try:
            with Image.open(paths[i]) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                s = min(im.size)
                left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
                im = im.crop((left, top, left + s, top + s))
                if im.size[0] != resolution:
                    im = im.resize((resolution, resolution), Image.BICUBIC)
                out[i] = np.asarray(im).reshape(resolution, resolution, channels)
        except UnidentifiedImageError:
            raise UserError(f"image {paths[i]} cannot be decoded (not an image file PIL can read); remove or replace it") from None
        except Exception as e:  # a broken file surfaces as OSError, SyntaxError, ValueError, ... depending on its format
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"image {paths[i]} cannot be decoded ({reason}); remove or replace it") from None

    pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        list(pool.map(decode_one, range(len(paths))))
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, do not decode the rest
    return out.transpose(0, 3, 1, 2)


def _decoded(cfg, split, paths, labels):
    """(images, labels) of image files, decoded once into DATA_CACHE/decoded/ and read from there afterwards.

    The file name carries a hash of everything the pixels and labels depend on (root, split, every file's relative
    path, size and mtime, labels, resolution, channels, DECODE_VERSION), so a changed file decodes again. Of several
    ranks starting at once, the one holding the lock decodes and the others then read its file.
    """
    d, resolution, channels = cfg["data"], cfg["network"]["img_resolution"], cfg["network"]["img_channels"]
    if channels not in (1, 3):
        raise UserError(f"{d['dataset']} images decode to 1 (grey) or 3 (RGB) channels, not network.img_channels={channels}")
    root = os.path.abspath(d["root"])
    key = [d["dataset"], root, split, resolution, channels, DECODE_VERSION, labels]
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise UserError(f"image {p} cannot be read ({e.strerror})") from None
        key.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    path = cache_dir(cfg, "decoded", f"{d['dataset']}-{split}-{resolution}px-{channels}ch-{digest}.npy")
    if not os.path.isfile(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            lock = open(path + ".lock", "a")
        except OSError as e:
            raise UserError(f"cannot write to data.cache={d['cache']!r} ({e.strerror}); point it to a writable folder") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not os.path.isfile(path):
                tools.dist.print0(f"decoding {len(paths):,} images into {path}")
                images = _decode(paths, resolution, channels)
                atomic_write(path, lambda f: np.save(f, images))
    try:
        images = np.load(path)
    except (OSError, ValueError) as e:
        raise UserError(f"decoded images {path} are unreadable ({type(e).__name__}); delete the file to decode again") from None
    return torch.from_numpy(images), torch.as_tensor(labels, dtype=torch.int64)


def _tinyimagenet(cfg, split):
    """Tiny-ImageNet as unzipped: the 200 classes are the lines of wnids.txt (label = line number); training images in
    train/<wnid>/images/, validation images (the held-out split) in val/images/ with their classes in
    val/val_annotations.txt. Anything else in the folders (a .DS_Store, the boxes files, test/) is not read."""
    base = os.path.join(cfg["data"]["root"], "tiny-imagenet-200")
    if not os.path.isdir(os.path.join(base, "train")):
        raise UserError(
            f"tinyimagenet not found: unzip tiny-imagenet-200.zip (from http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
            f"so that {os.path.join(base, 'train')} and {os.path.join(base, 'val')} exist")
    wnids_path = os.path.join(base, "wnids.txt")
    try:
        with open(wnids_path) as f:
            wnids = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"{wnids_path} cannot be read ({e.strerror}); it lists the classes: unzip the archive again") from None
    label_of = {w: k for k, w in enumerate(wnids)}
    if not wnids or len(label_of) != len(wnids):
        raise UserError(f"{wnids_path} must list each class (wnid) once, one per line")
    if split == "train":
        paths, labels = [], []
        for k, w in enumerate(wnids):
            files = files_named(os.path.join(base, "train", w, "images"), suffix=".JPEG")
            if not files:
                raise UserError(f"class {w} of {wnids_path} has no images in {os.path.join(base, 'train', w, 'images')}")
            paths += files
            labels += [k] * len(files)
    else:
        annotations = os.path.join(base, "val", "val_annotations.txt")
        try:
            with open(annotations) as f:
                rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
        except OSError as e:
            raise UserError(f"{annotations} cannot be read ({e.strerror}); it gives the validation images' classes") from None
        for n, row in enumerate(rows, 1):
            if len(row) < 2 or row[1] not in label_of:
                raise UserError(f"{annotations} line {n}: expected '<file>\\t<wnid>\\t...' with a wnid of wnids.txt, "
                                f"got {chr(9).join(row)[:80]!r}")
        paths = [os.path.join(base, "val", "images", r[0]) for r in rows]
        labels = [label_of[r[1]] for r in rows]
    return _decoded(cfg, split, paths, labels)


def _split_folder(root, split):
    """ROOT/train for training and ROOT/test (else ROOT/val) for testing when ROOT/train exists; else ROOT, training only."""
    if not os.path.isdir(root):
        raise UserError(f"folder dataset: data.root={root!r} is not a folder")
    if not os.path.isdir(os.path.join(root, "train")):
        if split == "train":
            return root
    elif split == "train":
        return os.path.join(root, "train")
    else:
        for name in ("test", "val"):
            if os.path.isdir(os.path.join(root, name)):
                return os.path.join(root, name)
    raise UserError(f"folder dataset {root} has no test/ or val/ sub-folder beside train/: put held-out images in "
                    f"{os.path.join(root, 'test', '<class>')}/ and training images in {os.path.join(root, 'train', '<class>')}/ "
                    f"(the linear probe and memorisation need them)")


def _class_folders(folder):
    """Sorted names of the sub-folders; hidden ones (.git, .ipynb_checkpoints) are not classes."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _folder(cfg, split):
    """A folder of images, laid out as ROOT/train/<class>/ plus ROOT/test/<class>/ (or val/), or as ROOT/<class>/
    (training only). Labels are indices into the sorted class names of the training folder; a folder without
    class sub-folders is one class. Prints what it found, including the files it skipped."""
    root = os.path.abspath(cfg["data"]["root"])
    train_folder, folder = _split_folder(root, "train"), _split_folder(root, split)
    classes = _class_folders(train_folder)
    label_of = {c: k for k, c in enumerate(classes)}
    unknown = sorted(set(_class_folders(folder)) - set(classes))
    if unknown:
        raise UserError(f"class folder {os.path.join(folder, unknown[0])} has no counterpart in {train_folder}; "
                        f"test classes must be training classes (so that they get the same labels)")
    paths, labels, skipped = [], [], collections.Counter()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        rel = os.path.relpath(dirpath, folder)
        for name in sorted(filenames):
            ext = os.path.splitext(name)[1]
            if ext.lower() not in IMAGE_EXTENSIONS:
                skipped[ext or name] += 1
            elif rel != ".":
                paths.append(os.path.join(dirpath, name))
                labels.append(label_of[rel.split(os.sep)[0]])
            elif not classes:
                paths.append(os.path.join(dirpath, name))
                labels.append(0)
            else:
                raise UserError(f"image {os.path.join(dirpath, name)} lies beside the class sub-folders of {folder}; "
                                f"move it into one of them")
    found = f"skipped {_plural(sum(skipped.values()), 'file')} ({', '.join(f'{n} {e}' for e, n in skipped.most_common())})"
    if not paths:
        raise UserError(f"no images found under {folder} (looked for {' '.join(IMAGE_EXTENSIONS)} in any case)"
                        + (f"; {found}" if skipped else ""))
    counts = np.bincount(labels, minlength=max(len(classes), 1))
    if split == "train" and counts.min() == 0:
        raise UserError(f"class folder {os.path.join(folder, classes[int(counts.argmin())])} holds no images; add some or remove it")
    present = counts[counts > 0]
    summary = f"folder dataset {folder}: {_plural(len(paths), 'image')} in "
    summary += _plural(len(present), "class") if len(present) == len(counts) else f"{len(present)} of {_plural(len(counts), 'class')}"
    if len(counts) > 1:
        spread = f"{present.min():,}" + (f"-{present.max():,}" if present.max() > present.min() else "")
        summary += f" ({spread} per class)"
    tools.dist.print0(summary + (f"; {found}" if skipped else ""))
    return _decoded(cfg, split, paths, labels)


def load_dataset(cfg, split="train"):
    """(images uint8 [N, C, H, W], labels int64 [N]) for the config's dataset and split ('train' or 'test'), whole."""
    name, root = cfg["data"]["dataset"], cfg["data"]["root"]
    resolution, channels = cfg["network"]["img_resolution"], cfg["network"]["img_channels"]
    if name == "digits":
        images, labels = _digits(split, resolution)
    elif name in ("cifar10", "cifar100"):
        images, labels = _cifar(name, root, split)
    elif name == "tinyimagenet":
        images, labels = _tinyimagenet(cfg, split)
    else:
        images, labels = _folder(cfg, split)
    if images.shape[1:] != (channels, resolution, resolution):
        raise UserError(f"{name} images are {tuple(images.shape[1:])} (C, H, W) but the network expects "
                        f"({channels}, {resolution}, {resolution}); set network.img_channels / img_resolution to match")
    return images, labels


def trained_images(cfg):
    """The images a run trains on: the training split, cut to its first data.max_images when that is set. The
    metrics' references (the dataset classifier, the FD statistics, the probe) keep the whole split, so that
    runs on different amounts of data are measured alike."""
    images, labels = load_dataset(cfg, "train")
    limit = cfg["data"].get("max_images", 0)
    return (images[:limit], labels[:limit]) if limit else (images, labels)
