import pickle

import pytest

from training import snapshots


def test_snapshot_name_round_trips_through_parser():
    name = snapshots.snapshot_name('network-snapshot', 8388, 0.05)
    assert name == 'network-snapshot-0008388-0.050.pkl'
    assert snapshots.parse_snapshot_name('/some/dir/' + name) == ('network-snapshot', 8388, 0.05)


def test_parse_snapshot_name_rejects_other_names():
    with pytest.raises(ValueError, match='PREFIX-KIMG-STD'):
        snapshots.parse_snapshot_name('training-state-0000100.pt')


def test_save_then_load_returns_equal_dict(tmp_path):
    path = str(tmp_path / 'phema-0000010-0.100.pkl')
    snapshots.save_network_pickle({'ema': [1, 2, 3], 'encoder': None}, path)
    assert snapshots.load_network_pickle(path) == {'ema': [1, 2, 3], 'encoder': None}
    assert [p.name for p in tmp_path.iterdir()] == ['phema-0000010-0.100.pkl']


@pytest.mark.parametrize(
    'content, message',
    [
        (b'not a pickle at all', 'not a readable network pickle'),
        (pickle.dumps({'net': 1}), 'no network'),
        (pickle.dumps([1, 2]), 'no network'),
    ],
)
def test_load_rejects_non_network_files(tmp_path, content, message):
    path = tmp_path / 'x.pkl'
    path.write_bytes(content)
    with pytest.raises(snapshots.NetworkPickleError, match=message):
        snapshots.load_network_pickle(str(path))


def test_load_reports_missing_file(tmp_path):
    with pytest.raises(snapshots.NetworkPickleError, match='not found'):
        snapshots.load_network_pickle(str(tmp_path / 'missing.pkl'))
