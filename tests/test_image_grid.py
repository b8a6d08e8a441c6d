import numpy as np

from training.image_grid import tile_images


def test_tile_places_each_image_in_its_cell_row_by_row():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=[5, 3, 4, 6], dtype=np.uint8)
    grid = tile_images(images, grid_w=2)
    assert grid.shape == (3 * 4, 2 * 6, 3)
    for i in range(5):
        row, col = divmod(i, 2)
        cell = grid[row * 4 : (row + 1) * 4, col * 6 : (col + 1) * 6]
        np.testing.assert_array_equal(cell, images[i].transpose(1, 2, 0))
    assert not grid[8:, 6:].any()


def test_default_grid_is_square_enough():
    images = np.ones([16, 1, 2, 2], dtype=np.uint8)
    assert tile_images(images).shape == (8, 8, 1)
