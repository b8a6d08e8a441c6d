"""Training throughput of a preset's network: the timing behind bench/train_speed.py and bench/data_speed.py.

Times optimiser steps of the network and loss train_edm2.py builds for a preset, on random data of the
preset's geometry, so a user can compare it with the data pipeline's rate or another device.
"""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import dnnlib
from training.backbones import preset_kwargs
from training.presets_train import TRAIN_PRESETS


class ThroughputError(Exception):
    """A preset this timing cannot run; the message is one sentence for the user."""


def time_training_steps(
    preset: str,
    batch: int,
    resolution: int | None = None,
    img_channels: int = 3,
    label_dim: int = 10,
    precision: str = 'fp32',
    steps: int = 10,
    device: torch.device | str = 'cpu',
) -> dnnlib.EasyDict:
    """EasyDict(img_s, ms_step, params, tflops) of `steps` optimiser steps after 2 warm-up steps; `tflops` is the
    achieved rate on CUDA (counted by FlopCounterMode over one more step), else None."""
    if preset not in TRAIN_PRESETS:
        raise ThroughputError(f'Unknown preset {preset!r}; choose one of: {", ".join(TRAIN_PRESETS)}.')
    p = TRAIN_PRESETS[preset]
    if 'network_kwargs' in p:
        raise ThroughputError(f'{preset}: only class-conditional denoisers are timed; this preset trains captions.')
    resolution = resolution or p.get('synthetic', {}).get('resolution', 64)
    device = torch.device(device)
    network_kwargs, loss_kwargs = preset_kwargs(
        p, resolution, use_fp16=dict(fp32=False, fp16=True, bf16='bf16')[precision]
    )
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
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    tflops = None
    if device.type == 'cuda':
        with FlopCounterMode(display=False) as counter:
            step()
        tflops = counter.get_total_flops() / seconds / 1e12
    params = sum(t.numel() for t in net.parameters())
    return dnnlib.EasyDict(img_s=batch / seconds, ms_step=seconds * 1e3, params=params, tflops=tflops)
