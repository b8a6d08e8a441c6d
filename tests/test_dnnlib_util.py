"""Tests for dnnlib.util: cache paths, open_url's three routes, atomic writes, names, Logger, parsers."""

import functools
import hashlib
import http.server
import os
import pathlib
import socket
import sys
import threading

import pytest

import dnnlib
from dnnlib import util


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / 'cache'
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(root))
    # Loopback requests must never go through a proxy set in the environment.
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    return root


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a temp folder; yields (folder, base URL)."""
    folder = tmp_path / 'served'
    folder.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def _closed_port_url(name: str) -> str:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/files/{name}'


def test_easydict_attributes_mirror_keys():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2} and d.a == 1
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing


def test_make_cache_dir_path_uses_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    assert dnnlib.make_cache_dir_path('a', 'b') == os.path.join(str(tmp_path), 'a', 'b')
    monkeypatch.delenv('DNNLIB_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path('x') == os.path.join(str(tmp_path / 'home'), '.cache', 'dnnlib', 'x')


def test_open_url_local_path_and_file_url_read_the_same_bytes(tmp_path):
    path = tmp_path / 'data.bin'
    path.write_bytes(b'\x00hello\xff')
    with util.open_url(str(path)) as f:
        assert f.read() == path.read_bytes()
    with util.open_url(path.as_uri()) as f:
        assert f.read() == path.read_bytes()
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)


def test_offline_error_names_cache_path_and_hand_placed_file_is_used(cache_root):
    url = _closed_port_url('weights.pkl')
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, num_attempts=1, verbose=False)
    message = str(info.value)
    assert isinstance(info.value, OSError) and url in message and '\n' not in message
    cache_file = message.split(' at ')[-1].split(' and run again')[0]
    assert pathlib.Path(cache_file).parent == cache_root / 'downloads'
    assert cache_file.endswith('_weights.pkl')
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    pathlib.Path(cache_file).write_bytes(b'placed by hand')
    with util.open_url(url, verbose=False) as f:  # The port is closed: this must come from the cache.
        assert f.read() == b'placed by hand'


def test_download_is_cached_and_served_without_network(cache_root, http_root):
    folder, base = http_root
    payload = os.urandom(3000)
    (folder / 'net.pkl').write_bytes(payload)
    url = f'{base}/net.pkl'
    digest = hashlib.sha256(payload).hexdigest()
    with util.open_url(url, verbose=False, sha256=digest) as f:
        assert f.read() == payload
    (folder / 'net.pkl').unlink()  # A second open must not need the server.
    path = util.open_url(url, verbose=False, return_filename=True)
    assert pathlib.Path(path).read_bytes() == payload
    assert pathlib.Path(path).parent == cache_root / 'downloads'
    assert not [p for p in os.listdir(cache_root / 'downloads') if p.endswith('.tmp')]


def test_download_with_wrong_sha256_fails_and_keeps_nothing(cache_root, http_root):
    folder, base = http_root
    (folder / 'bad.pkl').write_bytes(b'not what you expected')
    with pytest.raises(util.DownloadError, match='sha256'):
        util.open_url(f'{base}/bad.pkl', verbose=False, sha256=hashlib.sha256(b'other').hexdigest())
    assert os.listdir(cache_root / 'downloads') == []


def test_download_without_cache_returns_bytes_and_writes_nothing(cache_root, http_root):
    folder, base = http_root
    (folder / 'a.bin').write_bytes(b'abc')
    with util.open_url(f'{base}/a.bin', verbose=False, cache=False) as f:
        assert f.read() == b'abc'
    assert not cache_root.exists()


def test_missing_remote_file_is_a_download_error_without_retrying(cache_root, http_root):
    _, base = http_root
    with pytest.raises(util.DownloadError, match='HTTP 404'):
        util.open_url(f'{base}/absent.pkl', verbose=False, num_attempts=5)


def test_unreachable_host_gives_up_after_two_attempts(cache_root, monkeypatch):
    with socket.socket() as s:  # A loopback port with no listener: every connection is refused.
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    sleeps = []
    monkeypatch.setattr(util.time, 'sleep', sleeps.append)
    with pytest.raises(util.DownloadError, match='place the file by hand'):
        util.open_url(f'http://127.0.0.1:{port}/net.pkl', verbose=False, num_attempts=10)
    assert len(sleeps) == 1


def test_atomic_write_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / 'state.pt'
    target.write_bytes(b'old contents')
    with pytest.raises(RuntimeError):
        with util.atomic_write(target) as f:
            f.write(b'new partial')
            raise RuntimeError('crash mid-write')
    assert target.read_bytes() == b'old contents'
    assert os.listdir(tmp_path) == ['state.pt']


def test_atomic_write_replaces_target_with_normal_permissions(tmp_path):
    target = tmp_path / 'out.json'
    target.write_text('old')
    with util.atomic_write(target, 'w') as f:
        f.write('new é')
    assert target.read_text(encoding='utf-8') == 'new é'
    assert os.listdir(tmp_path) == ['out.json']
    reference = tmp_path / 'plain'
    reference.write_text('x')
    assert os.stat(target).st_mode == os.stat(reference).st_mode


def test_objects_by_name_resolve_like_imports():
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is dnnlib.EasyDict
    assert util.get_obj_by_name('dict') is dict
    assert util.call_func_by_name('a', 'b', func_name='os.path.join') == os.path.join('a', 'b')
    d = util.construct_class_by_name(class_name='dnnlib.EasyDict', x=3)
    assert isinstance(d, dnnlib.EasyDict) and d.x == 3
    with pytest.raises(ValueError, match='no_such_module_xyz'):
        util.get_obj_by_name('no_such_module_xyz.thing')


def test_logger_tees_both_streams_and_restores_them(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    log.write_text('earlier\n')
    orig = sys.stdout, sys.stderr
    with util.Logger(str(log)):
        print('to stdout')
        print('to stderr', file=sys.stderr)
    assert (sys.stdout, sys.stderr) == orig
    print('after close')
    assert log.read_text() == 'earlier\nto stdout\nto stderr\n'
    captured = capsys.readouterr()
    assert captured.out == 'to stdout\nafter close\n' and captured.err == 'to stderr\n'


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (every write fails with ENOSPC)')
def test_logger_on_a_full_disk_warns_once_and_the_console_goes_on(capsys):
    with util.Logger('/dev/full'):
        print('first')
        print('second', file=sys.stderr)
        print('third')
    captured = capsys.readouterr()
    assert captured.out == 'first\nthird\n'
    warning = 'Warning: cannot write /dev/full: No space left on device; the console goes on without it.\n'
    assert captured.err == warning + 'second\n'


@pytest.mark.parametrize(
    'text, expected',
    [
        ('2048', 2048),
        ('8Mi', 8 * 1024**2),
        ('3K', 3000),
        ('2G', 2 * 10**9),
        ('5Ki', 5 * 1024),
        ('1Gi', 1024**3),
        ('7M', 7 * 10**6),
        ('1.5K', 1500),
        ('0.5Mi', 1024**2 // 2),
    ],
)
def test_parse_nimg_matches_suffix_arithmetic(text, expected):
    assert util.parse_nimg(text) == expected


@pytest.mark.parametrize('text', ['', 'abc', '8mi', '1.0001K', '-3', '8 Mx'])
def test_parse_nimg_rejects_non_counts(text):
    with pytest.raises(ValueError, match='image'):
        util.parse_nimg(text)


def test_parse_int_list_expands_ranges():
    text = '0-3,7,10-11'
    expected = []
    for part in text.split(','):
        lo, _, hi = part.partition('-')
        expected += list(range(int(lo), int(hi or lo) + 1))
    assert util.parse_int_list(text) == expected == [0, 1, 2, 3, 7, 10, 11]
    assert util.parse_int_list('5') == [5]


def test_parse_int_list_errors_say_what_to_write():
    with pytest.raises(ValueError, match="'5-2' is a reversed range; write it as 2-5"):
        util.parse_int_list('1,5-2')
    with pytest.raises(ValueError, match="'x'"):
        util.parse_int_list('1,x')


@pytest.mark.parametrize(
    'seconds, expected',
    [
        (42, '42s'),
        (185, '3m 05s'),
        (2 * 3600 + 3 * 60 + 5, '2h 03m 05s'),
        (86400 + 2 * 3600 + 3 * 60, '1d 02h 03m'),
    ],
)
def test_format_time_splits_units(seconds, expected):
    assert util.format_time(seconds) == expected


@pytest.mark.parametrize(
    'value, expected',
    [(45.678, '45.68'), (118.744, '118.74'), (1.5, '1.50'), (0.0191, '0.0191'), (0.000512, '0.000512'), (0, '0.00')],
)
def test_format_figure_keeps_three_significant_figures_of_small_values(value, expected):
    assert util.format_figure(value) == expected
