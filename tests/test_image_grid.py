import numpy as np
import PIL.Image
import pytest

from training.image_grid import enlarge, save_image_grid, tile_images


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


@pytest.mark.parametrize(
    'shape, min_size, factor', [((64, 64, 3), 512, 8), ((48, 80, 1), 512, 7), ((600, 8, 3), 512, 1)]
)
def test_enlarge_repeats_each_pixel_by_the_smallest_whole_factor(shape, min_size, factor):
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    big = enlarge(image, min_size)
    assert big.shape == (shape[0] * factor, shape[1] * factor, shape[2]) and max(big.shape[:2]) >= min_size
    assert factor == 1 or max(shape[:2]) * (factor - 1) < min_size
    for y, x in [(0, 0), (shape[0] - 1, shape[1] - 1), (shape[0] // 2, 3)]:
        block = big[y * factor : (y + 1) * factor, x * factor : (x + 1) * factor]
        assert (block == image[y, x]).all()


def test_saved_grid_is_the_returned_one(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=[4, 3, 8, 8], dtype=np.uint8)
    grid = save_image_grid(images, str(tmp_path / 'g.png'), min_size=100)
    assert grid.shape == (112, 112, 3)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(tmp_path / 'g.png')), grid)
