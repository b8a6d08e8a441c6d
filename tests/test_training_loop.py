"""Tests of training/training_loop.py: divergence, non-finite gradients, and the loss hooks it calls."""

import glob
import json
import os

import numpy as np
import pytest
import torch
from conftest import training_config

from torch_utils import training_stats
from training.loss import EDM2Loss, unwrap
from training.training_loop import TrainingError, training_loop


@pytest.fixture(autouse=True)
def private_training_stats(monkeypatch):
    """Each test's runs report into fresh accumulators, whatever other tests left in the process-wide sums."""
    monkeypatch.setattr(training_stats, '_pending', {})
    monkeypatch.setattr(training_stats, '_cumulative', {})


def _tiny_config(tmp_path, monkeypatch, loss_class: str, **kwargs):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    c = training_config('demo-tiny')
    c.loss_kwargs.class_name = loss_class
    c.update(kwargs)
    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    return c, run_dir


def _stats(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]


class NaNLoss(EDM2Loss):
    """The EDM2 loss with every value replaced by NaN, as a diverged run produces."""

    def __call__(self, net, images, labels=None):
        return super().__call__(net, images, labels) * float('nan')


def test_nan_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    c, run_dir = _tiny_config(
        tmp_path,
        monkeypatch,
        'test_training_loop.NaNLoss',
        total_nimg=64,
        status_nimg=32,
        snapshot_nimg=None,
        checkpoint_nimg=None,
    )
    with pytest.raises(TrainingError, match='diverged: the loss is nan at kimg 0.0'):
        training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    stats = _stats(run_dir)
    assert len(stats) == 2 and np.isnan(stats[1]['Loss/loss'])  # The diverged interval is logged, then the run stops.


def test_a_run_after_a_diverged_one_in_the_same_process_trains(tmp_path, monkeypatch):
    # As from a notebook or training.api: the first run's NaN loss must not stay in the process's statistics.
    settings = dict(total_nimg=64, status_nimg=32, snapshot_nimg=None, checkpoint_nimg=None)
    c, run_dir = _tiny_config(tmp_path, monkeypatch, 'test_training_loop.NaNLoss', **settings)
    with pytest.raises(TrainingError, match='diverged'):
        training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    c.loss_kwargs.class_name = 'training.loss.EDM2Loss'
    second = str(tmp_path / 'second')
    os.makedirs(second)
    training_loop(run_dir=second, device=torch.device('cpu'), **c)
    assert all(np.isfinite(s['Loss/loss']) for s in _stats(second)[1:])


class NaNGradientLoss(EDM2Loss):
    """A finite loss (zero) whose gradient is NaN in every parameter that reaches it, through the untaken
    branch of a `where`; records the parameters after each forward pass (which renormalises the weights)."""

    after_forward: list[dict] = []

    def __call__(self, net, images, labels=None):
        loss = super().__call__(net, images, labels)
        NaNGradientLoss.after_forward.append({k: v.detach().clone() for k, v in unwrap(net).state_dict().items()})
        never = torch.zeros_like(loss, dtype=torch.bool)
        return torch.where(never, (-loss.abs() - 1).sqrt(), torch.zeros_like(loss)) + 0 * loss.detach()


def test_nonfinite_gradients_are_zeroed_so_the_optimizer_step_leaves_the_weights_unchanged(tmp_path, monkeypatch):
    # Adam with an all-zero gradient moves no weight (its moments stay 0), so after the last step the weights
    # must equal those the last forward pass saw; an unzeroed NaN gradient would make them NaN.
    c, run_dir = _tiny_config(
        tmp_path,
        monkeypatch,
        'test_training_loop.NaNGradientLoss',
        total_nimg=48,
        status_nimg=48,
        snapshot_nimg=None,
        checkpoint_nimg=48,
    )
    NaNGradientLoss.after_forward.clear()
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    (path,) = glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    trained = torch.load(path, map_location='cpu', weights_only=False)['net']
    assert len(NaNGradientLoss.after_forward) == 3
    for name, value in NaNGradientLoss.after_forward[-1].items():
        assert torch.equal(trained[name], value), name
    stats = _stats(run_dir)
    assert stats[-1]['Loss/loss'] == 0
    num_params = sum(v.numel() for v in trained.values())
    assert 0 < stats[-1]['Loss/nonfinite_grads'] <= num_params  # Counted per step, then zeroed.


