"""Experiment tracking (training/tracking.py): TensorBoard events and W&B offline runs read back, resumed runs
on one step axis, the loggers of train_edm2.py, reconstruct_phema.py and calculate_metrics.py, and
bench/plot_stats.py."""

import glob
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error

import calculate_metrics
import reconstruct_phema
import train_edm2
from training import metrics_io, tracking
from training.snapshots import save_network_pickle, snapshot_name
from training.tracking import Tracker, TrackingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--preset=demo-tiny', '--workers=0', '--seed=1', '--status=32', '--snapshot=64', '--checkpoint=32']

needs_tensorboard = pytest.mark.skipif(
    tracking.importlib.util.find_spec('tensorboard') is None,
    reason="tensorboard is not installed (pip install -e '.[tracking]')",
)
needs_wandb = pytest.mark.skipif(
    tracking.importlib.util.find_spec('wandb') is None, reason="wandb is not installed (pip install -e '.[tracking]')"
)


def read_events(run_dir: str):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(run_dir, size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def scalar_steps(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@needs_tensorboard
def test_tensorboard_events_hold_the_scalars_grid_and_options(tmp_path):
    grid = np.random.default_rng(0).integers(0, 256, [12, 20, 3], dtype=np.uint8)
    with Tracker(str(tmp_path), ['tensorboard'], config=dict(batch_size=16)) as tracker:
        tracker.begin(0)
        tracker.scalars({'Loss/loss': 0.5, 'Progress/lr': 0.01}, 0)
        tracker.scalars({'Loss/loss': 0.25, 'Progress/lr': 0.02}, 32)
        tracker.image('samples', grid, 32)
    acc = read_events(str(tmp_path))
    assert scalar_steps(acc, 'Loss/loss') == {0: 0.5, 32: 0.25}
    assert scalar_steps(acc, 'Progress/lr') == pytest.approx({0: 0.01, 32: 0.02})
    [image] = acc.Images('samples')
    assert image.step == 32
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(io.BytesIO(image.encoded_image_string))), grid)
    assert 'options/text_summary' in acc.Tags()['tensors']


@needs_tensorboard
def test_resumed_tensorboard_run_replaces_what_followed_its_checkpoint(tmp_path):
    with Tracker(str(tmp_path), ['tensorboard']) as first:
        first.begin(0)
        for nimg in (0, 16, 32, 48):  # crashed after 48, its last checkpoint at 32
            first.scalars({'Loss/loss': nimg}, nimg)
    with Tracker(str(tmp_path), ['tensorboard']) as resumed:
        resumed.begin(32)
        for nimg in (48, 64):
            resumed.scalars({'Loss/loss': -nimg}, nimg)
    assert scalar_steps(read_events(str(tmp_path)), 'Loss/loss') == {0: 0, 16: 16, 32: 32, 48: -48, 64: -64}


@needs_wandb
def test_wandb_offline_run_folder_holds_the_scalars_and_a_resume_keeps_the_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv('WANDB_MODE', 'offline')
    run_dir = str(tmp_path)
    for resume_nimg in (0, 32):
        time.sleep(1 - time.time() % 1)  # W&B names run folders by the second; two in one second clash.
        with Tracker(run_dir, ['wandb'], config=dict(seed=resume_nimg)) as tracker:
            tracker.begin(resume_nimg)
            tracker.scalars({'Loss/custom_scalar': 0.5}, resume_nimg + 16)
            tracker.image('samples', np.zeros([8, 8, 1], dtype=np.uint8), resume_nimg + 16)
    run_id = open(os.path.join(run_dir, tracking.WANDB_ID_FILE)).read().strip()
    folders = sorted(glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*')))
    assert len(folders) == 2 and all(f.endswith(f'-{run_id}') for f in folders)
    for folder in folders:
        path, deadline = os.path.join(folder, f'run-{run_id}.wandb'), time.time() + 30
        while b'Loss/custom_scalar' not in open(path, 'rb').read() and time.time() < deadline:
            time.sleep(0.1)  # W&B's service process writes the records a moment after finish() returns.
        records = open(path, 'rb').read()
        assert b'Loss/custom_scalar' in records and tracking.STEP_KEY.encode() in records
        assert glob.glob(os.path.join(folder, 'files', 'media', 'images', 'samples_*.png'))


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, module_cache_env):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, 'find_spec', lambda name: None if name == 'wandb' else real(name))
    with pytest.raises(TrackingError, match=r"pip install -e '\.\[tracking\]'"):
        Tracker(str(tmp_path), ['wandb'])
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={tmp_path / "run"}', '--logger=wandb', *FAST])
    assert_one_line_error(result, '--logger=wandb needs the wandb package')
    assert not os.path.exists(tmp_path / 'run')
    assert Tracker(str(tmp_path), ['none', 'none']).names == []


