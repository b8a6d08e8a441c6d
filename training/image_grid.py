"""Tiling a batch of images into one PNG, for training sample grids and generate_images.py --grid."""

import math

import numpy as np
import PIL.Image

import dnnlib

GRID_MIN_SIZE = 512  # Training grids are enlarged to at least this many pixels on their longer side.


def tile_images(images: np.ndarray, grid_w: int | None = None) -> np.ndarray:
    """Arrange uint8 images [N, C, H, W] row by row into one HWC image; missing cells stay black."""
    n, c, h, w = images.shape
    grid_w = grid_w or math.ceil(math.sqrt(n))
    grid_h = math.ceil(n / grid_w)
    canvas = np.zeros([grid_h * grid_w, c, h, w], dtype=np.uint8)
    canvas[:n] = images
    canvas = canvas.reshape(grid_h, grid_w, c, h, w).transpose(0, 3, 1, 4, 2)
    return canvas.reshape(grid_h * h, grid_w * w, c)


def enlarge(image: np.ndarray, min_size: int) -> np.ndarray:
    """An HWC image scaled up by the smallest whole factor that makes its longer side at least `min_size`,
    each pixel repeated (nearest neighbour), so that tiny samples are seen as they are, not blurred."""
    factor = max(1, math.ceil(min_size / max(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def save_image_grid(images: np.ndarray, path: str, grid_w: int | None = None, min_size: int = 0) -> np.ndarray:
    """Write uint8 images [N, C, H, W] (C = 1 or 3) as one PNG grid, atomically, enlarged to `min_size` pixels;
    returns the grid as written (HWC)."""
    grid = enlarge(tile_images(np.asarray(images), grid_w), min_size)
    image = PIL.Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    with dnnlib.util.atomic_write(path) as f:
        image.save(f, format='PNG')
    return grid
