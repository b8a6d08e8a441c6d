"""Training throughput of a preset's network on this device: images/s, and achieved TFLOP/s on CUDA.

python bench/train_speed.py --preset=demo --batch=64
python bench/train_speed.py --preset=edm2-img512-xs --batch=32 --resolution=64 --channels-in=4 --label-dim=1000
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.presets_train import TRAIN_PRESETS  # noqa: E402
from training.throughput import ThroughputError, time_training_steps  # noqa: E402


@click.command()
@click.option(
    '--preset',
    metavar='STR',
    type=click.Choice(list(TRAIN_PRESETS)),
    default='demo',
    show_default=True,
    help='Training preset whose network to time.',
)
@click.option(
    '--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True, help='Images per step.'
)
@click.option(
    '--resolution', metavar='INT', type=int, default=None, help='Input resolution [default: preset data, else 64].'
)
@click.option(
    '--channels-in',
    'img_channels',
    metavar='INT',
    type=int,
    default=3,
    show_default=True,
    help='Input channels (4 for SD latents).',
)
@click.option('--label-dim', metavar='INT', type=int, default=10, show_default=True, help='Number of classes.')
@click.option(
    '--precision',
    type=click.Choice(['fp32', 'fp16', 'bf16']),
    default='fp32',
    show_default=True,
    help='Compute precision.',
)
@click.option(
    '--steps',
    metavar='INT',
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help='Timed steps (after 2 warm-up steps).',
)
@click.option(
    '--device',
    metavar='STR',
    type=str,
    default='cuda' if torch.cuda.is_available() else 'cpu',
    show_default=True,
    help='Torch device.',
)
def main(preset, batch, resolution, img_channels, label_dim, precision, steps, device):
    """Time optimiser steps of a preset's network on random data."""
    try:
        r = time_training_steps(preset, batch, resolution, img_channels, label_dim, precision, steps, device)
    except ThroughputError as e:
        raise click.ClickException(str(e)) from None
    line = f'{preset} {precision} on {device}: {r.params / 1e6:.2f}M params, batch {batch}, '
    line += f'{r.ms_step:.1f} ms/step, {r.img_s:.1f} img/s'
    print(line + (f', {r.tflops:.1f} TFLOP/s achieved' if r.tflops is not None else ''))


if __name__ == '__main__':
    main()
