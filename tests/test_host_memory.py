"""Tests of torch_utils/host_memory.py: freed host memory is kept for reuse, and CPU training, generation, metrics
and VAE encoding ask for it."""

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, training_config

import dataset_tool
from torch_utils import host_memory
from training import dataset_io, generation, metrics, training_loop

glibc = pytest.mark.skipif(not host_memory._glibc(), reason='mallopt is glibc-specific')

# A fresh interpreter allocates and frees 40 tensors five times, each round's a little larger than the last
# (27-28 MiB, as a CPU step's activations come and go), and prints the page faults of the last three rounds and
# the pages they touched. glibc's defaults serve every tensor larger than any freed before with fresh pages; kept
# memory serves them from the heap, faulting in only its growth.
ROUNDS = """
import resource, sys, torch
from torch_utils.host_memory import keep_freed_memory
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
def one_round(r):
    tensors = [torch.ones(2**17 * (52 + r)) for _ in range(40)]
    del tensors
one_round(0); one_round(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for r in range(2, 5):
    one_round(r)
pages = sum(40 * (52 + r) * 2**19 for r in range(2, 5)) // resource.getpagesize()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, pages)
"""


def _faults_and_pages(mode: str) -> tuple[int, int]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', ROUNDS, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    faults, pages = map(int, out.stdout.split())
    return faults, pages


@glibc
def test_kept_memory_is_reused_without_page_faults_where_malloc_defaults_fault_it_in_again():
    kept, pages = _faults_and_pages('keep')
    default, _ = _faults_and_pages('default')
    assert kept < pages / 20, (kept, pages)
    assert default > pages / 10, (default, pages)  # what the setting saves: here every page of every round


def test_other_devices_leave_malloc_alone(monkeypatch):
    monkeypatch.setattr(host_memory, '_kept', False)
    monkeypatch.setattr(host_memory, '_glibc', lambda: pytest.fail('a CUDA device must not reach mallopt'))
    assert (
        host_memory.keep_freed_memory('cuda') is False
        and host_memory.keep_freed_memory(torch.device('cuda:1')) is False
    )


@pytest.fixture
def recorded_calls(monkeypatch) -> list:
    calls = []
    record = lambda device: calls.append(torch.device(device)) or True  # noqa: E731
    for module in (training_loop, generation, metrics, host_memory):  # dataset_tool imports it when it runs
        monkeypatch.setattr(module, 'keep_freed_memory', record)
    return calls


def test_cpu_training_keeps_freed_memory(tmp_path, monkeypatch, recorded_calls):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    c = training_config('demo-tiny')
    c.update(total_nimg=16, batch_size=16, status_nimg=16, snapshot_nimg=None, checkpoint_nimg=None)
    training_loop.training_loop(run_dir=str(tmp_path), device=torch.device('cpu'), **c)
    assert recorded_calls == [torch.device('cpu')]


class Shrink(torch.nn.Module):
    """An unconditional denoiser D(x; σ) = x / (1 + σ²) of 2x4x4 images."""

    img_channels, img_resolution, label_dim = 2, 4, 0

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros([]), requires_grad=False)

    def forward(self, x, sigma, labels=None, **kwargs):
        return x / (1 + torch.as_tensor(sigma).reshape(-1, 1, 1, 1) ** 2)


def test_cpu_generation_keeps_freed_memory(recorded_calls):
    batches = list(generation.generate_images(Shrink(), seeds=[0, 1], device='cpu', num_steps=2))
    assert sum(len(b.images) for b in batches) == 2 and recorded_calls == [torch.device('cpu')]


class ChannelMeans(torch.nn.Module):
    """A stand-in detector: each image's mean per channel as its features."""

    feature_dim = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3))


def test_cpu_metrics_keep_freed_memory(recorded_calls):
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    stats = metrics.calculate_stats_for_iterable(
        [images], metrics=['fid'], detectors={'fid': ChannelMeans()}, device='cpu', verbose=False
    )
    assert stats['fid']['mu'].shape == (3,) and recorded_calls == [torch.device('cpu')]


def test_cpu_vae_encoding_keeps_freed_memory(tmp_path, vae_dir, recorded_calls):
    source = str(tmp_path / 'pixels.zip')
    dataset_io.write_synthetic_dataset(source, resolution=8, num_images=2, seed=0, progress=False)
    args = ['encode', f'--model-url={vae_dir}', f'--source={source}', f'--dest={tmp_path / "latents.zip"}']
    result = CliRunner().invoke(dataset_tool.cli, [*args, '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert recorded_calls == [torch.device('cpu')]
