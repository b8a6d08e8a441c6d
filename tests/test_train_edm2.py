"""End-to-end checks of train_edm2.py on the built-in data: outputs, resume after SIGKILL, two processes, bad input."""

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train_edm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--preset=demo-tiny', '--workers=0', '--seed=3']


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """A private download/dataset cache, shared by in-process and subprocess runs of one test."""
    cache = str(tmp_path / 'cache')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', cache)
    return dict(os.environ, DNNLIB_CACHE_DIR=cache, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


def _train(args, env, **kwargs):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train_edm2.py'), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        **kwargs,
    )


def _final_state(run_dir):
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    return torch.load(states[-1], map_location='cpu', weights_only=False)


def test_demo_run_writes_snapshots_grids_checkpoints_and_stats(tmp_path, cache_env):
    outdir = str(tmp_path / 'run')
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={outdir}', *TINY])
    assert result.exit_code == 0, result.output
    names = sorted(os.listdir(outdir))
    for kimg in (1, 2):
        assert f'network-snapshot-{kimg:07d}-0.050.pkl' in names
        assert f'network-snapshot-{kimg:07d}-0.100.pkl' in names
        assert f'samples-{kimg:07d}.png' in names
        assert f'training-state-{kimg:07d}.pt' in names
    assert not [n for n in names if n.startswith('.')], 'temporary files left behind'
    assert json.load(open(os.path.join(outdir, 'training_options.json')))['batch_size'] == 16

    stats = [json.loads(line) for line in open(os.path.join(outdir, 'stats.jsonl'))]
    assert [round(s['Progress/kimg'], 3) for s in stats] == [0, 1.024, 2.048]
    assert all(np.isfinite(s['Loss/loss']) for s in stats[1:])

    grid = np.asarray(PIL.Image.open(os.path.join(outdir, 'samples-0000002.png')))
    assert grid.shape == (64, 64, 3) and grid.std() > 0

    with open(os.path.join(outdir, 'network-snapshot-0000002-0.050.pkl'), 'rb') as f:
        data = pickle.load(f)
    net = data['ema']
    assert not net.training and all(p.dtype == torch.float16 for p in net.parameters())
    x = torch.randn([2, 3, 16, 16])
    labels = torch.eye(net.label_dim)[[0, 1]]
    assert torch.isfinite(net(x, torch.tensor([1.0, 2.0]), labels)).all()
    assert data['encoder'].decode(x).dtype == torch.uint8


