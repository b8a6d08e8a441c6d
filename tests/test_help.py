"""Every option of every command-line script (bench/ too) explains itself in --help."""

import os
import subprocess
import sys

from conftest import ROOT

# Run apart: some bench scripts tune the process (threads, malloc) when imported.
_LIST_BARE_OPTIONS = r"""
import glob, importlib.util, os, sys
import click

def commands(command, name):
    yield name, command
    for sub_name, sub in getattr(command, 'commands', {}).items():
        yield from commands(sub, f'{name} {sub_name}')

for path in sorted(glob.glob('*.py') + glob.glob('bench/*.py')):
    spec = importlib.util.spec_from_file_location('script_' + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = [value for value in vars(module).values() if isinstance(value, click.Command)]
    if not found:
        print(f'{path}: no click command')
    for name, command in (pair for main in found for pair in commands(main, f'{path} {main.name}')):
        for param in command.params:
            text = (param.help or '') if isinstance(param, click.Option) else 'argument'
            if not text.split('[')[0].strip():
                print(f'{name} {"/".join(param.opts)}: {text!r}')
"""


def test_every_option_of_every_script_has_help_text():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-c', _LIST_BARE_OPTIONS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == '', 'options without help:\n' + result.stdout
