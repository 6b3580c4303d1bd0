"""Pictures a person can read: small images enlarged nearest-neighbour and tiled with grey separators."""

import math

import numpy as np
import torch
from PIL import Image

from tools.checkpoint import atomic_write

MIN_TILE = 64  # pixels of a tile's side at least (a 16x16 digit is shown 4x)
PAD = 2        # separator width in pixels of the enlarged grid
GREY = 128


def enlarge(images, min_tile=MIN_TILE):
    """uint8 [N, C, H, W] enlarged by the smallest integer factor that makes H >= min_tile (nearest-neighbour)."""
    factor = max(1, math.ceil(min_tile / images.shape[-2]))
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_grid(images, nrow=None, min_tile=MIN_TILE):
    """uint8 [C, H, W] picture of uint8 images [N, C, H, W], `nrow` per row (default: a square)."""
    from torchvision.utils import make_grid  # lazy: seconds of start-up (it imports torch._dynamo)
    images = torch.as_tensor(images)
    return make_grid(enlarge(images, min_tile), nrow=nrow or math.ceil(math.sqrt(len(images))), padding=PAD, pad_value=GREY)


def pairs_grid(left, right, ncol=4, min_tile=MIN_TILE):
    """uint8 [C, H, W] picture of image pairs, left[i] beside right[i], `ncol` pairs per row."""
    from torchvision.utils import make_grid  # lazy: torchvision costs seconds of start-up
    left, right = enlarge(torch.as_tensor(left), min_tile), enlarge(torch.as_tensor(right), min_tile)
    gap = torch.full((*left.shape[:3], PAD), GREY, dtype=left.dtype)
    return make_grid(torch.cat([left, gap, right], dim=3), nrow=ncol, padding=3 * PAD, pad_value=GREY)


def save_picture(path, picture):
    """Write a uint8 [C, H, W] picture (C = 1 or 3) as PNG, atomically. Returns `path`."""
    array = np.ascontiguousarray(picture.permute(1, 2, 0).cpu().numpy())
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return path