def test_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, cache_env):
    common = [*TINY, '--duration=3Ki', '--checkpoint=512', '--snapshot=3Ki', '--status=512']
    straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
    assert _train([f'--outdir={straight}', *common], cache_env, timeout=600).returncode == 0

    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train_edm2.py'), f'--outdir={killed}', *common],
        env=cache_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not glob.glob(os.path.join(killed, 'training-state-0000002.pt')) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(glob.glob(os.path.join(killed, 'training-state-*.pt'))) < 6, 'the run finished before it was killed'

    resumed = _train([f'--outdir={killed}', *common], cache_env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert 'Resuming from' in resumed.stdout
    a, b = _final_state(straight), _final_state(killed)
    assert a['cur_nimg'] == b['cur_nimg'] == 3 << 10
    for key in a['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key
    for key, value in a['ema'].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b['ema'][key]), key


def test_two_processes_train_with_the_same_loss_level_as_one(tmp_path, cache_env):
    common = [*TINY, '--duration=4Ki', '--batch=32', '--status=512', '--snapshot=4Ki', '--checkpoint=4Ki']
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    assert _train([f'--outdir={one}', *common], cache_env, timeout=600).returncode == 0
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        os.path.join(ROOT, 'train_edm2.py'),
        f'--outdir={two}',
        *common,
    ]
    result = subprocess.run(cmd, env=cache_env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(run_dir):
        stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
        assert 'Loss/loss' not in stats[0]  # The kimg-0 line comes before any step.
        return np.array([s['Loss/loss'] for s in stats[1:]])

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 8
    # Same global batch, different random draws: the curves agree to within the noise of a 32-image batch.
    assert np.abs(l1 / l2 - 1).mean() < 0.15
    assert abs(l1[-4:].mean() / l2[-4:].mean() - 1) < 0.15
    assert l2[-1] < l2[0]
    assert os.path.isfile(os.path.join(two, 'network-snapshot-0000004-0.100.pkl'))


@pytest.mark.parametrize(
    'args, message',
    [
        (['--preset=nope'], "Unknown preset 'nope'"),
        (['--preset=edm2-img64-s'], '--data is required'),
        (['--preset=demo-tiny', '--data=/does/not/exist.zip'], '/does/not/exist.zip'),
        (['--preset=demo-tiny', '--duration=12X'], 'Invalid value for'),
        (['--preset=demo-tiny', f'--text-encoder={ROOT}'], '--text-encoder applies to text-to-image'),
        (['--preset=demo-text', '--data=/x', '--tokenizer=/no/folder'], '--tokenizer: /no/folder is not a folder'),
    ],
)
def test_bad_input_ends_with_one_clear_line(tmp_path, cache_env, args, message):
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={tmp_path / "run"}', *args])
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.exception
    assert message in result.output
    assert not os.path.exists(tmp_path / 'run' / 'training_options.json')


def test_corrupt_dataset_zip_is_one_clear_error(tmp_path, cache_env):
    bad = tmp_path / 'bad.zip'
    bad.write_bytes(b'PK\x03\x04 this is not really a zip file')
    result = CliRunner().invoke(
        train_edm2.main, [f'--outdir={tmp_path / "run"}', '--preset=demo-tiny', f'--data={bad}']
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert str(bad) in result.output
    assert result.output.count('\n') == 1


def test_images_of_mixed_sizes_fail_in_a_data_worker_with_one_clear_line(tmp_path, cache_env):
    data = tmp_path / 'mixed'
    data.mkdir()
    for i in range(8):
        size = 16 if i != 5 else 12
        PIL.Image.fromarray(np.full([size, size, 3], 30 * i, dtype=np.uint8)).save(data / f'img{i}.png')
    result = CliRunner().invoke(
        train_edm2.main,
        [f'--outdir={tmp_path / "run"}', '--preset=demo-tiny', f'--data={data}', '--cond=False', '--workers=1'],
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    error = result.output.strip().splitlines()[-1]
    assert error.startswith('Error: ') and 'img5.png' in error and 'Traceback' not in error
    assert not glob.glob(str(tmp_path / 'run' / '*.pkl')) and not glob.glob(str(tmp_path / 'run' / '*.pt'))


def test_label_missing_from_dataset_json_is_one_clear_error(tmp_path, cache_env):
    data = tmp_path / 'labelled'
    data.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full([16, 16, 3], 50 * i, dtype=np.uint8)).save(data / f'img{i}.png')
    (data / 'dataset.json').write_text(json.dumps({'labels': [['img0.png', 0], ['img2.png', 1]]}))
    result = CliRunner().invoke(
        train_edm2.main, [f'--outdir={tmp_path / "run"}', '--preset=demo-tiny', f'--data={data}']
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    error = result.output.strip().splitlines()[-1]
    assert error.startswith('Error: ') and 'img1.png' in error


def test_sigterm_to_the_process_group_checkpoints_and_exits_cleanly(tmp_path, cache_env):
    # Schedulers and Ctrl-C signal every process of the job, data workers included.
    outdir = str(tmp_path / 'run')
    args = ['--preset=demo-tiny', '--workers=1', '--duration=1Mi', '--checkpoint=512', '--snapshot=1Mi']
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train_edm2.py'), f'--outdir={outdir}', *args],
        env=cache_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not glob.glob(os.path.join(outdir, 'training-state-*.pt')) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert 'Stop requested: state saved at kimg' in out
    state = _final_state(outdir)
    assert 512 < state['cur_nimg'] < 1 << 20 and state['cur_nimg'] % 16 == 0
