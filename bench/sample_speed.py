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
from training.click_types import throughput_options  # noqa: E402
from training.throughput import ThroughputError, describe, settings_label, time_sampling  # noqa: E402


@click.command()
@throughput_options('eval')
@click.option(
    '--sampler-steps',
    metavar='INT',
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help='Heun steps an image takes (2N-1 evaluations), for images/s.',
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