@needs_wandb
def test_online_wandb_without_an_api_key_stops_before_the_run_folder_is_touched(
    tmp_path, monkeypatch, module_cache_env
):
    import wandb

    for name in ('WANDB_MODE', 'WANDB_API_KEY', 'NETRC'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # No ~/.netrc: no key anywhere.
    monkeypatch.setattr(tracking.sys, 'stdin', io.StringIO())  # Not a terminal, as under a batch scheduler.
    wandb.teardown()  # A fresh process's W&B: forget the settings of the offline runs of earlier tests.
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={tmp_path / "run"}', '--logger=wandb', *FAST])
    assert_one_line_error(result, '--logger=wandb', 'wandb login', 'WANDB_MODE=offline')
    assert not os.path.exists(tmp_path / 'run')
    monkeypatch.setenv('WANDB_API_KEY', 'k' * 40)  # A key (not checked with the server here) passes.
    tracking.check_wandb_credentials()


@needs_tensorboard
def test_training_logs_every_status_scalar_and_grid_and_a_resume_continues_the_axis(tmp_path, module_cache_env):
    run = str(tmp_path / 'run')
    for duration in (64, 96):
        args = [f'--outdir={run}', f'--duration={duration}', '--logger=tensorboard', *FAST]
        result = CliRunner().invoke(train_edm2.main, args)
        assert result.exit_code == 0, result.output
    stats = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
    acc = read_events(run)
    steps = [round(s['Progress/kimg'] * 1000) for s in stats]
    assert steps == [0, 32, 64, 96]  # the resumed run started at its checkpoint at 64
    for key in ('Loss/loss', 'Progress/lr', 'Timing/img_per_sec', 'Resources/cpu_mem_gb'):
        expected = {n: s[key] for n, s in zip(steps, stats) if key in s}
        assert expected and scalar_steps(acc, key) == pytest.approx(expected, rel=1e-6), key
    assert [e.step for e in acc.Images('samples')] == [64, 96]
    assert 'samples-0000000.png' in os.listdir(run)


def _toy_snapshots(run_dir, kimgs):
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(0)
    for kimg in kimgs:
        for std in (0.050, 0.100):
            net = torch.nn.Linear(2, 2)
            save_network_pickle(dict(ema=net), os.path.join(run_dir, snapshot_name('network-snapshot', kimg, std)))


@needs_tensorboard
def test_phema_logs_its_stds_and_fit_errors_to_the_run(tmp_path):
    run = str(tmp_path / 'run')
    _toy_snapshots(run, range(1, 9))
    args = [f'--indir={run}', f'--outdir={tmp_path / "out"}', '--outstd=0.050,0.080', '--logger=tensorboard']
    result = CliRunner().invoke(reconstruct_phema.main, args)
    assert result.exit_code == 0, result.output
    [event] = read_events(run).Tensors('phema/text_summary')
    assert event.step == 8000
    header, _rule, *rows = event.tensor_proto.string_val[0].decode().splitlines()
    assert header == '| std | profile_error | file |'
    cells = {float(r.split('|')[1]): (float(r.split('|')[2]), r.split('|')[3].strip()) for r in rows}
    # 0.050 is tracked, so its final snapshot reproduces it exactly; 0.080 is fitted from the others.
    assert cells[0.05][0] < 1e-6 and 1e-6 < cells[0.08][0] < 0.1
    assert all(os.path.isfile(path) for _err, path in cells.values())


@needs_tensorboard
def test_metrics_results_of_a_snapshot_land_at_its_training_time(tmp_path):
    net = tmp_path / snapshot_name('network-snapshot', 5, 0.1)
    net.write_bytes(b'')
    tracker = metrics_io.results_tracker(str(net), None, ('tensorboard',))
    metrics_io.log_results(tracker, str(net), [dict(setting='', guidance=1.0, fid=12.5)])
    acc = read_events(str(tmp_path))
    assert scalar_steps(acc, 'Metrics/fid') == {5000: 12.5}
    assert 'Metrics/guidance' not in acc.Tags()['scalars']


def test_metrics_logger_without_a_run_folder_is_one_line(tmp_path):
    with pytest.raises(calculate_metrics.MetricsError, match='--logger needs --run-dir'):
        metrics_io.results_tracker('https://example.com/net.pkl', None, ('none',))


@pytest.mark.skipif(tracking.importlib.util.find_spec('matplotlib') is None, reason='matplotlib is not installed')
def test_plot_stats_draws_each_scalar_once_per_kimg_with_the_resumed_values(tmp_path):
    rows = [
        {'Progress/kimg': 0.0, 'Resources/cpu_mem_gb': 1.0, 'timestamp': 1},
        {'Progress/kimg': 1.0, 'Loss/loss': 3.0, 'timestamp': 2},
        {'Progress/kimg': 2.0, 'Loss/loss': 9.0, 'timestamp': 3},  # written after the checkpoint at 1
        {'Progress/kimg': 2.0, 'Loss/loss': 2.0, 'timestamp': 4},  # the resumed run's line
        {'Progress/kimg': 3.0, 'Loss/loss': 1.0, 'timestamp': 5},
    ]
    lines = [json.dumps(r) + '\n' for r in rows]
    # A status write cut short by a full disk, with the next status line appended to it.
    lines.insert(4, '{"Progress/kimg": 2.5, "Loss/lo' + json.dumps({'Progress/kimg': 2.5, 'Loss/loss': 5.0}) + '\n')
    (tmp_path / 'stats.jsonl').write_text(''.join(lines))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'bench', 'plot_stats.py'), str(tmp_path), '--keys=Loss'],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert 'Loss/loss: 3 points' in result.stdout and 'cpu_mem' not in result.stdout
    assert 'skipped 1 unreadable line(s), first line 5' in result.stdout
    assert PIL.Image.open(tmp_path / 'stats.png').size[0] > 100
