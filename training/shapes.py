"""Synthetic "coloured shapes" data: the built-in demo dataset.

Every image shows one filled shape of one palette colour on a plain background of another palette
colour, at one of nine positions. Each image is a pure function of (seed, index), so a dataset of any
size is reproducible and item i does not depend on how many items were made.

The class label is the shape index (`SHAPES.index(scene.shape)`, `len(SHAPES)` classes): a
class-conditional net must draw the right outline, while colour, background and position are left to
chance, and are named only by the caption, e.g. "a red circle on a blue background, at the top left".

Shapes are drawn at 4x the output resolution and box-downsampled, which anti-aliases the edges. The
palette is exact and public so that a prompt-adherence check can measure the dominant foreground
colour of a generated image (`dominant_foreground_color`).

Example:
    >>> scene = sample_scene(seed=0, index=3)
    >>> image = render_scene(scene, resolution=32)   # uint8 [32, 32, 3]
    >>> dominant_foreground_color(image) == scene.color
    True
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Well-separated colours (pairwise RGB distance >= 95); foregrounds and backgrounds both use them.
PALETTE: dict[str, tuple[int, int, int]] = {
    'red': (230, 25, 25),
    'green': (30, 180, 40),
    'blue': (30, 60, 230),
    'yellow': (245, 220, 30),
    'purple': (140, 40, 180),
    'orange': (245, 120, 15),
    'white': (245, 245, 245),
    'black': (20, 20, 20),
}
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle', 'diamond', 'cross')

# Position word -> centre of the shape as a fraction of the image width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    'top left': (0.29, 0.29), 'top': (0.5, 0.29), 'top right': (0.71, 0.29),
    'left': (0.29, 0.5), 'center': (0.5, 0.5), 'right': (0.71, 0.5),
    'bottom left': (0.29, 0.71), 'bottom': (0.5, 0.71), 'bottom right': (0.71, 0.71),
}
POSITION_JITTER = 0.02          # max offset of the centre, as a fraction of the image size
RADIUS_RANGE = (0.15, 0.21)     # shape radius, as a fraction of the image size; every shape fits
                                # its [centre - radius, centre + radius] box, which keeps the border clear
SUPERSAMPLE = 4                 # render at this multiple of the resolution, then box-downsample

_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float64)


@dataclass(frozen=True)
class Scene:
    """What one image shows; geometry in fractions of the image size, so it renders at any size."""
    shape: str
    color: str
    background: str
    position: str
    center: tuple[float, float]
    radius: float

    @property
    def label(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def caption(self) -> str:
        article = 'an' if self.color[0] in 'aeiou' else 'a'
        return f'{article} {self.color} {self.shape} on a {self.background} background, at the {self.position}'


def sample_scene(seed: int, index: int) -> Scene:
    """Draw the scene of image `index` of the dataset made with `seed`."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    others = [name for name in COLOR_NAMES if name != color]
    background = others[rng.integers(len(others))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    center = (POSITIONS[position][0] + float(jitter[0]), POSITIONS[position][1] + float(jitter[1]))
    radius = float(rng.uniform(*RADIUS_RANGE))
    return Scene(shape=shape, color=color, background=background, position=position, center=center, radius=radius)


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (cx, cy) with radius r (pixels)."""
    if shape == 'square':
        h = 0.85 * r  # about the area of the circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == 'triangle':
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]  # near-equilateral, pointing up
    if shape == 'diamond':
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == 'cross':
        w = 0.38 * r  # half-width of each arm
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f'Unknown shape {shape!r}; expected one of {", ".join(SHAPES)}')


def render_scene(scene: Scene, resolution: int) -> np.ndarray:
    """Render a scene as a uint8 image [resolution, resolution, 3] (HWC)."""
    size = resolution * SUPERSAMPLE
    canvas = Image.new('RGB', (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = scene.center[0] * size, scene.center[1] * size, scene.radius * size
    if scene.shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PALETTE[scene.color])
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r), fill=PALETTE[scene.color])
    hi = np.asarray(canvas, dtype=np.float64)
    lo = hi.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.rint(lo).astype(np.uint8)


def make_image(seed: int, index: int, resolution: int) -> tuple[np.ndarray, int, str]:
    """Image `index` of the dataset made with `seed`: (uint8 HWC image, class label, caption)."""
    scene = sample_scene(seed, index)
    return render_scene(scene, resolution), scene.label, scene.caption


def nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest palette colour (RGB distance) for each pixel [..., 3]."""
    diff = np.asarray(pixels, dtype=np.float64)[..., None, :] - _PALETTE_ARRAY
    return np.argmin((diff ** 2).sum(axis=-1), axis=-1)


def nearest_color(rgb: tuple[int, int, int] | np.ndarray) -> str:
    """Name of the palette colour nearest to one RGB value."""
    return COLOR_NAMES[int(nearest_colors(np.asarray(rgb)))]


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Background colour of a uint8 HWC image: the per-channel median of its border pixels."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border.astype(np.float64), axis=0)


def dominant_foreground_color(image: np.ndarray, background_rgb: tuple[int, int, int] | None = None,
                              threshold: float = 48.0) -> str | None:
    """Palette name that best explains the foreground pixels of a uint8 HWC image.

    The background colour is `background_rgb` if given, else estimated from the border pixels.
    Foreground pixels are those farther than `threshold` (RGB distance) from it. Edge pixels mix the
    shape's colour with the background, so each foreground pixel p is matched to the palette colour c
    (other than the background's own) whose mix b + a*(c - b), a in [0, 1], comes closest to p, and
    votes for c with weight a. Returns the colour with the most votes, or None without foreground.
    """
    image = np.asarray(image)
    background = np.asarray(background_rgb, dtype=np.float64) if background_rgb is not None else estimate_background(image)
    pixels = image.reshape(-1, image.shape[-1])[:, :3].astype(np.float64)
    offsets = pixels - background
    offsets = offsets[np.sqrt((offsets ** 2).sum(axis=1)) > threshold]
    if len(offsets) == 0:
        return None
    candidates = np.array([k for k in range(len(COLOR_NAMES)) if k != nearest_colors(background)])
    directions = _PALETTE_ARRAY[candidates] - background                              # [K, 3]
    alphas = np.clip(offsets @ directions.T / (directions ** 2).sum(axis=1), 0, 1)    # [P, K]
    residuals = ((offsets[:, None, :] - alphas[..., None] * directions) ** 2).sum(axis=-1)
    best = np.argmin(residuals, axis=1)
    votes = np.bincount(best, weights=alphas[np.arange(len(best)), best], minlength=len(candidates))
    return COLOR_NAMES[int(candidates[np.argmax(votes)])]
