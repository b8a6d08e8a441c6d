"""The GPU suite: every test here needs CUDA and is skipped without it (so CPU CI skips the folder). Run it with
`python -m pytest -q tests/gpu` or bench/gpu_suite.sh on a GPU machine."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA device (tests/gpu); skipped without one')


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason='needs CUDA')
    for item in items:
        if 'tests/gpu/' in str(item.fspath).replace('\\', '/'):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
