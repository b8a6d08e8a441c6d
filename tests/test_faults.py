"""What clusters do to long runs: a rank SIGKILLed under torchrun, a torn newest checkpoint, a full disk at each
kind of output, SIGUSR1 before the time limit, bad images among the data. Tiny runs of train_edm2.py."""

import errno
import glob
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error
from test_train_edm2 import ROOT, TINY, _final_state, signal_after_first_checkpoint

import train_edm2
from training import checkpoint as ckpt
from training import faults
from training.bad_samples import SkipBadSamples
from training.dataset import ImageFolderDataset

SMALL = [*TINY, '--batch=4', '--status=16', '--checkpoint=16', '--snapshot=16']


def _cli(outdir, *args):
    return CliRunner().invoke(train_edm2.main, [f'--outdir={outdir}', *SMALL, *args])


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a['cur_nimg'] == b['cur_nimg']
    for key in a['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key


def _no_temp_files(run_dir) -> bool:
    return not [name for name in os.listdir(run_dir) if name.startswith('.')]


# ----------------------------------------------------------------------------
# Elastic restarts and preemption.


def test_rank_sigkilled_under_torchrun_restarts_to_the_same_final_weights(tmp_path, cache_env):
    args = [*SMALL, '--duration=192', '--snapshot=192']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    run = [*torchrun, os.path.join(ROOT, 'train_edm2.py'), f'--outdir={straight}', *args]
    result = subprocess.run(run, env=cache_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    cmd = [*torchrun, '--max-restarts=1', os.path.join(ROOT, 'train_edm2.py'), f'--outdir={killed}', *args]
    proc = subprocess.Popen(cmd, env=cache_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not glob.glob(os.path.join(killed, 'training-state-*.pt')) and time.time() < deadline:
        time.sleep(0.02)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if 'train_edm2.py' in ' '.join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[-1].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert _final_state(killed)['cur_nimg'] == 192
    log = open(os.path.join(killed, 'log.txt')).read()
    assert 'Resuming from' in log, 'the run ended before the kill: it was not restarted'
    _assert_same_weights(_final_state(straight), _final_state(killed))


def test_sigusr1_checkpoints_at_the_next_step_and_exits_with_the_requeue_code(tmp_path, cache_env):
    # SLURM's --signal reaches every process of the step; the data worker must outlive it.
    outdir = str(tmp_path / 'run')
    args = [*SMALL, '--workers=1', '--duration=1Mi', '--snapshot=1Mi', '--requeue-exit-code=42']
    code, out, err = signal_after_first_checkpoint(outdir, args, signal.SIGUSR1, cache_env)
    assert code == 42, err[-2000:]
    assert 'Stop requested (SIGUSR1): state saved at kimg' in out
    state = _final_state(outdir)
    assert 16 < state['cur_nimg'] < 1 << 20 and state['cur_nimg'] % 4 == 0


_HOLD_LOCK = """
import fcntl, sys
f = open(sys.argv[1], 'a')
fcntl.lockf(f, fcntl.LOCK_EX)
print('locked', flush=True)
sys.stdin.read()
"""


def test_a_second_run_on_a_folder_in_use_stops_with_one_line_and_touches_nothing(tmp_path, cache_env, one_thread):
    # Another process training in tmp_path holds its lock (a POSIX lock is per process: not this test's).
    assert _cli(tmp_path, '--duration=16').exit_code == 0
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    holder = subprocess.Popen(
        [sys.executable, '-c', _HOLD_LOCK, str(tmp_path / 'log.txt')], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b'locked\n'
        result = _cli(tmp_path, '--duration=32')
    finally:
        holder.communicate(b'')
    assert_one_line_error(result, f'{tmp_path} is in use', 'another --outdir')
    assert {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)} == before
    result = _cli(tmp_path, '--duration=32')  # The holder has exited: its lock went with it.
    assert result.exit_code == 0, result.output
    assert _final_state(tmp_path)['cur_nimg'] == 32


# ----------------------------------------------------------------------------
# Torn checkpoints.


def _fake_state(cur_nimg: int) -> dict:
    return dict(net={'w': torch.full([3], float(cur_nimg))}, optimizer={}, ema={}, cur_nimg=cur_nimg, rng=[{}])


@pytest.mark.parametrize('damage', ['truncated', 'empty', 'not_a_state'])
def test_damaged_newest_checkpoint_is_reported_kept_and_the_one_before_used(tmp_path, capsys, damage):
    run_dir = str(tmp_path)
    for kimg in (1, 2, 3):
        ckpt.save_checkpoint(os.path.join(run_dir, ckpt.checkpoint_name(kimg)), _fake_state(kimg * 1000))
    newest = os.path.join(run_dir, ckpt.checkpoint_name(3))
    data = open(newest, 'rb').read()
    if damage == 'not_a_state':
        torch.save([1, 2, 3], newest)
    else:
        open(newest, 'wb').write(data[: len(data) // 2] if damage == 'truncated' else b'')
    path, state = ckpt.load_newest_valid(run_dir)
    assert path == os.path.join(run_dir, ckpt.checkpoint_name(2)) and state['cur_nimg'] == 2000
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and newest in lines[0], lines
    assert os.path.isfile(newest)


def test_no_readable_checkpoint_is_one_error_and_an_empty_folder_starts_afresh(tmp_path):
    assert ckpt.load_newest_valid(str(tmp_path)) is None
    (tmp_path / ckpt.checkpoint_name(1)).write_bytes(b'PK\x03\x04 torn')
    with pytest.raises(ckpt.CheckpointError, match='No training-state file'):
        ckpt.load_newest_valid(str(tmp_path))


def test_run_resumes_past_a_torn_newest_checkpoint_to_the_same_weights(tmp_path, cache_env, one_thread):
    straight, torn = tmp_path / 'straight', tmp_path / 'torn'
    assert _cli(straight, '--duration=48').exit_code == 0
    assert _cli(torn, '--duration=32').exit_code == 0
    good = open(torn / ckpt.checkpoint_name(0), 'rb').read()
    (torn / ckpt.checkpoint_name(1)).write_bytes(good[: len(good) // 3])  # A newer name, torn.
    result = _cli(torn, '--duration=48')
    assert result.exit_code == 0, result.output
    assert f'{torn / ckpt.checkpoint_name(1)} is unreadable' in result.output
    final = torch.load(torn / ckpt.checkpoint_name(0), weights_only=False)
    _assert_same_weights(torch.load(straight / ckpt.checkpoint_name(0), weights_only=False), final)


# ----------------------------------------------------------------------------
# Write errors and retention.


@pytest.fixture
def disk_full_at(monkeypatch):
    """`fail(prefix, nth)`: the nth atomic write of a file named prefix* fails with ENOSPC at fsync, after its
    bytes went to the temporary file (Linux: the file's name comes from /proc/self/fd)."""
    if not os.path.isdir('/proc/self/fd'):
        pytest.skip('needs /proc/self/fd')
    real_fsync = os.fsync

    def fail(prefix: str, nth: int) -> None:
        seen = [0]

        def fsync(fd):
            if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith(f'.{prefix}'):
                seen[0] += 1
                if seen[0] == nth:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(os, 'fsync', fsync)

    return fail


@pytest.mark.parametrize(
    'prefix, nth, file, saved_nimg',
    [
        ('network-snapshot', 3, 'network-snapshot-0000000-0.050.pkl', 32),  # 2 pickles per snapshot
        ('samples', 2, 'samples-0000000.png', 32),
        ('training-state', 2, 'training-state-0000000.pt', 16),
    ],
)
def test_write_error_keeps_earlier_files_and_stops_with_one_line(
    tmp_path, cache_env, one_thread, disk_full_at, prefix, nth, file, saved_nimg
):
    disk_full_at(prefix, nth)
    result = _cli(tmp_path, '--duration=64')
    assert_one_line_error(result, str(tmp_path / file), 'No space left on device', 're-run to resume')
    assert _no_temp_files(tmp_path)
    assert torch.load(tmp_path / ckpt.checkpoint_name(0), weights_only=False)['cur_nimg'] == saved_nimg
    with open(tmp_path / 'network-snapshot-0000000-0.050.pkl', 'rb') as f:
        assert pickle.load(f)['ema'] is not None  # The first snapshot's file, intact.
    PIL.Image.open(tmp_path / 'samples-0000000.png').load()
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert round(stats[-1]['Progress/kimg'] * 1000) == 32  # Stopped there; did not train on to 64.


def test_write_error_of_a_safetensors_snapshot_names_that_file(tmp_path, cache_env, one_thread, disk_full_at):
    disk_full_at('network-snapshot', 1)
    result = _cli(tmp_path, '--duration=64', '--snapshot-format=safetensors')
    assert_one_line_error(result, str(tmp_path / 'network-snapshot-0000000-0.050.safetensors'), 'No space left')
    assert _no_temp_files(tmp_path)


@pytest.mark.skipif(not os.path.exists('/dev/full'), reason='needs /dev/full (every write fails with ENOSPC)')
def test_a_full_disk_at_stats_jsonl_saves_the_state_and_stops_naming_it(tmp_path, cache_env, one_thread):
    assert _cli(tmp_path, '--duration=16').exit_code == 0
    os.replace(tmp_path / 'stats.jsonl', tmp_path / 'stats-before.jsonl')
    os.symlink('/dev/full', tmp_path / 'stats.jsonl')
    result = _cli(tmp_path, '--duration=64')  # Its first status line is due at 32 images.
    assert_one_line_error(result, f'Cannot write {tmp_path / "stats.jsonl"}: No space left', 're-run to resume')
    assert torch.load(tmp_path / ckpt.checkpoint_name(0), weights_only=False)['cur_nimg'] == 32


_FULL_DISK_RUN = """
import errno, os
real_fsync = os.fsync
def fsync(fd):
    if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.training-state'):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)
os.fsync = fsync
import train_edm2
train_edm2.main()
"""


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc/self/fd')
def test_write_error_on_rank_0_stops_both_ranks_with_the_same_line(tmp_path, cache_env):
    # Rank 0 writes alone; the others must learn of its failure instead of waiting for it forever.
    script = tmp_path / 'full_disk.py'
    script.write_text(_FULL_DISK_RUN)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    cmd = [*torchrun, str(script), f'--outdir={tmp_path / "run"}', *SMALL, '--duration=64']
    result = subprocess.run(cmd, env=cache_env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
    path = tmp_path / 'run' / ckpt.checkpoint_name(0)
    assert len(errors) == 2 and all(f'Cannot write {path}: No space left on device' in e for e in errors), errors
    assert _no_temp_files(tmp_path / 'run') and not path.exists()


def test_continue_on_snapshot_error_trains_on(tmp_path, cache_env, one_thread, disk_full_at):
    disk_full_at('samples', 1)
    result = _cli(tmp_path, '--duration=32', '--continue-on-snapshot-error')
    assert result.exit_code == 0, result.output
    assert 'samples-0000000.png: No space left on device; training goes on' in result.output
    assert _no_temp_files(tmp_path)
    assert torch.load(tmp_path / ckpt.checkpoint_name(0), weights_only=False)['cur_nimg'] == 32


def test_keep_checkpoints_deletes_all_but_the_newest(tmp_path):
    for kimg in (1, 2, 10, 3):
        (tmp_path / ckpt.checkpoint_name(kimg)).write_bytes(b'')
    (tmp_path / 'training-state-notes.pt').write_bytes(b'')
    assert ckpt.prune_checkpoints(str(tmp_path), None) == []
    ckpt.prune_checkpoints(str(tmp_path), 2)
    kept = sorted(os.listdir(tmp_path))
    assert kept == [ckpt.checkpoint_name(3), ckpt.checkpoint_name(10), 'training-state-notes.pt']


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc/self/fd')
def test_the_new_checkpoint_name_is_synced_before_older_checkpoints_are_deleted(tmp_path, monkeypatch):
    (tmp_path / ckpt.checkpoint_name(1)).write_bytes(b'')
    events, real_remove = [], os.remove
    monkeypatch.setattr(os, 'fsync', lambda fd: events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}'))))
    monkeypatch.setattr(os, 'remove', lambda path: (events.append(('remove', str(path))), real_remove(path)))
    ckpt.save_training_state(str(tmp_path), dict(cur_nimg=2000), keep=1)
    assert os.listdir(tmp_path) == [ckpt.checkpoint_name(2)]
    folder_synced = events.index(('fsync', str(tmp_path)))
    assert folder_synced < events.index(('remove', str(tmp_path / ckpt.checkpoint_name(1))))


class _TwoEMAs:
    def __init__(self, net):
        self.net = net

    def get(self):
        return [(self.net, 0.05), (self.net, 0.1)]

    def classic(self):
        return []

    def state_dict(self):
        return dict(emas=[self.net.state_dict()] * 2)


class _TwoEMAsAndAClassicOne(_TwoEMAs):
    def classic(self):
        return [(self.net, 0.9999)]


def _files_written(start: int, end: int, interval: int) -> int:
    """Brute force: the distinct kimg names of the writes at every multiple of interval in (start, end], and at end."""
    return len({n // 1000 for n in range(start + 1, end + 1) if n % interval == 0} | {end // 1000})


def test_disk_plan_counts_files_and_warns_when_space_is_short(tmp_path, monkeypatch):
    net = torch.nn.Linear(100, 10)  # 1010 floats: 2020 bytes in float16, 4040 in float32.
    plan = dict(cur_nimg=1000, end_nimg=11500, snapshot_nimg=2000, checkpoint_nimg=5000, keep_checkpoints=None)
    assert (_files_written(1000, 11500, 2000), _files_written(1000, 11500, 5000)) == (6, 3)
    lines = faults.disk_plan(str(tmp_path), net, _TwoEMAs(net), snapshot_fp32=False, **plan)
    assert len(lines) == 1 and 'snapshots 6 x 4.04 kB, checkpoints 3 x 20.2 kB' in lines[0]
    monkeypatch.setattr(faults.shutil, 'disk_usage', lambda path: types.SimpleNamespace(free=10_000))
    lines = faults.disk_plan(str(tmp_path), net, _TwoEMAs(net), snapshot_fp32=True, **dict(plan, keep_checkpoints=1))
    assert 'snapshots 6 x 8.08 kB, checkpoints 1 x 20.2 kB: 68.7 kB to come' in lines[0]
    assert lines[1].startswith(f'Warning: {tmp_path} has 10 kB free')
    lines = faults.disk_plan(str(tmp_path), net, _TwoEMAsAndAClassicOne(net), snapshot_fp32=False, **plan)
    assert 'snapshots 6 x 6.06 kB' in lines[0]  # DiT's classic EMA is a third snapshot per write


@pytest.mark.parametrize('start, end, interval', [(0, 4096, 16), (1000, 10500, 2000), (0, 999, 512), (5, 7, 3000)])
def test_disk_plan_counts_writes_that_share_a_kimg_name_once(start, end, interval):
    assert faults._count(start, end, interval) == _files_written(start, end, interval)


# ----------------------------------------------------------------------------
# Bad samples.


def _folder_with_bad_images(root) -> list[str]:
    root.mkdir()
    for i in range(16):
        PIL.Image.fromarray(np.full([16, 16, 3], 15 * i, dtype=np.uint8)).save(root / f'img{i:02d}.png')
    buf = io.BytesIO()
    PIL.Image.fromarray(np.zeros([16, 16, 3], dtype=np.uint8)).save(buf, format='PNG')
    (root / 'img05.png').write_bytes(buf.getvalue()[:50])  # Truncated inside the pixels: its header still reads.
    PIL.Image.fromarray(np.zeros([12, 12, 3], dtype=np.uint8)).save(root / 'img11.png')  # Wrong size.
    return [str(root / 'img05.png'), str(root / 'img11.png')]


def test_bad_item_is_replaced_by_the_next_readable_one(tmp_path):
    bad = _folder_with_bad_images(tmp_path / 'data')
    dataset = ImageFolderDataset(str(tmp_path / 'data'))
    image, _label, errors = SkipBadSamples(dataset, max_bad=2)[5]
    assert np.array_equal(image, dataset[6][0]) and errors.startswith(f'{bad[0]}: unreadable image')
    assert SkipBadSamples(dataset, max_bad=2)[4][2] == ''


def test_bad_samples_met_in_training_are_skipped_counted_and_limited(tmp_path, cache_env, one_thread):
    bad = _folder_with_bad_images(tmp_path / 'data')
    data = [f'--data={tmp_path / "data"}', '--cond=False']
    # 32 images are 2 epochs of the 16 files: each bad one is met twice.
    result = _cli(tmp_path / 'run', *data, '--duration=32')
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if 'Skipped a bad sample' in line]
    assert len(skipped) == 2 and all(sum(name in line for line in skipped) == 1 for name in bad)  # Each once.
    stats = [json.loads(line) for line in open(tmp_path / 'run' / 'stats.jsonl')]
    assert stats[-1]['Data/skipped'] == 4

    # The start names the wrong-sized file (its header shows it) and goes on; the truncated one is met in training.
    result = _cli(tmp_path / 'limited', *data, '--duration=32', '--max-bad-samples=1')
    assert_one_line_error(result, *bad, '--max-bad-samples=1')
    assert 'Warning: ' + bad[1] in result.output and (tmp_path / 'limited' / 'stats.jsonl').is_file()
    stopped_at = _final_state(tmp_path / 'limited')['cur_nimg']
    assert 0 < stopped_at < 32
    # As the message says: a higher limit resumes the run from the state saved at the stop.
    result = _cli(tmp_path / 'limited', *data, '--duration=32', '--max-bad-samples=5')
    assert result.exit_code == 0, result.output
    assert 'Resuming from ' + str(tmp_path / 'limited') in result.output
    assert _final_state(tmp_path / 'limited')['cur_nimg'] == 32


def test_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    names = [
        '.training-state-0000001.pt.k2j.tmp',
        '.samples-0000001.png.x9.tmp',
        '.network-snapshot-0000001-0.050.pkl.a.tmp',
    ]
    keep = ['.notes.tmp', 'training-state-0000001.pt', 'samples-0000001.png']
    for name in names + keep:
        (tmp_path / name).write_bytes(b'x')
    assert sorted(faults.remove_stale_temp_files(str(tmp_path))) == sorted(str(tmp_path / n) for n in names)
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


class _FullDisk(io.RawIOBase):
    """A file that takes 100 bytes, then fails as a full disk does."""

    def __init__(self):
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        self.size += len(data)
        if self.size > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)


def test_a_full_disk_inside_torch_save_becomes_one_line_naming_the_file():
    with pytest.raises(faults.WriteError, match=r'^Cannot write out/x\.pt: No space left on device$'):
        with faults.writing('out/x.pt'):
            torch.save({'w': torch.zeros(1000)}, _FullDisk())
    with pytest.raises(RuntimeError, match='not a write error'):
        with faults.writing('out/x.pt'):
            raise RuntimeError('not a write error')
