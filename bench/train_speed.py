"""Training throughput of a preset's network: images/s, achieved Tflop/s (3x forward flops per image) and MFU.

python bench/train_speed.py --preset=demo --batch=64 --precision=bf16
python bench/train_speed.py --preset=edm2-img512-s --batch=64 --resolution=64 --channels-in=4 --label-dim=1000 \\
    --precision=bf16 --compile                        # MFU from the built-in H100/H200/A100 peaks on CUDA
python bench/train_speed.py --preset=demo --threads=1 --clock=process --peak-tflops=1.5   # on a shared CPU
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.click_types import FiniteFloatRange
from training.presets_train import TRAIN_PRESETS  # noqa: E402
from training.throughput import ThroughputError, describe, settings_label, time_training_steps  # noqa: E402


@click.command()
@click.option(
    '--preset',
    metavar='STR',
    type=click.Choice(list(TRAIN_PRESETS)),
    default='demo',
    show_default=True,
    help='Training preset whose network is timed.',
)
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True, help='Images/step.')
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
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True, help='Timed steps.')
@click.option(
    '--device',
    metavar='STR',
    default='cuda' if torch.cuda.is_available() else 'cpu',
    show_default=True,
    help='Torch device, e.g. cpu or cuda:1 (the default: cuda where available).',
)
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the network (first step compiles).')
@click.option('--checkpointing', is_flag=True, help='Activation checkpointing of the U-Net blocks.')
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
    """Time Adam steps of a preset's network and EDM2 loss on random data (median step after two warm-ups)."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        r = time_training_steps(preset, compile=compile_net, **kw)
    except ThroughputError as e:
        raise click.ClickException(str(e)) from None
    layout = dict(checkpointing=kw['checkpointing'], channels_last=kw['channels_last'], keep_freed=kw['keep_freed'])
    head = settings_label('train', preset, kw['precision'], kw['device'], kw['batch'], compile_net, **layout)
    print(f'{head}, {r.params / 1e6:.2f}M params: {describe(r)}')


if __name__ == '__main__':
    main()
