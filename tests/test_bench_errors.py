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
