"""dataset_tool.py shards and encode from shards: the same samples as the source, labels, captions and
original sizes carried over, latent shards equal to the VAE on the pixels, resumable and split by rank."""

import collections
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from conftest import assert_one_line_error

import dataset_tool
from training import dataset_io, encoders
from training.dataset import ImageFolderDataset
from training.shard_files import read_shard
from training.shard_writer import encode_shards
from training.shards import ShardDataset


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('shapes') / 'shapes.zip')
    dataset_tool.write_synthetic_dataset(path, resolution=8, num_images=10, seed=0, progress=False)
    return path


def _shards(source: str, dest, per_shard: int = 4):
    result = CliRunner().invoke(
        dataset_tool.cli, ['shards', f'--source={source}', f'--dest={dest}', f'--per-shard={per_shard}']
    )
    assert result.exit_code == 0, result.output
    return dest


def test_shards_hold_the_source_images_labels_captions_and_original_sizes(tmp_path, shapes_zip):
    dest = _shards(shapes_zip, tmp_path / 'shards')
    assert sorted(os.listdir(dest)) == ['000000.tar', '000001.tar', '000002.tar']
    source = ImageFolderDataset(shapes_zip, use_labels=True)
    want = collections.Counter(
        (source[i][0].tobytes(), int(source[i][1].argmax()), source.get_caption(i)) for i in range(len(source))
    )
    labelled = ShardDataset(str(dest), use_labels=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    captioned = ShardDataset(str(dest), use_captions=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    got = collections.Counter(
        (image.tobytes(), int(label.argmax()), caption)
        for (image, label, _), (_, caption, _) in zip(labelled, captioned)
    )
    assert got == want
    meta = json.loads(next(read_shard(str(dest / '000000.tar')))['json'])
    assert meta['original_width'] == meta['original_height'] == 8 and 'label' in meta


def test_resharding_shards_keeps_every_sample(tmp_path, shapes_zip):
    first = _shards(shapes_zip, tmp_path / 'a', per_shard=4)
    second = _shards(str(first), tmp_path / 'b', per_shard=3)
    assert len(os.listdir(second)) == 4
    keys = lambda d: sorted(s['__key__'] for f in sorted(os.listdir(d)) for s in read_shard(str(d / f)))  # noqa: E731
    assert keys(first) == keys(second)


def test_shards_into_a_non_empty_folder_is_one_clear_line(tmp_path, shapes_zip):
    (tmp_path / 'x').mkdir()
    (tmp_path / 'x' / 'keep.txt').write_text('mine')
    result = CliRunner().invoke(dataset_tool.cli, ['shards', f'--source={shapes_zip}', f'--dest={tmp_path / "x"}'])
    assert_one_line_error(result, 'not an empty folder')
    assert (tmp_path / 'x' / 'keep.txt').read_text() == 'mine'


def test_a_malformed_json_member_is_one_line_naming_the_sample_and_leaves_no_partial_output(tmp_path, shapes_zip):
    source = _shards(shapes_zip, tmp_path / 'source', per_shard=4)
    with wds.TarWriter(str(source / '000003.tar')) as writer:  # After the 10 good samples of 000000..000002.tar
        writer.write({'__key__': 'odd', 'png': dataset_io.encode_png(np.zeros([8, 8, 3], np.uint8)), 'json': b'{x'})
    args = ['shards', f'--source={source}', f'--dest={tmp_path / "out"}', '--per-shard=2']
    result = CliRunner().invoke(dataset_tool.cli, args)
    assert_one_line_error(result, f'{source / "000003.tar"}:odd.json: malformed')
    assert sorted(os.listdir(tmp_path)) == ['source']  # Neither out nor a temporary folder beside it.
    os.remove(source / '000003.tar')
    assert len(os.listdir(_shards(str(source), tmp_path / 'out', per_shard=2))) == 5  # The same --dest works.


def test_encode_of_mixed_size_shards_names_a_way_that_exists_to_one_size(tmp_path):
    os.mkdir(tmp_path / 'mixed')
    with wds.TarWriter(str(tmp_path / 'mixed' / '000000.tar')) as writer:
        for key, size in (('a', 8), ('b', 16)):
            writer.write({'__key__': key, 'png': dataset_io.encode_png(np.zeros([size, size, 3], np.uint8))})
    with pytest.raises(dataset_io.DatasetFileError, match=r'000000\.tar:b: .*convert --resolution, then shards'):
        encode_shards(str(tmp_path / 'mixed'), str(tmp_path / 'out'), lambda pixels: pixels, batch=4)
    assert 'resolution' in [param.name for param in dataset_tool.convert.params]


def test_encode_from_shards_matches_the_vae_and_resumes_per_shard(tmp_path, vae_dir, shapes_zip):
    pixels = _shards(shapes_zip, tmp_path / 'pixels')
    dest = tmp_path / 'latents'
    args = ['encode', f'--model-url={vae_dir}', f'--source={pixels}', f'--dest={dest}', '--batch=3', '--device=cpu']
    result = CliRunner().invoke(dataset_tool.cli, args)
    assert result.exit_code == 0, result.output
    latents = ShardDataset(str(dest), use_captions=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    source = ShardDataset(str(pixels), use_captions=True, shuffle=0, loop=False, rank=0, num_replicas=1)
    stored = {caption + str(i): image for i, (image, caption, _) in enumerate(latents)}
    vae = encoders.StabilityVAEEncoder(vae_name=vae_dir)
    for i, (image, caption, _) in enumerate(source):  # Same shard order: the same (seed, pass) permutation.
        expected = vae.encode_pixels(torch.from_numpy(image[None])).numpy()[0]
        np.testing.assert_allclose(stored[caption + str(i)], expected, rtol=1e-5, atol=1e-5)

    kept = dest / '000000.tar'
    before = kept.stat().st_mtime_ns
    os.remove(dest / '000001.tar')
    result = CliRunner().invoke(dataset_tool.cli, args)
    assert result.exit_code == 0 and '1 latent shards written' in result.output
    assert kept.stat().st_mtime_ns == before and (dest / '000001.tar').is_file()
    os.remove(dest / '000001.tar')
    result = CliRunner().invoke(dataset_tool.cli, [*args, '--batch=2'])  # the VAE rounds by batch: refused
    assert result.exit_code == 1 and 'was started with batch 3, not 2' in result.output
    assert not (dest / '000001.tar').exists()


def test_encode_shards_splits_the_shards_over_ranks(tmp_path, shapes_zip):
    pixels = _shards(shapes_zip, tmp_path / 'pixels', per_shard=2)

    def encode(batch: np.ndarray) -> np.ndarray:
        return batch[:, :1].astype(np.float32)

    parts = [encode_shards(str(pixels), str(tmp_path / 'out'), encode, 2, rank=r, world=2) for r in range(2)]
    names = [os.path.basename(p) for part in parts for p in part]
    assert sorted(names) == sorted(os.listdir(pixels)) and not set(parts[0]) & set(parts[1])
