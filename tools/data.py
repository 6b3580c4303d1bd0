"""Datasets as whole uint8 tensors [N, C, H, W] and int64 labels, read from `data.root` (never written to)."""

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
from tools.cli import UserError, first_line

DATASETS = ("digits", "cifar10", "cifar100", "tinyimagenet", "folder")  # data.dataset
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # in any case (.JPG)
DECODE_VERSION = 1  # of the decoded-image cache key: bump it when _decode changes
CIFAR = {  # (folder, training files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


def cache_dir(cfg, *parts):
    return os.path.join(os.path.abspath(cfg["data"]["cache"]), *parts)


def to_float(images_uint8):
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_uint8.to(torch.float32) / 127.5 - 1


def to_uint8(images):
    """float [-1, 1] -> uint8 [0, 255], rounding as PNG writing does."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _digits(split, resolution):
    """scikit-learn's digits (1,797 8x8 images, values 0..16), a fixed 1,497 / 300 split, resized bilinearly."""
    from sklearn.datasets import load_digits  # lazy: seconds of start-up
    d = load_digits()
    order = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(2024))
    idx = order[:1497] if split == "train" else order[1497:]
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None][idx]
    if images.shape[-1] != resolution:
        images = torch.nn.functional.interpolate(images.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                                                 align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return images, torch.from_numpy(d.target.astype(np.int64))[idx]


class _NumpyOnly(pickle.Unpickler):
    """An unpickler for the CIFAR files that builds numpy arrays and nothing else: any other callable is refused."""

    RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT, ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never does")
        return self.ALLOWED[module, name]


def _cifar_file(path, label_key, num_classes):
    try:
        with open(path, "rb") as f:
            batch = _NumpyOnly(f, encoding="latin1").load()  # Python 2 strings: latin1 gives numpy its raw bytes
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except Exception as e:  # EOFError (truncated), UnpicklingError, ValueError, ...
        raise UserError(f"{path} cannot be read as a CIFAR batch ({type(e).__name__}: {first_line(e)}); the file is truncated or "
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
    folder, train_files, test_files, label_key, num_classes = CIFAR[name]
    base = os.path.join(root, folder)
    if not os.path.isdir(base):
        raise UserError(f"{name} not found: extract {name.replace('cifar', 'cifar-')}-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html, "
                        f"the python version) into {os.path.abspath(root)} so that {base} exists")
    parts = [_cifar_file(os.path.join(base, f), label_key, num_classes) for f in (train_files if split == "train" else test_files)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _decode(paths, resolution, channels):
    """uint8 [N, C, H, W] of image files, grey or RGB, centre-cropped to a square and resized, by threads."""
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
        except Exception as e:  # OSError, SyntaxError, ... depending on the format
            reason = "not an image file PIL can read" if isinstance(e, UnidentifiedImageError) else first_line(e)
            raise UserError(f"image {paths[i]} cannot be decoded ({reason}); remove or replace it") from None

    pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
    try:
        list(pool.map(decode_one, range(len(paths))))
    finally:
        pool.shutdown(cancel_futures=True)  # after a bad file, do not decode the rest
    return out.transpose(0, 3, 1, 2)


def _decoded(cfg, split, paths, labels):
    """(images, labels) of image files, decoded once into data.cache/decoded/, by one rank under a lock."""
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


def _read_lines(path, what):
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); {what}") from None


def _tinyimagenet(cfg, split):
    """Tiny-ImageNet as unzipped; the held-out split is val/, the label the line of wnids.txt."""
    base = os.path.join(cfg["data"]["root"], "tiny-imagenet-200")
    if not os.path.isdir(os.path.join(base, "train")):
        raise UserError(f"tinyimagenet not found: unzip tiny-imagenet-200.zip (from http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
                        f"so that {os.path.join(base, 'train')} and {os.path.join(base, 'val')} exist")
    wnids_path = os.path.join(base, "wnids.txt")
    wnids = [w.strip() for w in _read_lines(wnids_path, "it lists the classes: unzip the archive again")]
    label_of = {w: k for k, w in enumerate(wnids)}
    if not wnids or len(label_of) != len(wnids):
        raise UserError(f"{wnids_path} must list each class (wnid) once, one per line")
    paths, labels = [], []
    if split == "train":
        for k, w in enumerate(wnids):
            folder = os.path.join(base, "train", w, "images")
            files = files_named(folder, suffix=".JPEG")
            if not files:
                raise UserError(f"class {w} of {wnids_path} has no images in {folder}")
            paths, labels = paths + files, labels + [k] * len(files)
        return _decoded(cfg, split, paths, labels)
    annotations = os.path.join(base, "val", "val_annotations.txt")
    for n, line in enumerate(_read_lines(annotations, "it gives the validation images' classes"), 1):
        row = line.split("\t")
        if len(row) < 2 or row[1] not in label_of:
            raise UserError(f"{annotations} line {n}: expected '<file>\\t<wnid>\\t...' with a wnid of wnids.txt, got {line[:80]!r}")
        paths.append(os.path.join(base, "val", "images", row[0]))
        labels.append(label_of[row[1]])
    return _decoded(cfg, split, paths, labels)


def _split_folder(root, split):
    """ROOT/train and ROOT/test (else ROOT/val) when ROOT/train exists; else ROOT, for training only."""
    if not os.path.isdir(root):
        raise UserError(f"folder dataset: data.root={root!r} is not a folder")
    has_train = os.path.isdir(os.path.join(root, "train"))
    if split == "train":
        return os.path.join(root, "train") if has_train else root
    for name in ("test", "val") if has_train else ():
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise UserError(f"folder dataset {root} has no test/ or val/ sub-folder beside train/: put held-out images in "
                    f"{os.path.join(root, 'test', '<class>')}/ and training images in {os.path.join(root, 'train', '<class>')}/ "
                    f"(the linear probe and memorisation need them)")


def _class_folders(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))  # not .git


def _plural(n, word):
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def _folder(cfg, split):
    """ROOT/{train,test or val}/<class>/ or ROOT/<class>/; labels index the sorted training class names."""
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
            elif rel == "." and classes:
                raise UserError(f"image {os.path.join(dirpath, name)} lies beside the class sub-folders of {folder}; move it into one")
            else:
                paths.append(os.path.join(dirpath, name))
                labels.append(0 if rel == "." else label_of[rel.split(os.sep)[0]])
    found = f"; skipped {_plural(sum(skipped.values()), 'file')} ({', '.join(f'{n} {e}' for e, n in skipped.most_common())})" if skipped else ""
    if not paths:
        raise UserError(f"no images found under {folder} (looked for {' '.join(IMAGE_EXTENSIONS)} in any case){found}")
    counts = np.bincount(labels, minlength=max(len(classes), 1))
    if split == "train" and counts.min() == 0:
        raise UserError(f"class folder {os.path.join(folder, classes[int(counts.argmin())])} holds no images; add some or remove it")
    present = counts[counts > 0]
    summary = f"folder dataset {folder}: {_plural(len(paths), 'image')} in "
    summary += _plural(len(present), "class") if len(present) == len(counts) else f"{len(present)} of {_plural(len(counts), 'class')}"
    if len(counts) > 1:
        summary += f" ({present.min():,}" + (f"-{present.max():,}" if present.max() > present.min() else "") + " per class)"
    tools.dist.print0(summary + found)
    return _decoded(cfg, split, paths, labels)


def load_dataset(cfg, split="train"):
    """(images uint8 [N, C, H, W], labels int64 [N]) of the config's dataset and split ('train' or 'test'), whole."""
    name, root = cfg["data"]["dataset"], cfg["data"]["root"]
    resolution, channels = cfg["network"]["img_resolution"], cfg["network"]["img_channels"]
    if name == "digits":
        images, labels = _digits(split, resolution)
    elif name in CIFAR:
        images, labels = _cifar(name, root, split)
    else:
        images, labels = (_tinyimagenet if name == "tinyimagenet" else _folder)(cfg, split)
    if images.shape[1:] != (channels, resolution, resolution):
        raise UserError(f"{name} images are {tuple(images.shape[1:])} (C, H, W) but the network expects "
                        f"({channels}, {resolution}, {resolution}); set network.img_channels / img_resolution to match")
    return images, labels


def trained_images(cfg):
    """The training split cut to data.max_images; the metrics' references keep the whole split."""
    images, labels = load_dataset(cfg, "train")
    limit = cfg["data"].get("max_images", 0)
    return (images[:limit], labels[:limit]) if limit else (images, labels)
