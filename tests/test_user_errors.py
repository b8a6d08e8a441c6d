"""The one-line sentence scripts print for user errors (training.user_errors.one_line)."""

import importlib
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT

from training.dataset import DatasetError
from training.generation import GenerationError
from training.networks_edm2 import Precond
from training.sampler_options import SAMPLER_OPTIONS, sweep_settings
from training.snapshots import PickleWarning, save_network_pickle
from training.user_errors import one_line, plain_warnings


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, idx):
        raise DatasetError('Image 7 of data.zip is corrupt: truncated file.')


def test_an_error_raised_in_a_dataloader_worker_is_its_own_sentence():
    loader = torch.utils.data.DataLoader(_Broken(), num_workers=1)
    try:
        next(iter(loader))
    except DatasetError as e:
        assert 'Original Traceback' in str(e)  # the worker folded its traceback into the message
        assert one_line(e) == 'Image 7 of data.zip is corrupt: truncated file.'
    else:
        raise AssertionError('the worker raised nothing')


def test_a_message_over_several_lines_is_joined_onto_one():
    assert one_line(OSError('No space left\n  on device: runs/x')) == 'No space left on device: runs/x'
    assert one_line(ValueError('')) == 'ValueError'


def test_plain_warnings_shows_edm2x_warnings_as_one_line_and_leaves_others_alone(monkeypatch):
    monkeypatch.setattr(warnings, 'formatwarning', warnings.formatwarning)  # Restored after the test.
    plain_warnings()
    assert warnings.formatwarning(PickleWarning('Loading a pickle runs code.'), PickleWarning, 'x.py', 7) == (
        'Warning: Loading a pickle runs code.\n'
    )
    other = warnings.formatwarning('deprecated', DeprecationWarning, 'x.py', 7, line='old()')
    assert other == 'x.py:7: DeprecationWarning: deprecated\n  old()\n'


def test_a_script_prints_the_pickle_notice_as_one_warning_line(tmp_path):
    net = Precond(8, 3, 0, use_fp16=False, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = str(tmp_path / 'net.pkl')
    save_network_pickle({'ema': net.eval()}, path)
    env = {k: v for k, v in os.environ.items() if k != 'EDM2X_TRUST_PICKLES'}
    result = subprocess.run(
        [sys.executable, 'count_flops.py', path], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    notice = [line for line in result.stderr.splitlines() if 'Loading a pickle runs the code' in line]
    assert len(notice) == 1 and notice[0].startswith('Warning: ') and 'warnings.warn' not in result.stderr


@pytest.mark.parametrize(
    'script, args',
    [
        ('train_edm2', ['--preset=demo-tiny', '--dry-run', '--lr=nan']),
        ('train_edm2', ['--preset=demo-tiny', '--dry-run', '--dropout=nan']),
        ('train_edm2', ['--preset=demo-tiny', '--dry-run', '--P_mean=inf']),
        ('reconstruct_phema', ['--indir=x', '--outdir=y', '--outstd=0.1', '--max-error=nan']),
        ('generate_images', ['--net=x.pkl', '--grid=g.png', '--sigma_max=inf']),
        ('generate_images', ['--net=x.pkl', '--grid=g.png', '--S_max=nan']),
        ('generate_images', ['--net=x.pkl', '--grid=g.png', '--clip-scale=nan']),
        ('calculate_metrics', ['gen', '--net=x.pkl', '--ref=r.pkl', '--rho=nan']),
    ],
)
def test_nan_and_inf_are_refused_where_a_number_is_expected(script, args):
    command = importlib.import_module(script)
    command = getattr(command, 'cli', None) or command.main
    result = CliRunner().invoke(command, args)
    flag = args[-1].split('=')[0]
    assert result.exit_code == 2 and 'Traceback' not in result.output, result.output
    assert f"Invalid value for '{flag}'" in result.output and 'number' in result.output


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(guidance='1.5,nan'), '--guidance=1.5,nan: every value must be a finite number'),
        (dict(sigma_max=float('inf')), '--sigma_max=inf: give a finite number'),
        (dict(S_max=float('nan')), '--S_max=nan: give a number'),
        (dict(sigma_min=5.0, sigma_max=1.0), '--sigma_min=5.0 must be below --sigma_max=1.0'),
    ],
)
def test_generation_settings_that_make_nan_images_are_refused(settings, message):
    options = {o.name: o.default for o in SAMPLER_OPTIONS} | dict(net='x.pkl') | settings
    with pytest.raises(GenerationError, match=re.escape(message)):
        sweep_settings(options)