class HookRecordingLoss(EDM2Loss):
    """EDM2Loss that records the loop's calls of its hooks and asks for a grid of captions-free samples."""

    calls: list[tuple] = []

    def accumulate(self, net, batches, num_rounds, scale):
        HookRecordingLoss.calls.append(('accumulate', num_rounds, scale))
        super().accumulate(net, batches, num_rounds, scale)

    def report(self, net, encoder, dataset_kwargs, device):
        HookRecordingLoss.calls.append(('report',))

    def grid_conditioning(self, net, dataset, encoder, num, device):
        HookRecordingLoss.calls.append(('grid', num))
        return None  # No grid.


def test_loop_calls_the_loss_hooks_with_the_per_rank_split(tmp_path, monkeypatch):
    c, run_dir = _tiny_config(
        tmp_path,
        monkeypatch,
        'test_training_loop.HookRecordingLoss',
        batch_size=16,
        batch_gpu=4,
        total_nimg=32,
        status_nimg=16,
        snapshot_nimg=32,
        checkpoint_nimg=None,
    )
    HookRecordingLoss.calls.clear()
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    calls = HookRecordingLoss.calls
    assert calls.count(('accumulate', 4, 1 / 16)) == 2  # 16 images per step in 4 rounds of 4; mean over 16.
    assert calls.count(('report',)) == 3  # Status at kimg 0, 16 and 32 images.
    assert calls.count(('grid', 16)) == 1
    assert sorted(os.listdir(run_dir)) == [
        'network-snapshot-0000000-0.050.pkl',
        'network-snapshot-0000000-0.100.pkl',
        'stats.jsonl',
    ]  # The loss declined the grid.


def test_classic_ema_snapshots_are_written_beside_and_apart_from_the_power_function_ones(tmp_path, monkeypatch):
    from training.network_loading import resolve_network_path
    from training.phema_reconstruct import list_snapshots
    from training.snapshots import load_network_pickle

    c, run_dir = _tiny_config(tmp_path, monkeypatch, 'training.loss.EDM2Loss', total_nimg=32, snapshot_nimg=32)
    c.update(status_nimg=32, checkpoint_nimg=None)
    c.ema_kwargs.betas = [0.99]
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    classic = os.path.join(run_dir, 'network-snapshot-0000000-ema0.99.pkl')
    assert load_network_pickle(classic)['ema'].img_resolution == 16
    assert 'ema0.99' not in resolve_network_path(run_dir)
    assert sorted(map(os.path.basename, list_snapshots(run_dir))) == [
        'network-snapshot-0000000-0.050.pkl',
        'network-snapshot-0000000-0.100.pkl',
    ]


def test_intervals_that_are_not_multiples_of_the_batch_fire_at_the_first_step_past_each_multiple(tmp_path, monkeypatch):
    # Batch 16, intervals of 40 and 56 images: status due at 0, 48 (past 40), 80 and the end (96); checkpoints at 64
    # (past 56) and the end. Testing nimg % interval == 0 instead gives status at 0, 80, 96 and one checkpoint.
    c, run_dir = _tiny_config(
        tmp_path,
        monkeypatch,
        'training.loss.EDM2Loss',
        batch_size=16,
        total_nimg=96,
        status_nimg=40,
        snapshot_nimg=None,
        checkpoint_nimg=56,
        keep_checkpoints=None,
    )
    saved = []
    monkeypatch.setattr('training.checkpoint.save_training_state', lambda d, state, k: saved.append(state['cur_nimg']))
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    assert [round(s['Progress/kimg'] * 1000) for s in _stats(run_dir)] == [0, 48, 80, 96]
    assert saved == [64, 96]


def test_status_time_counts_the_time_trained_before_a_resume(tmp_path, monkeypatch, capsys):
    c, run_dir = _tiny_config(
        tmp_path,
        monkeypatch,
        'training.loss.EDM2Loss',
        total_nimg=32,
        status_nimg=32,
        snapshot_nimg=None,
        checkpoint_nimg=32,
    )
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    (path,) = glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    state = torch.load(path, map_location='cpu', weights_only=False)
    assert 0 < state['elapsed_sec'] < 600
    torch.save(dict(state, elapsed_sec=7200.0), path)  # as if the first process had trained for two hours
    capsys.readouterr()
    training_loop(run_dir=run_dir, device=torch.device('cpu'), **dict(c, total_nimg=64))
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith('kimg ')]
    assert line.split()[1] == '0.1/0.1' and line.split()[3] == '2h'
