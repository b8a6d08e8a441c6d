import itertools
import re

import numpy as np
import pytest

from training import shapes


def coverage(image: np.ndarray, scene: shapes.Scene) -> np.ndarray:
    """Fraction of each pixel covered by the shape, read back from the colour mix bg + a*(fg - bg)."""
    fg = np.array(shapes.PALETTE[scene.color], dtype=np.float64)
    bg = np.array(shapes.PALETTE[scene.background], dtype=np.float64)
    return (image.astype(np.float64) - bg) @ (fg - bg) / ((fg - bg) ** 2).sum()


def shape_area(shape: str, r: float) -> float:
    """Closed-form area of each outline drawn with radius r."""
    w = 0.38 * r
    return {
        'circle': np.pi * r**2,
        'square': (1.7 * r) ** 2,
        'triangle': 0.5 * 2 * r * 1.8 * r,
        'diamond': 2 * r**2,
        'cross': 2 * (2 * r) * (2 * w) - (2 * w) ** 2,
    }[shape]


def scenes_with_shape(shape: str, count: int = 3) -> list[shapes.Scene]:
    found = (s for s in (shapes.sample_scene(7, i) for i in itertools.count()) if s.shape == shape)
    return list(itertools.islice(found, count))


def test_palette_colours_are_well_separated_and_their_own_nearest():
    for a, b in itertools.combinations(shapes.COLOR_NAMES, 2):
        assert np.linalg.norm(np.subtract(shapes.PALETTE[a], shapes.PALETTE[b])) >= 95
    for name, rgb in shapes.PALETTE.items():
        assert shapes.nearest_color(rgb) == name


def test_images_are_pure_functions_of_seed_and_index():
    a, la, ca = shapes.make_image(3, 5, 16)
    b, lb, cb = shapes.make_image(3, 5, 16)
    assert a.dtype == np.uint8 and a.shape == (16, 16, 3)
    assert np.array_equal(a, b) and la == lb and ca == cb
    others = [shapes.make_image(seed, 5, 16)[0] for seed in range(4, 8)]
    assert not all(np.array_equal(a, o) for o in others)


def test_caption_and_label_describe_the_scene():
    for i in range(50):
        scene = shapes.sample_scene(0, i)
        match = re.fullmatch(r'an? (\w+) (\w+) on a (\w+) background, at the ([a-z ]+)', scene.caption)
        assert match is not None, scene.caption
        assert match.groups() == (scene.color, scene.shape, scene.background, scene.position)
        assert scene.color != scene.background
        assert shapes.SHAPES[scene.label] == scene.shape


def test_border_is_background_and_centre_is_foreground():
    for i in range(100):
        scene = shapes.sample_scene(1, i)
        image = shapes.render_scene(scene, 32)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == shapes.PALETTE[scene.background]).all()
        cx, cy = int(scene.center[0] * 32), int(scene.center[1] * 32)
        assert tuple(image[cy, cx]) == shapes.PALETTE[scene.color]


@pytest.mark.parametrize('shape', shapes.SHAPES)
def test_antialiased_coverage_matches_closed_form_area(shape):
    for scene in scenes_with_shape(shape):
        image = shapes.render_scene(scene, 32)
        expected = shape_area(shape, scene.radius * 32)
        assert coverage(image, scene).sum() == pytest.approx(expected, rel=0.015)


@pytest.mark.parametrize('resolution', [8, 16, 32])
def test_dominant_foreground_color_recovers_drawn_colour(resolution):
    scenes = [shapes.sample_scene(2, i) for i in range(150)]
    for scene in scenes:
        image = shapes.render_scene(scene, resolution)
        assert shapes.dominant_foreground_color(image) == scene.color
        assert shapes.dominant_foreground_color(image, shapes.PALETTE[scene.background]) == scene.color


def test_dominant_foreground_color_tolerates_noise_and_reports_no_foreground():
    rng = np.random.default_rng(0)
    for i in range(30):
        scene = shapes.sample_scene(4, i)
        image = shapes.render_scene(scene, 32).astype(np.float64) + rng.normal(0, 12, size=(32, 32, 3))
        assert shapes.dominant_foreground_color(np.clip(image, 0, 255).astype(np.uint8)) == scene.color
    plain = np.full([16, 16, 3], shapes.PALETTE['green'], dtype=np.uint8)
    assert shapes.dominant_foreground_color(plain) is None
