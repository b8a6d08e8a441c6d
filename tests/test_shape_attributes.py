"""Tests for training/shape_attributes.py: every attribute read back from the dataset's own images (whose
scenes are known), under blur and noise, and the images that are not one clean shape."""

import numpy as np
import pytest
import scipy.ndimage

from training import shapes
from training.shape_attributes import CHANCE, classify

ATTRIBUTES = ('shape', 'color', 'background', 'position')


@pytest.mark.parametrize('resolution', [16, 32])
def test_every_attribute_of_dataset_images_is_read_back(resolution):
    scenes = [shapes.sample_scene(seed=3, index=i) for i in range(300)]
    found = [classify(shapes.render_scene(scene, resolution)) for scene in scenes]
    for name in ATTRIBUTES:
        rate = np.mean([getattr(f, name) == getattr(s, name) for f, s in zip(found, scenes)])
        assert rate >= 0.99, (name, rate)
    assert all(f.clean for f in found)


def test_attributes_survive_the_blur_and_noise_of_generated_images():
    rng = np.random.default_rng(0)
    scenes = [shapes.sample_scene(seed=4, index=i) for i in range(200)]
    right = 0
    for scene in scenes:
        image = scipy.ndimage.gaussian_filter(shapes.render_scene(scene, 32).astype(float), (0.5, 0.5, 0))
        image = np.clip(np.rint(image + rng.normal(0, 8, image.shape)), 0, 255).astype(np.uint8)
        found = classify(image)
        right += found.clean and all(getattr(found, n) == getattr(scene, n) for n in ATTRIBUTES)
    assert right / len(scenes) >= 0.99


def scene_image(shape: str, position: str, radius: float = 0.17, resolution: int = 32) -> np.ndarray:
    return shapes.render_scene(
        shapes.Scene(shape, 'red', 'blue', position, shapes.POSITIONS[position], radius), resolution
    )


def test_two_shapes_a_fragment_a_blob_and_an_empty_tile_are_not_one_clean_shape():
    left, right = scene_image('circle', 'left'), scene_image('square', 'right')
    two = np.where((right != shapes.PALETTE['blue']).any(axis=2, keepdims=True), right, left)
    fragment = scene_image('square', 'center', radius=0.2)
    fragment[:, 16:] = shapes.PALETTE['blue']
    blob = np.empty_like(left)
    blob[:] = shapes.PALETTE['blue']
    noise = scipy.ndimage.gaussian_filter(np.random.default_rng(0).random((32, 32)), 2)
    blob[noise > np.percentile(noise, 85)] = shapes.PALETTE['red']
    empty = np.empty_like(left)
    empty[:] = shapes.PALETTE['blue']
    for name, image in dict(two=two, fragment=fragment, blob=blob, empty=empty).items():
        assert not classify(image).clean, name
    assert classify(two).regions == 2 and classify(empty).shape is None
    assert classify(left).clean and classify(left).shape == 'circle'  # the parts on their own are clean


def test_chance_levels_are_the_data_marginals():
    scenes = [shapes.sample_scene(seed=5, index=i) for i in range(4000)]
    for name in ATTRIBUTES:
        counts = np.unique([getattr(s, name) for s in scenes], return_counts=True)[1]
        assert len(counts) == round(1 / CHANCE[name])
        assert counts.max() / len(scenes) < 1.5 * CHANCE[name]
