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
from training.click_types import throughput_options  # noqa: E402
from training.throughput import ThroughputError, describe, settings_label, time_training_steps  # noqa: E402


@click.command()
@throughput_options('step')
@click.option('--checkpointing', is_flag=True, help='Activation checkpointing of the U-Net blocks.')
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
