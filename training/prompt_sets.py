"""Prompt sets for measuring text-to-image adherence on the built-in shapes data (training/shapes.py).

A *held-out* prompt is a caption that no image of the training data carries as a whole: its combination
of shape, colour, background and position never occurred, though each word did. Scenes render at the
anchors of their position (no jitter) with a mid-range radius, so a prompt's scene is fully known.
"""

import itertools

import numpy as np

from training.shapes import COLOR_NAMES, POSITIONS, RADIUS_RANGE, SHAPES, Scene, sample_scene

ATTRIBUTES = ('shape', 'color', 'background', 'position')


def all_scenes() -> list[Scene]:
    """Every (shape, colour, background, position) the data can show, in a fixed order."""
    radius = sum(RADIUS_RANGE) / 2
    return [
        Scene(shape, color, background, position, POSITIONS[position], radius)
        for shape, color, background, position in itertools.product(SHAPES, COLOR_NAMES, COLOR_NAMES, POSITIONS)
        if background != color
    ]


def combination(scene: Scene) -> tuple[str, str, str, str]:
    return tuple(getattr(scene, name) for name in ATTRIBUTES)


def held_out_scenes(num: int, dataset_seed: int = 0, dataset_size: int = 10000, seed: int = 0) -> list[Scene]:
    """`num` scenes whose caption occurs nowhere in the dataset made with (dataset_seed, dataset_size), drawn
    at random (`seed`) from all such; a ValueError if the data leaves fewer than `num` unseen."""
    seen = {combination(sample_scene(dataset_seed, i)) for i in range(dataset_size)}
    unseen = [scene for scene in all_scenes() if combination(scene) not in seen]
    if len(unseen) < num:
        raise ValueError(f'only {len(unseen)} captions are absent from the {dataset_size}-image data; ask for fewer')
    order = np.random.default_rng(seed).permutation(len(unseen))[:num]
    return [unseen[i] for i in sorted(order)]


def seen_scenes(num: int, dataset_seed: int = 0, dataset_size: int = 10000, seed: int = 0) -> list[Scene]:
    """`num` scenes whose caption the data does carry, for comparison with the held-out ones."""
    seen = {combination(sample_scene(dataset_seed, i)) for i in range(dataset_size)}
    known = [scene for scene in all_scenes() if combination(scene) in seen]
    order = np.random.default_rng(seed).permutation(len(known))[:num]
    return [known[i] for i in sorted(order)]
