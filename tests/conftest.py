"""Fixtures and checks shared by several test files."""

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> dict:
    """A private download/dataset cache, shared by in-process and subprocess runs of one test; the environment
    for subprocesses (one OpenMP thread, this tree first on the path)."""
    cache = str(tmp_path / 'cache')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', cache)
    return dict(os.environ, DNNLIB_CACHE_DIR=cache, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


@pytest.fixture(scope='module')
def module_cache(tmp_path_factory) -> str:
    """A dataset/download cache shared by the tests of one module: the demo's shapes data is made once."""
    return str(tmp_path_factory.mktemp('cache'))


@pytest.fixture
def module_cache_env(module_cache, monkeypatch, one_thread) -> None:
    monkeypatch.setenv('DNNLIB_CACHE_DIR', module_cache)


@pytest.fixture(scope='session')
def vae_dir(tmp_path_factory) -> str:
    """A tiny random AutoencoderKL (downsampling factor 2, 4 latent channels) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=['DownEncoderBlock2D'] * 2,
        up_block_types=['UpDecoderBlock2D'] * 2,
        block_out_channels=[8, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    path = str(tmp_path_factory.mktemp('vae'))
    vae.save_pretrained(path)
    return path


def assert_one_line_error(result, *fragments: str) -> None:
    """A click run that failed with exactly one 'Error:' line holding every fragment, and no traceback."""
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope='module')
def one_thread():
    """Tiny convolutions run far faster on one thread (no OpenMP spinning on a busy machine); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_config(preset: str, data: str | None = None, **options):
    """training.run_config.setup_training_config with its command-line defaults for a CPU test run (no mixed precision, no
    data workers, seed 0), `options` overriding them."""
    from training.run_config import setup_training_config

    defaults = dict(cond=True, workers=0, fp16=False, bf16=False, ls=1, bench=False, snapshot_fp32=False, seed=0)
    return setup_training_config(preset, data, **{**defaults, 'vae': 'unused', **options})


class _Stop(Exception):
    pass


def input_of(module: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What `layer` receives when `module` runs on `images`; the forward pass stops there."""
    seen = []

    def grab(mod: torch.nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().clone())
        raise _Stop

    handle = layer.register_forward_pre_hook(grab)
    try:
        with pytest.raises(_Stop):
            module(images)
    finally:
        handle.remove()
    return seen[0]
