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
from conftest import training_config

import train_edm2
from training.loss import EDM2Loss, unwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--preset=demo-tiny', '--workers=0', '--seed=3']


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
    assert grid.shape == (512, 512, 3) and grid.std() > 0  # 4x4 samples of 16 px, each pixel shown 8x8.

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


class SeededLoss(EDM2Loss):
    """EDM2Loss whose noise level and noise of each image come from a generator seeded by the image itself,
    so that they do not depend on which process or accumulation round the image lands in."""

    def __call__(self, net, images, labels=None):
        sigma, noise = [], []
        for image in images:
            gen = torch.Generator().manual_seed(int(image.double().abs().sum() * 1e4))
            sigma.append((torch.randn([], generator=gen) * self.P_std + self.P_mean).exp())
            noise.append(torch.randn(image.shape, generator=gen))
        sigma, noise = torch.stack(sigma).reshape(-1, 1, 1, 1), torch.stack(noise)
        sigma_data = unwrap(net).sigma_data
        denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        return weight / logvar.exp() * (denoised - images) ** 2 + logvar


_RUN_LOOP = """
import json, sys
import torch
from torch_utils import distributed as dist
from training.training_loop import training_loop
dist.init()
training_loop(run_dir=sys.argv[2], device=torch.device('cpu'), **json.load(open(sys.argv[1])))
dist.finish()  # as train_edm2.py: leave the group while Python still runs (gloo's exit race otherwise)
"""


def test_two_processes_take_the_same_steps_as_one_at_the_same_global_batch(tmp_path, cache_env):
    # Same global batch of 32 (one process in 2 accumulation rounds of 16, or two gloo processes of 16 each),
    # same data order, per-image noise, no dropout, plain SGD: the weights after 3 steps agree to float
    # rounding. A wrong gradient-averaging factor (e.g. 2x) scales every SGD step and breaks this by far.
    c = training_config('demo-tiny')
    c.loss_kwargs.class_name = 'test_train_edm2.SeededLoss'
    c.optimizer_kwargs = dict(class_name='torch.optim.SGD')
    c.lr_kwargs.update(ref_lr=0.001, rampup_Mimg=0)
    c.update(batch_size=32, batch_gpu=16, status_nimg=None, snapshot_nimg=None)
    assert c.network_kwargs.dropout == 0
    script = tmp_path / 'run_loop.py'
    script.write_text(_RUN_LOOP)
    env = dict(cache_env, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]))
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    nets = {}
    for name, launcher, nimg in (
        ('one', [sys.executable], 96),
        ('two', torchrun, 96),
        ('one_step', [sys.executable], 32),
    ):
        config, run_dir = tmp_path / f'{name}.json', tmp_path / name
        config.write_text(json.dumps(dict(c, total_nimg=nimg, checkpoint_nimg=nimg)))
        os.makedirs(run_dir)
        cmd = [*launcher, str(script), str(config), str(run_dir)]
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        state = _final_state(run_dir)
        assert state['cur_nimg'] == nimg
        nets[name] = state['net']
    for key, value in nets['one'].items():
        torch.testing.assert_close(nets['two'][key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = max((nets['one'][k] - nets['one_step'][k]).abs().max().item() for k in nets['one'])
    assert moved > 1e-3  # Steps 2 and 3 moved the weights far beyond the tolerance.


@pytest.mark.parametrize(
    'args, message',
    [
        (['--preset=nope'], "Unknown preset 'nope'"),
        (['--preset=edm2-img64-s'], '--data is required'),
        (['--preset=demo-tiny', '--data=/does/not/exist.zip'], '/does/not/exist.zip'),
        (['--preset=demo-tiny', '--duration=12X'], 'Invalid value for'),
        (['--preset=demo-tiny', f'--text-encoder={ROOT}'], '--text-encoder applies to text-to-image'),
        (['--preset=demo-text', '--data=/x', '--tokenizer=/no/folder'], '--tokenizer: /no/folder is not a folder'),
        (['--preset=demo-tiny', '--batch=0'], '--batch=0 leaves no image for each of 1 processes'),
        (['--preset=demo-tiny', '--batch=16', '--batch-gpu=5'], 'must split evenly over 1 processes and --batch-gpu=5'),
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
        [f'--outdir={tmp_path / "run"}', '--preset=demo-tiny', f'--data={data}', '--cond=False', '--workers=1']
        + ['--max-bad-samples=0'],
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


def signal_after_first_checkpoint(outdir: str, args: list[str], sig: int, env: dict) -> tuple[int, str, str]:
    """Run train_edm2.py in its own process group, send `sig` to the whole group (data workers too, as
    schedulers and Ctrl-C do) once the first checkpoint exists: (exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train_edm2.py'), f'--outdir={outdir}', *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not glob.glob(os.path.join(outdir, 'training-state-*.pt')) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def test_sigterm_to_the_process_group_checkpoints_and_exits_cleanly(tmp_path, cache_env):
    outdir = str(tmp_path / 'run')
    args = ['--preset=demo-tiny', '--workers=1', '--duration=1Mi', '--checkpoint=512', '--snapshot=1Mi']
    code, out, err = signal_after_first_checkpoint(outdir, args, signal.SIGTERM, cache_env)
    assert code == train_edm2.REQUEUE_EXIT_CODE, err[-2000:]
    assert 'state saved at kimg' in out
    state = _final_state(outdir)
    assert 512 < state['cur_nimg'] < 1 << 20 and state['cur_nimg'] % 16 == 0
