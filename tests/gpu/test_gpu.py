"""The CUDA path: fp16 (loss scaling) and bf16 training, DDP over NCCL, generation, post-hoc EMA, metrics, TF32,
torchrun's device and download order. Every test is skipped without CUDA, so CPU CI skips the folder; run it with
`python -m pytest -q tests/gpu` or bench/gpu_suite.sh on a GPU machine."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
TINY = ['--preset=demo-tiny', '--workers=1', '--duration=2Ki', '--status=512', '--snapshot=1Ki', '--checkpoint=1Ki']


def run(args: list[str], tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')]))  # keep a --target install's path
    env = dict(os.environ, PYTHONPATH=path, DNNLIB_CACHE_DIR=str(tmp_path / 'cache'))
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def losses(run_dir: str) -> list[float]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    return [row['Loss/loss'] for row in rows if 'Loss/loss' in row]  # the first status line precedes training


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict[str, str]:
    """demo-tiny trained 2Ki images on cuda:0 in fp32, fp16 (loss scaling 16) and bf16."""
    tmp = tmp_path_factory.mktemp('runs')
    out = {}
    for precision, extra in (('fp32', []), ('fp16', ['--ls=16']), ('bf16', [])):
        out[precision] = str(tmp / precision)
        run(
            [sys.executable, 'train_edm2.py', f'--outdir={out[precision]}', *TINY, f'--precision={precision}', *extra],
            tmp,
        )
    return out


def test_fp16_and_bf16_training_learn_like_fp32_with_float32_state(runs):
    curves = {precision: losses(run_dir) for precision, run_dir in runs.items()}
    for precision, curve in curves.items():
        assert np.isfinite(curve).all() and curve[-1] < curves['fp32'][0], (precision, curve)
        assert abs(curve[-1] - curves['fp32'][-1]) < 0.2 * abs(curves['fp32'][0]), (precision, curve)
        state = torch.load(
            sorted(glob.glob(os.path.join(runs[precision], 'training-state-*.pt')))[-1], weights_only=False
        )
        assert all(v.dtype == torch.float32 for v in state['net'].values() if v.is_floating_point())
    options = json.load(open(os.path.join(runs['fp16'], 'training_options.json')))
    assert options['network_kwargs']['use_fp16'] is True and options['loss_scaling'] == 16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='DDP over NCCL needs two GPUs')
def test_ddp_over_nccl_trains_like_one_process(tmp_path):
    one, two = str(tmp_path / 'one'), str(tmp_path / 'two')
    common = [*TINY, '--precision=fp32', '--duration=256', '--checkpoint=256', '--workers=0']
    run([sys.executable, 'train_edm2.py', f'--outdir={one}', *common, '--batch-gpu=8'], tmp_path)
    run([*TORCHRUN, '--nproc_per_node=2', 'train_edm2.py', f'--outdir={two}', *common], tmp_path)
    for a, b in zip(losses(one), losses(two)):
        assert abs(a - b) < 0.5 * abs(a)  # same data and batch; the noise draws differ per rank


def test_generation_on_cuda_is_deterministic_per_seed_across_batch_sizes(runs, tmp_path):
    images = {}
    for batch in (1, 3):
        npz = str(tmp_path / f'b{batch}.npz')
        run([sys.executable, 'generate_images.py', f'--net={runs["bf16"]}', '--seeds=0-5', f'--batch={batch}',
             f'--npz={npz}', '--steps=8', '--device=cuda'], tmp_path)  # fmt: skip
        images[batch] = np.load(npz)['arr_0'].astype(int)
    assert images[1].std() > 0 and np.abs(images[1] - images[3]).max() <= 1


def test_post_hoc_ema_reconstructs_from_cuda_snapshots(runs, tmp_path):
    out = str(tmp_path / 'phema')
    run(
        [sys.executable, 'reconstruct_phema.py', f'--indir={runs["fp16"]}', f'--outdir={out}', '--outstd=0.07'],
        tmp_path,
    )
    assert glob.glob(os.path.join(out, '*.pkl'))


def test_feature_statistics_on_cuda_match_the_cpu():
    from training.metrics import calculate_stats_for_iterable

    class Pool(torch.nn.Module):
        feature_dim = 12

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)

    images = torch.randint(0, 256, [40, 3, 8, 8], dtype=torch.uint8)
    stats = {}
    for device in ('cpu', 'cuda'):
        batches = (images[i : i + 8] for i in range(0, 40, 8))
        stats[device] = calculate_stats_for_iterable(
            batches, ['fid'], detectors={'fid': Pool().to(device)}, device=device, verbose=False
        )
    for key, value in stats['cpu']['fid'].items():
        np.testing.assert_allclose(stats['cuda']['fid'][key], value, rtol=1e-6, atol=1e-6)


def test_tf32_is_off_by_default_and_on_with_the_option():
    from training.precision import set_tf32

    a, b = torch.randn(512, 512, device='cuda'), torch.randn(512, 512, device='cuda')
    exact = (a.double() @ b.double()).float()
    set_tf32(False)
    fp32_error = (a @ b - exact).abs().max().item()
    set_tf32(True)
    tf32_error = (a @ b - exact).abs().max().item()
    set_tf32(False)
    assert fp32_error < 1e-3 and (tf32_error > 10 * fp32_error or torch.cuda.get_device_capability() < (8, 0))


_DIST_SCRIPT = """
import os, sys, time
import torch
from torch_utils import distributed as dist
dist.init(cpu=sys.argv[1] == 'cpu')
with dist.rank0_first():
    start = time.time()
    time.sleep(0.5)
    end = time.time()
print(dist.get_rank(), torch.distributed.get_backend(), dist.device().type, start, end, flush=True)
"""


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_torchrun_backend_follows_the_device_and_rank0_goes_first(tmp_path, device):
    script = tmp_path / 'dist.py'
    script.write_text(_DIST_SCRIPT)
    nproc = 2 if device == 'cpu' or torch.cuda.device_count() >= 2 else 1
    result = run([*TORCHRUN, f'--nproc_per_node={nproc}', str(script), device], tmp_path)
    rows = sorted(line.split() for line in result.stdout.splitlines() if line[:1].isdigit())
    assert [(r[1], r[2]) for r in rows] == [('gloo', 'cpu') if device == 'cpu' else ('nccl', 'cuda')] * nproc
    if nproc == 2:
        assert float(rows[1][3]) >= float(rows[0][4])  # rank 1 entered after rank 0 left
