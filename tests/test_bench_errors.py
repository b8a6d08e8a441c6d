"""The bench scripts turn a user's mistake into one `Error:` line, not a traceback."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize(
    'script, args',
    [
        ('demo_quality.py', []),
        ('solver_error.py', []),
        ('sr_quality.py', []),
        ('prompt_adherence.py', []),
        ('clip_adherence.py', ['--clip={missing}']),
    ],
)
def test_a_missing_network_is_one_error_line(tmp_path, script, args):
    missing = str(tmp_path / 'no-such-run')
    command = [
        sys.executable,
        os.path.join(ROOT, 'bench', script),
        f'--net={missing}',
        *[a.format(missing=missing) for a in args],
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith('Error: Network not found') and missing in lines[-1]


@pytest.mark.parametrize(
    'script, args, message',
    [
        ('demo_quality.py', ['--net={net}', '--grid={net}'], '--grid={net}: name a .png file'),
        ('plot_stats.py', ['{run}', '--out={run}/stats.jsonl'], '--out={run}/stats.jsonl: name a .png file'),
        ('plot_stats.py', ['{run}', '--out={file}/stats.png'], 'is a file, not a folder'),
        ('compare_backbones.py', ['--outdir={file}'], '--outdir={file} is a file, not a folder'),
        ('kill_soak.py', ['--outdir={file}'], '--outdir={file} is a file, not a folder'),
    ],
)
def test_an_output_over_an_input_or_through_a_file_is_one_error_line_and_replaces_nothing(
    tmp_path, script, args, message
):
    run, file = tmp_path / 'run', tmp_path / 'file'
    run.mkdir()
    (run / 'stats.jsonl').write_text('{"Progress/kimg": 1.0, "Loss/loss": 2.0}\n')
    (run / 'net.pkl').write_bytes(b'network')
    file.write_text('kept')
    paths = dict(run=run, file=file, net=run / 'net.pkl')
    command = [sys.executable, os.path.join(ROOT, 'bench', script), *[a.format(**paths) for a in args]]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert sum(line.startswith('Error:') for line in lines) == 1 and message.format(**paths) in lines[-1], lines
    assert (run / 'stats.jsonl').read_text().startswith('{') and (run / 'net.pkl').read_bytes() == b'network'
    assert file.read_text() == 'kept' and sorted(os.listdir(run)) == ['net.pkl', 'stats.jsonl']


@pytest.mark.parametrize(
    'script, option',
    [
        ('demo_quality.py', '--guidance=nan'),
        ('train_speed.py', '--peak-tflops=inf'),
        ('compare_backbones.py', '--lr=nan'),
    ],
)
def test_nan_and_inf_are_refused_where_a_number_is_expected(tmp_path, script, option):
    command = [sys.executable, os.path.join(ROOT, 'bench', script), option]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and 'finite number' in result.stderr and 'Traceback' not in result.stderr
