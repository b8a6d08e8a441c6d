"""Tests for training/prompt_sets.py: held-out captions really are absent from the built-in data."""

import subprocess
import sys

from conftest import ROOT

from training.dataset import ImageFolderDataset
from training.dataset_io import write_synthetic_dataset
from training.prompt_sets import all_scenes, held_out_scenes, scenes_containing, seen_scenes
from training.shapes import COLOR_NAMES, POSITIONS, SHAPES


def test_all_scenes_are_every_combination_once():
    scenes = all_scenes()
    assert len(scenes) == len(SHAPES) * len(COLOR_NAMES) * (len(COLOR_NAMES) - 1) * len(POSITIONS)
    assert len({s.caption for s in scenes}) == len(scenes)


def test_held_out_captions_are_absent_from_the_written_dataset_and_seen_ones_present(tmp_path):
    write_synthetic_dataset(str(tmp_path / 'data'), resolution=8, num_images=300, seed=0)
    dataset = ImageFolderDataset(str(tmp_path / 'data'), use_captions=True)
    captions = {dataset[i][1] for i in range(len(dataset))}
    held_out = held_out_scenes(40, dataset_size=300)
    assert len(held_out) == 40 and not captions & {s.caption for s in held_out}
    assert {s.caption for s in seen_scenes(40, dataset_size=300)} <= captions


def test_scenes_containing_are_exactly_what_a_hold_out_dataset_lacks(tmp_path):
    held = ['green cross', 'on a white background, at the left']
    write_synthetic_dataset(str(tmp_path / 'data'), resolution=8, num_images=400, seed=0, hold_out=held)
    dataset = ImageFolderDataset(str(tmp_path / 'data'), use_captions=True)
    captions = {dataset[i][1] for i in range(len(dataset))}
    removed = {s.caption for s in scenes_containing(held)}
    assert removed and not captions & removed
    assert (
        len(removed) == 7 * 9 + 5 * 7 * 1 - 1
    )  # green cross: 7 backgrounds x 9 positions; white-left: 5 x 7, less the overlap
    assert not {s.caption for s in held_out_scenes(10, dataset_size=400, hold_out=held)} & captions


def test_prompt_adherence_asking_for_more_held_out_prompts_than_exist_is_one_clear_line():
    args = [sys.executable, 'bench/prompt_adherence.py', '--net=no-such-run', '--num=100000']
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'captions are absent from the 10000-image data; ask for fewer' in result.stderr
