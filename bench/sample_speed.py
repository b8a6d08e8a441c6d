"""Sampling throughput of a preset's network: images/s with the Heun sampler, denoiser evaluations/s, achieved
Tflop/s and MFU of the eval-mode denoiser without autograd (the cached weights of eval mode included).

python bench/sample_speed.py --preset=demo --batch=64 --precision=bf16
python bench/sample_speed.py --preset=edm2-img512-xs --batch=128 --resolution=64 --channels-in=4 --label-dim=1000 \\
    --precision=fp16 --compile
python bench/sample_speed.py --preset=demo --threads=1 --clock=process      # on a shared CPU
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.click_types import FiniteFloatRange
from training.presets_train import TRAIN_PRESETS  # noqa: E402
from training.throughput import ThroughputError, describe, settings_label, time_sampling  # noqa: E402


@click.command()
@click.option(
    '--preset',
    metavar='STR',
    type=click.Choice(list(TRAIN_PRESETS)),
    default='demo',
    show_default=True,
    help='Training preset whose network is timed.',
)
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True, help='Images/batch.')
@click.option('--resolution', metavar='INT', type=int, default=None, help='Input size [default: preset data, else 64].')
@click.option(
    '--channels-in', 'img_channels', metavar='INT', type=int, default=3, show_default=True, help='4: latents.'
)
@click.option('--label-dim', metavar='INT', type=int, default=10, show_default=True, help='Number of classes.')
@click.option(
    '--precision',
    type=click.Choice(['fp32', 'fp16', 'bf16']),
    default='fp32',
    show_default=True,
    help='Compute precision (as --precision of train_edm2.py and generate_images.py).',
)
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True, help='Timed evals.')
@click.option(
    '--sampler-steps',
    metavar='INT',
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help='Heun steps an image takes (2N-1 evaluations), for images/s.',
)
@click.option(
    '--device',
    metavar='STR',
    default='cuda' if torch.cuda.is_available() else 'cpu',
    show_default=True,
    help='Torch device, e.g. cpu or cuda:1 (the default: cuda where available).',
)
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the network (first call compiles).')
@click.option(
    '--peak-tflops',
    metavar='FLOAT',
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    help='Device peak for MFU [default: table].',
)
@click.option(
    '--channels-last',
    metavar='BOOL',
    type=bool,
    default=None,
    help='U-Net activations channels-last (True) or NCHW (False) [default: channels-last on CPU only].',
)
@click.option(
    '--keep-freed-memory',
    'keep_freed',
    metavar='BOOL',
    type=bool,
    default=True,
    show_default=True,
    help='CPU: keep freed host memory for reuse, as training and generation do (False: glibc malloc defaults).',
)
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), default=None, help='torch CPU threads.')
@click.option(
    '--clock', type=click.Choice(['wall', 'process']), default='wall', show_default=True, help='process: CPU time.'
)
def main(preset, threads, compile_net, **kw):
    """Time denoiser evaluations of a preset's network on random data (median after two warm-ups)."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        r = time_sampling(preset, compile=compile_net, **kw)
    except ThroughputError as e:
        raise click.ClickException(str(e)) from None
    layout = dict(channels_last=kw['channels_last'], keep_freed=kw['keep_freed'])
    head = settings_label('sample', preset, kw['precision'], kw['device'], kw['batch'], compile_net, **layout)
    print(f'{head}, {kw["sampler_steps"]} Heun steps: {r.evals_s:.1f} evals/s, {describe(r)}')


if __name__ == '__main__':
    main()
