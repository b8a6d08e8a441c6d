"""Tests for training/image_sink.py: the streamed .npz and grid hold the images in seed order, as np.savez and
tile_images would, and writing them keeps memory flat in the number of images."""

import os
import tracemalloc

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
import generate_images
from training import image_sink
from training.image_grid import tile_images


def image_of(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, [8, 6, 3], dtype=np.uint8)


def test_npz_and_grid_hold_the_images_in_seed_order_whatever_the_order_they_come_in(tmp_path):
    seeds = [5, 2, 9, 7, 11]
    npz, grid = str(tmp_path / 'out' / 'a.npz'), str(tmp_path / 'g.png')
    sink = image_sink.ImageSink(seeds, grid, npz)
    for seed in [9, 5, 11, 2, 7]:
        sink.add(seed, image_of(seed))
    sink.finish()
    expected = np.stack([image_of(s) for s in seeds])
    with np.load(npz) as data:
        assert list(data.keys()) == ['arr_0'] and np.array_equal(data['arr_0'], expected)
    assert np.array_equal(np.asarray(PIL.Image.open(grid)), tile_images(expected.transpose(0, 3, 1, 2)))
    assert sorted(os.listdir(tmp_path / 'out')) == ['a.npz'], 'the rows file is removed'


def peak_bytes_writing(tmp_path, num: int) -> int:
    sink = image_sink.ImageSink(list(range(num)), None, str(tmp_path / f'{num}.npz'))
    tracemalloc.start()
    for seed in range(num):
        sink.add(seed, np.full([16, 16, 3], seed % 256, dtype=np.uint8))
    sink.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    with np.load(str(tmp_path / f'{num}.npz')) as data:
        assert data['arr_0'].shape == (num, 16, 16, 3) and data['arr_0'][num - 1, 0, 0, 0] == (num - 1) % 256
    return peak


def test_an_interrupted_run_leaves_no_rows_file(tmp_path):
    def batches():
        yield dnnlib.EasyDict(seeds=[0], images=torch.from_numpy(image_of(0)).permute(2, 0, 1)[None], captions=None)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_images._write(batches(), [0, 1], None, False, None, str(tmp_path / 'a.npz'))
    assert os.listdir(tmp_path) == []


def test_npz_memory_is_flat_in_the_number_of_images(tmp_path, monkeypatch):
    monkeypatch.setattr(image_sink, '_CHUNK_BYTES', 4 * 16 * 16 * 3)  # four images per chunk
    small, large = peak_bytes_writing(tmp_path, 32), peak_bytes_writing(tmp_path, 2048)
    assert large < small + 64 * 1024 and large < 2048 * 16 * 16 * 3 / 10  # gathering would hold 1.5 MiB
