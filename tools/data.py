"""Datasets as uint8 tensors [N, C, H, W] plus int64 labels, held whole in memory (on the GPU when training there).

Nothing is downloaded: real datasets are read from `data.root`, and a missing one ends with a UserError
that says where to put which files.
"""

import glob
import os

import numpy as np
import torch

from tools.cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".JPEG")


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
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(2024))
    idx = order[:1497] if split == "train" else order[1497:]
    return _resize_uint8(images[idx], resolution), labels[idx]


def _cifar(name, root, split):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        ds = cls(root, train=(split == "train"), download=False)
    except RuntimeError:
        raise UserError(
            f"{name} not found: extract the python version of the dataset so that {os.path.join(root, folder)} exists "
            f"(or, with internet: python -c \"import torchvision; torchvision.datasets.{cls.__name__}('{root}', download=True)\")") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def _read_images(paths, resolution):
    from PIL import Image
    out = np.empty((len(paths), resolution, resolution, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            s = min(im.size)  # centre crop to a square, then resize
            left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if im.size[0] != resolution:
                im = im.resize((resolution, resolution), Image.BICUBIC)
            out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _tinyimagenet(root, split, resolution):
    base = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(os.path.join(base, "train")):
        raise UserError(
            f"tinyimagenet not found: unzip tiny-imagenet-200.zip (from http://cs231n.stanford.edu/tiny-imagenet-200.zip) "
            f"so that {os.path.join(base, 'train')} and {os.path.join(base, 'val')} exist")
    wnids = sorted(os.listdir(os.path.join(base, "train")))
    if split == "train":
        paths, labels = [], []
        for k, w in enumerate(wnids):
            files = sorted(glob.glob(os.path.join(base, "train", w, "images", "*.JPEG")))
            paths += files
            labels += [k] * len(files)
    else:
        with open(os.path.join(base, "val", "val_annotations.txt")) as f:
            rows = [line.split("\t")[:2] for line in f if line.strip()]
        paths = [os.path.join(base, "val", "images", r[0]) for r in rows]
        labels = [wnids.index(r[1]) for r in rows]
    return _read_images(paths, resolution), torch.as_tensor(labels, dtype=torch.int64)


def _folder(root, split, resolution):
    """Any folder of images; sub-folders, if any, are the classes. `split` is ignored (one split)."""
    paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if p.endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f"no images found under data.root={root!r} (looked for {', '.join(IMAGE_EXTENSIONS[:5])})")
    classes = sorted({os.path.relpath(os.path.dirname(p), root) for p in paths})
    labels = [classes.index(os.path.relpath(os.path.dirname(p), root)) for p in paths]
    return _read_images(paths, resolution), torch.as_tensor(labels, dtype=torch.int64)


def load_dataset(cfg, split="train"):
    """(images uint8 [N, C, H, W], labels int64 [N]) for the config's dataset and split ('train' or 'test')."""
    name, root = cfg["data"]["dataset"], cfg["data"]["root"]
    resolution, channels = cfg["network"]["img_resolution"], cfg["network"]["img_channels"]
    if name == "digits":
        images, labels = _digits(split, resolution)
    elif name in ("cifar10", "cifar100"):
        images, labels = _cifar(name, root, split)
    elif name == "tinyimagenet":
        images, labels = _tinyimagenet(root, split, resolution)
    else:
        images, labels = _folder(root, split, resolution)
    if images.shape[1:] != (channels, resolution, resolution):
        raise UserError(f"{name} images are {tuple(images.shape[1:])} (C, H, W) but the network expects "
                        f"({channels}, {resolution}, {resolution}); set network.img_channels / img_resolution to match")
    return images, labels
