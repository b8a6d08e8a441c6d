"""train_edm2.py on tar shards: the text-to-image demo with a metadata filter end to end, and a stopped run
that resumes mid-pass reaching the data position of an uninterrupted one."""

import glob
import json

import pytest
import torch
from click.testing import CliRunner

import train_edm2
from training import dataset_io
from training.dataset import ImageFolderDataset
from training.shard_writer import make_shards
from training.shards import ShardDataset

COMMON = ['--preset=demo-text', '--batch=16', '--workers=0', '--seed=2']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> tuple[str, str, str]:
    """The built-in captioned shapes at 16x16: a ZIP, tar shards of 16 of its samples, and 24 in shards of 8."""
    root = tmp_path_factory.mktemp('shapes')
    zip_path = str(root / 'shapes.zip')
    dataset_io.write_synthetic_dataset(zip_path, resolution=16, num_images=64, seed=0, progress=False)
    make_shards(zip_path, str(root / 'shards'), per_shard=16)
    make_shards(zip_path, str(root / 'small'), per_shard=8, max_images=24)
    return zip_path, str(root / 'shards'), str(root / 'small')


def _train(outdir, *args):
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={outdir}', *COMMON, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_text_demo_trains_from_shards_with_a_filter_and_reports_the_drops(tmp_path, shapes):
    zip_path, shards, _small = shapes
    run = tmp_path / 'run'
    _train(run, f'--data={shards}', '--filter=label<=2', '--duration=32', '--status=16', '--snapshot=32')
    assert glob.glob(str(run / 'network-snapshot-*.pkl')) and glob.glob(str(run / 'samples-*.png'))
    options = json.loads((run / 'training_options.json').read_text())
    assert options['dataset_kwargs']['use_captions'] and options['dataset_kwargs']['filters'] == ['label<=2']
    assert options['dataset_kwargs']['label_dim'] == 5  # Scanned once, by train_edm2.py, not again by the loop.
    stats = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines()]
    labels = ImageFolderDataset(zip_path, use_labels=True)
    failing = sum(int(labels[i][1].argmax()) > 2 for i in range(len(labels)))
    # The shuffle buffer (1000) holds the whole pass, so the first batch follows a read of all 64 samples.
    assert stats[1]['Data/read'] == 64 and stats[1]['Data/dropped/label<=2'] == failing > 0


def test_a_stopped_run_resumes_mid_pass_where_an_uninterrupted_run_would_be(tmp_path, shapes):
    *_, small = shapes
    args = [f'--data={small}', '--shuffle=8', '--checkpoint=16', '--snapshot=0', '--status=0']
    _train(tmp_path / 'whole', *args, '--duration=32')
    _train(tmp_path / 'parts', *args, '--duration=16')
    output = _train(tmp_path / 'parts', *args, '--duration=32')
    assert 'Resuming from' in output

    def position(run):  # All checkpoints of so short a run are kimg 0: the file holds the last.
        return torch.load(run / 'training-state-0000000.pt', map_location='cpu', weights_only=False)['data']

    whole, parts = position(tmp_path / 'whole'), position(tmp_path / 'parts')
    assert whole['slots'] == parts['slots'] == {0: (1, 8)}  # 32 = 24 + 8: the same place in the second pass.


def _count_constructions(monkeypatch, cls, counted: list) -> None:
    init = cls.__init__

    def counting_init(self, *args, **kwargs):
        counted.append(cls.__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(cls, '__init__', counting_init)


@pytest.mark.parametrize('kind', ['zip', 'shards'])
def test_a_fresh_start_constructs_its_dataset_once(tmp_path, shapes, monkeypatch, kind):
    # Each construction lists a folder or ZIP, or reads every shard's labels: slow on big data, so the run's
    # config, its start checks and the training loop share one.
    zip_path, shards, _small = shapes
    counted = []
    for cls in (ImageFolderDataset, ShardDataset):
        _count_constructions(monkeypatch, cls, counted)
    data = zip_path if kind == 'zip' else shards
    _train(tmp_path / 'run', f'--data={data}', '--duration=16', '--status=0', '--snapshot=0', '--checkpoint=0')
    assert counted == ['ImageFolderDataset' if kind == 'zip' else 'ShardDataset']


@pytest.mark.parametrize(
    'args, message',
    [
        (['--data={dir}/{{000007..000009}}.tar'], 'matches no file'),
        (['--data={shards}', '--filter=label=>2'], 'cannot parse filter'),
        (['--data={zip}', '--filter=label<=2'], '--filter applies to tar shards only'),
        (['--data={shards}', '--upscale', '--duration=16'], '--upscale applies with --resolution'),
        (['--data={dir}/bad.tar'], 'not a readable tar'),
    ],
)
def test_bad_shard_input_is_one_clear_line(tmp_path, shapes, args, message):
    zip_path, shards, _small = shapes
    (tmp_path / 'bad.tar').write_bytes(b'no tar here' * 100)
    args = [a.format(dir=tmp_path, shards=shards, zip=zip_path) for a in args]
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={tmp_path / "run"}', *COMMON, *args])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
