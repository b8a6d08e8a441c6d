"""The scenes of the built-in shapes data (training/shapes.py) and prompt sets for measuring text-to-image
adherence on it.

A *held-out* prompt is a caption that no image of the training data carries as a whole: its combination
of shape, colour, background and position never occurred, though each word did. A dataset written with
`hold_out` fragments lacks every combination whose caption contains one (`dataset_scenes`). Prompt scenes
render at the anchors of their position (no jitter) with a mid-range radius, so a prompt's scene is known.
"""

import itertools
from collections.abc import Iterator, Sequence

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


def held_out(caption: str, fragments: Sequence[str]) -> bool:
    """Whether a caption contains one of the `hold_out` fragments."""
    return any(fragment in caption for fragment in fragments)


def dataset_scenes(seed: int, num: int, hold_out: Sequence[str] = ()) -> Iterator[Scene]:
    """The scenes of a dataset's items in order: scene i of `seed`, skipping those whose caption contains a
    `hold_out` fragment (write_synthetic_dataset refuses fragments that leave nothing)."""
    index = 0
    for _ in range(num):
        scene = sample_scene(seed, index)
        while held_out(scene.caption, hold_out):
            index += 1
            scene = sample_scene(seed, index)
        index += 1
        yield scene


def scenes_containing(fragments: Sequence[str]) -> list[Scene]:
    """Every combination whose caption contains one of `fragments`: what `hold_out` removes from the data."""
    return [scene for scene in all_scenes() if held_out(scene.caption, fragments)]


def _seen(dataset_seed: int, dataset_size: int, hold_out: Sequence[str]) -> set[tuple[str, str, str, str]]:
    return {combination(scene) for scene in dataset_scenes(dataset_seed, dataset_size, hold_out)}


def held_out_scenes(
    num: int, dataset_seed: int = 0, dataset_size: int = 10000, seed: int = 0, hold_out: Sequence[str] = ()
) -> list[Scene]:
    """`num` scenes whose caption occurs nowhere in the dataset made with (dataset_seed, dataset_size,
    hold_out), drawn at random (`seed`) from all such; a ValueError if the data leaves fewer than `num`."""
    seen = _seen(dataset_seed, dataset_size, hold_out)
    unseen = [scene for scene in all_scenes() if combination(scene) not in seen]
    if len(unseen) < num:
        raise ValueError(f'only {len(unseen)} captions are absent from the {dataset_size}-image data; ask for fewer')
    order = np.random.default_rng(seed).permutation(len(unseen))[:num]
    return [unseen[i] for i in sorted(order)]


def seen_scenes(
    num: int, dataset_seed: int = 0, dataset_size: int = 10000, seed: int = 0, hold_out: Sequence[str] = ()
) -> list[Scene]:
    """`num` scenes whose caption the data does carry, for comparison with the held-out ones."""
    seen = _seen(dataset_seed, dataset_size, hold_out)
    known = [scene for scene in all_scenes() if combination(scene) in seen]
    order = np.random.default_rng(seed).permutation(len(known))[:num]
    return [known[i] for i in sorted(order)]
