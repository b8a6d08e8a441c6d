"""Read back what an image of the built-in shapes data shows: shape, foreground and background colour,
position, and whether it is one clean shape, by fitting training/shapes.py's own geometry.

The background is the palette colour nearest the border pixels' median; every pixel's coverage is its
position on the line from the background to the foreground colour (the renderer mixes exactly so). Each of
the five shapes is then fitted to the coverage map: its radius from the covered area, its centre from the
coverage centroid (minus the shape's own centroid offset, e.g. the triangle's), and the shape whose
rendering overlaps the coverage best (soft IoU) wins. The position is the fitted centre's nearest anchor.

An image is a *clean* single shape when the fit explains the coverage (IoU >= CLEAN_IOU) and the
foreground is one connected region: blobs, fragments, two shapes or an empty tile fail it. Used by
bench/demo_quality.py and bench/prompt_adherence.py; checked against the dataset's own labels in tests.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from training.shapes import (
    COLOR_NAMES,
    PALETTE,
    POSITIONS,
    SHAPES,
    Scene,
    dominant_foreground_color,
    nearest_color,
    render_scene,
)

CLEAN_IOU = 0.8  # Dataset images fit at >= 0.9 (tests); a blob that is no shape of the five stays below.
_FOREGROUND = 0.5  # Coverage above which a pixel counts as foreground for connectivity.
_NOISE_FLOOR = 0.2


@dataclass(frozen=True)
class Attributes:
    shape: str | None  # None: no foreground at all
    color: str | None
    background: str
    position: str | None
    iou: float  # how well the best shape explains the coverage, 0..1
    regions: int  # connected foreground regions

    @property
    def clean(self) -> bool:
        return self.shape is not None and self.iou >= CLEAN_IOU and self.regions == 1


@functools.cache
def _unit_geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid dx, centroid dy) of a shape of radius 1 centred at 0, from a fine rendering."""
    resolution, radius = 256, 0.3
    scene = Scene(shape, 'white', 'black', 'center', (0.5, 0.5), radius)
    cover = _coverage_of(render_scene(scene, resolution), PALETTE['black'], PALETTE['white'])
    ys, xs = (np.mgrid[:resolution, :resolution] + 0.5) / resolution
    total = cover.sum()
    return (
        total / resolution**2 / radius**2,
        float((cover * xs).sum() / total - 0.5) / radius,
        float((cover * ys).sum() / total - 0.5) / radius,
    )


def _coverage_of(image: np.ndarray, background: tuple[int, ...], foreground: tuple[int, ...]) -> np.ndarray:
    """Per pixel, the a with pixel ≈ background + a·(foreground − background), mapped so that the outer
    _NOISE_FLOOR at each end reads as exactly 0 or 1: a generated image's noise then adds no area."""
    b, f = np.asarray(background, dtype=np.float64), np.asarray(foreground, dtype=np.float64)
    offsets = np.asarray(image, dtype=np.float64)[..., :3] - b
    return np.clip((offsets @ (f - b) / ((f - b) ** 2).sum() - _NOISE_FLOOR) / (1 - 2 * _NOISE_FLOOR), 0, 1)


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-9))


def classify(image: np.ndarray) -> Attributes:
    """Attributes of a uint8 HWC image of the shapes data (any resolution)."""
    image = np.asarray(image)
    resolution = image.shape[0]
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])[:, :3]
    background = nearest_color(np.median(border.astype(np.float64), axis=0))
    color = dominant_foreground_color(image, PALETTE[background])
    if color is None or color == background:
        return Attributes(None, None, background, None, 0.0, 0)
    cover = _coverage_of(image, PALETTE[background], PALETTE[color])
    regions = int(scipy.ndimage.label(cover > _FOREGROUND)[1])
    ys, xs = (np.mgrid[:resolution, :resolution] + 0.5) / resolution
    total = cover.sum()
    if total < 1:
        return Attributes(None, color, background, None, 0.0, regions)
    centroid = (float((cover * xs).sum() / total), float((cover * ys).sum() / total))
    best = (-1.0, '', (0.5, 0.5))
    for shape in SHAPES:
        area, dx, dy = _unit_geometry(shape)
        radius = math.sqrt(total / resolution**2 / area)
        center = (centroid[0] - dx * radius, centroid[1] - dy * radius)
        template = _coverage_of(
            render_scene(Scene(shape, color, background, 'center', center, radius), resolution),
            PALETTE[background],
            PALETTE[color],
        )
        iou = _soft_iou(cover, template)
        if iou > best[0]:
            best = (iou, shape, center)
    iou, shape, center = best
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - center[0]) ** 2 + (POSITIONS[p][1] - center[1]) ** 2)
    return Attributes(shape, color, background, position, iou, regions)


# Chance that an image which ignores the prompt matches each attribute (the data's marginals are uniform).
CHANCE = dict(
    shape=1 / len(SHAPES), color=1 / len(COLOR_NAMES), background=1 / len(COLOR_NAMES), position=1 / len(POSITIONS)
)
