"""tools/grid.py: pictures a person can read: small images enlarged pixel for pixel, tiled with separators."""

import numpy as np
import torch

from tools.grid import GREY, PAD, enlarge, image_grid, pairs_grid


def test_enlarge_repeats_each_pixel_into_a_square():
    x = torch.randint(0, 256, (2, 1, 16, 12), dtype=torch.uint8)
    big = enlarge(x)
    assert big.shape == (2, 1, 64, 48)
    np.testing.assert_array_equal(big.numpy(), np.kron(x.numpy(), np.ones((4, 4), np.uint8)))
    assert enlarge(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[-1] == 64  # large enough already


def test_image_grid_tiles_with_grey_separators():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    grid = image_grid(x, nrow=3)
    tile = 64 + PAD
    assert grid.shape == (3, 2 * tile + PAD, 3 * tile + PAD) and grid.dtype == torch.uint8
    np.testing.assert_array_equal(grid[:, PAD:PAD + 64, tile + PAD:tile + PAD + 64].numpy(), enlarge(x)[1].numpy())
    assert (grid[:, :PAD] == GREY).all() and (grid[:, :, tile:tile + PAD] == GREY).all()
    assert (grid[:, tile + PAD:, 2 * tile + PAD:] == GREY).all()  # the sixth place is empty


def test_pairs_sit_side_by_side():
    left, right = (torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8) for _ in range(2))
    grid = pairs_grid(left, right, ncol=4)
    pad = 3 * PAD
    assert grid.shape[1:] == (2 * (64 + pad) + pad, 4 * (2 * 64 + PAD + pad) + pad)
    top, first = pad, pad
    np.testing.assert_array_equal(grid[0, top:top + 64, first:first + 64].numpy(), enlarge(left)[0, 0].numpy())
    np.testing.assert_array_equal(grid[0, top:top + 64, first + 64 + PAD:first + 128 + PAD].numpy(), enlarge(right)[0, 0].numpy())
