"""Training throughput of a preset's network on this device: images/s, and achieved TFLOP/s on CUDA.

python bench/train_speed.py --preset=demo --batch=64
python bench/train_speed.py --preset=edm2-img512-xs --batch=32 --resolution=64 --channels-in=4 --label-dim=1000
"""

import os
import sys
import time

import click
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training.backbones import preset_kwargs  # noqa: E402
from training.presets_train import TRAIN_PRESETS  # noqa: E402


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
    p = TRAIN_PRESETS[preset]
    resolution = resolution or p.get('synthetic', {}).get('resolution', 64)
    if 'network_kwargs' in p:
        raise click.ClickException(
            f'{preset}: this bench times class-conditional denoisers; the preset trains captions.'
        )
    use_fp16 = dict(fp32=False, fp16=True, bf16='bf16')[precision]
    device = torch.device(device)
    network_kwargs, loss_kwargs = preset_kwargs(p, resolution, use_fp16=use_fp16)
    net = dnnlib.util.construct_class_by_name(
        img_resolution=resolution, img_channels=img_channels, label_dim=label_dim, **network_kwargs
    )
    net = net.train().to(device)
    if loss_kwargs.class_name == 'training.loss.EDM2Loss':
        loss_kwargs.update({k: p[k] for k in ('P_mean', 'P_std') if k in p})
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    images = torch.randn([batch, img_channels, resolution, resolution], device=device)
    labels = torch.eye(label_dim, device=device)[torch.randint(label_dim, [batch], device=device)]

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net, images, labels).sum().backward()
        opt.step()

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    params = sum(p.numel() for p in net.parameters())
    line = f'{preset} {precision} on {device}: {params / 1e6:.2f}M params, batch {batch}, {dt * 1e3:.1f} ms/step, {batch / dt:.1f} img/s'
    if device.type == 'cuda':
        with FlopCounterMode(display=False) as counter:
            step()
        line += f', {counter.get_total_flops() / dt / 1e12:.1f} TFLOP/s achieved'
    print(line)


if __name__ == '__main__':
    main()
