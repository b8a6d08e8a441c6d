"""Synthetic "coloured shapes" data: the built-in demo dataset.

Every image shows one filled shape of one palette colour on a plain background of another palette
colour, at one of nine positions. Each image is a pure function of (seed, index), so a dataset of any
size is reproducible and item i does not depend on how many items were made.

The class label is the shape index (`SHAPES.index(scene.shape)`, `len(SHAPES)` classes): a
class-conditional net must draw the right outline, while colour, background and position are left to
chance, and are named only by the caption, e.g. "a red circle on a blue background, at the top left".

Each pixel averages 8x8 point samples of the shape, which anti-aliases the edges. The
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
    'top left': (0.29, 0.29),
    'top': (0.5, 0.29),
    'top right': (0.71, 0.29),
    'left': (0.29, 0.5),
    'center': (0.5, 0.5),
    'right': (0.71, 0.5),
    'bottom left': (0.29, 0.71),
    'bottom': (0.5, 0.71),
    'bottom right': (0.71, 0.71),
}
POSITION_JITTER = 0.02  # max offset of the centre, as a fraction of the image size
RADIUS_RANGE = (0.15, 0.21)  # shape radius, as a fraction of the image size; every shape fits
# its [centre - radius, centre + radius] box, which keeps the border clear
SUPERSAMPLE = 8  # point samples per pixel along each axis (anti-aliasing)

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


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from the centre lie inside a shape of radius r."""
    if shape == 'circle':
        return dx**2 + dy**2 <= r**2
    if shape == 'square':
        h = 0.85 * r  # about the area of the circle
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == 'triangle':
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)  # apex at -r, base at 0.8r, near-equilateral
    if shape == 'diamond':
        return np.abs(dx) + np.abs(dy) <= r
    if shape == 'cross':
        w = 0.38 * r  # half-width of each arm
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f'Unknown shape {shape!r}; expected one of {", ".join(SHAPES)}')


def render_scene(scene: Scene, resolution: int) -> np.ndarray:
    """Render a scene as a uint8 image [resolution, resolution, 3] (HWC).

    Each output pixel averages SUPERSAMPLE x SUPERSAMPLE point samples at sub-pixel centres, so its
    colour mixes foreground and background in proportion to the area the shape covers.
    """
    size = resolution * SUPERSAMPLE
    coords = (np.arange(size) + 0.5) / size
    dx, dy = coords[np.newaxis, :] - scene.center[0], coords[:, np.newaxis] - scene.center[1]
    mask = _inside(scene.shape, dx, dy, scene.radius)
    cover = mask.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))[..., np.newaxis]
    fg, bg = np.array(PALETTE[scene.color], dtype=np.float64), np.array(PALETTE[scene.background], dtype=np.float64)
    return np.rint(bg + cover * (fg - bg)).astype(np.uint8)


def make_image(seed: int, index: int, resolution: int) -> tuple[np.ndarray, int, str]:
    """Image `index` of the dataset made with `seed`: (uint8 HWC image, class label, caption)."""
    scene = sample_scene(seed, index)
    return render_scene(scene, resolution), scene.label, scene.caption


def nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest palette colour (RGB distance) for each pixel [..., 3]."""
    diff = np.asarray(pixels, dtype=np.float64)[..., None, :] - _PALETTE_ARRAY
    return np.argmin((diff**2).sum(axis=-1), axis=-1)


def nearest_color(rgb: tuple[int, int, int] | np.ndarray) -> str:
    """Name of the palette colour nearest to one RGB value."""
    return COLOR_NAMES[int(nearest_colors(np.asarray(rgb)))]


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Background colour of a uint8 HWC image: the per-channel median of its border pixels."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return np.median(border.astype(np.float64), axis=0)


def dominant_foreground_color(
    image: np.ndarray, background_rgb: tuple[int, int, int] | None = None, threshold: float = 48.0
) -> str | None:
    """Palette name that best explains the foreground pixels of a uint8 HWC image.

    The background colour is `background_rgb` if given, else estimated from the border pixels.
    Foreground pixels are those farther than `threshold` (RGB distance) from it. Edge pixels mix the
    shape's colour with the background, so each foreground pixel p is matched to the palette colour c
    (other than the background's own) whose mix b + a*(c - b), a in [0, 1], comes closest to p, and
    votes for c with weight a. Returns the colour with the most votes, or None without foreground.
    """
    image = np.asarray(image)
    background = (
        np.asarray(background_rgb, dtype=np.float64) if background_rgb is not None else estimate_background(image)
    )
    pixels = image.reshape(-1, image.shape[-1])[:, :3].astype(np.float64)
    offsets = pixels - background
    offsets = offsets[np.sqrt((offsets**2).sum(axis=1)) > threshold]
    if len(offsets) == 0:
        return None
    candidates = np.array([k for k in range(len(COLOR_NAMES)) if k != nearest_colors(background)])
    directions = _PALETTE_ARRAY[candidates] - background  # [K, 3]
    alphas = np.clip(offsets @ directions.T / (directions**2).sum(axis=1), 0, 1)  # [P, K]
    residuals = ((offsets[:, None, :] - alphas[..., None] * directions) ** 2).sum(axis=-1)
    best = np.argmin(residuals, axis=1)
    votes = np.bincount(best, weights=alphas[np.arange(len(best)), best], minlength=len(candidates))
    return COLOR_NAMES[int(candidates[np.argmax(votes)])]
