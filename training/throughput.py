"""Training and sampling throughput of a preset's network: the timing behind bench/train_speed.py,
bench/sample_speed.py and bench/data_speed.py.

Times optimiser steps (or denoiser evaluations) of the network and loss train_edm2.py builds for a preset, on
random data of the preset's geometry, and states them as the figures users compare: images/s, achieved Tflop/s
and model-flops utilisation (MFU). Flops follow the hardware convention (a multiply-add is two flops; matrix
products, convolutions and attention only, counted by torch's FlopCounterMode on the meta device), i.e. twice
count_flops.py's multiply-add count; a training image costs 3x its forward flops (forward and two backward
products), a sampled image (2 * steps - 1) forward passes (Heun, EDM Alg. 2).
"""

import resource
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

import dnnlib
from torch_utils import distributed as dist
from torch_utils.host_memory import keep_freed_memory
from training.backbones import BackboneError, preset_kwargs
from training.networks_edm2 import set_channels_last, set_checkpointing
from training.precision import compile_module, use_fp16_of
from training.presets_train import TRAIN_PRESETS

# Dense bf16/fp16 tensor-core peaks (and fp32 without TF32), Tflop/s, from the vendors' data sheets (SXM parts).
PEAK_TFLOPS = {
    'H200': dict(bf16=989.4, fp16=989.4, fp32=66.9),
    'H100': dict(bf16=989.4, fp16=989.4, fp32=66.9),
    'A100': dict(bf16=312.0, fp16=312.0, fp32=19.5),
}


class ThroughputError(Exception):
    """A preset this timing cannot run; the message is one sentence for the user."""


def known_peak_tflops(device: torch.device | str, precision: str) -> float | None:
    """The table's peak for a CUDA device whose name holds H200/H100/A100; None elsewhere (pass --peak-tflops)."""
    device = torch.device(device)
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((row[precision] for key, row in PEAK_TFLOPS.items() if key in name), None)


def _random_labels(label_dim: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """One-hot labels of random classes, or None for an unconditional net (label_dim 0)."""
    if not label_dim:
        return None
    return torch.eye(label_dim, device=device)[torch.randint(label_dim, [batch], device=device)]


def build_preset_net(
    preset: str, resolution: int | None, img_channels: int, label_dim: int, precision: str, device: torch.device
) -> tuple[torch.nn.Module, object, int]:
    """(network, loss, resolution) as train_edm2.py builds them for `preset`, on `device`, in training mode."""
    if preset not in TRAIN_PRESETS:
        raise ThroughputError(f'Unknown preset {preset!r}; choose one of: {", ".join(TRAIN_PRESETS)}.')
    try:
        device = dist.device_from_name(str(device))
    except ValueError as e:
        raise ThroughputError(f'--device={device}: {e}') from None
    if precision == 'fp16' and device.type != 'cuda':
        raise ThroughputError('--precision=fp16 computes in float16 on CUDA only (EDM2); elsewhere it would time fp32.')
    p = TRAIN_PRESETS[preset]
    if 'network_kwargs' in p:
        raise ThroughputError(
            f'{preset}: only class-conditional denoisers are timed; this preset trains a text, super-resolution or '
            f'CLIP net.'
        )
    resolution = resolution or p.get('synthetic', {}).get('resolution', 64)
    try:
        network_kwargs, loss_kwargs = preset_kwargs(p, resolution, use_fp16=use_fp16_of(precision))
    except BackboneError as e:
        raise ThroughputError(f'{preset}: {e}') from None
    net = dnnlib.util.construct_class_by_name(
        img_resolution=resolution, img_channels=img_channels, label_dim=label_dim, **network_kwargs
    )
    if loss_kwargs.class_name == 'training.loss.EDM2Loss':
        loss_kwargs.update({k: p[k] for k in ('P_mean', 'P_std') if k in p})
    return net.train().to(device), dnnlib.util.construct_class_by_name(**loss_kwargs), resolution


def set_layout(net: torch.nn.Module, preset: str, channels_last: bool | None) -> None:
    """The U-Net activation layout to time (None: the network's default, channels-last on CPU only)."""
    if channels_last is not None and not set_channels_last(net, channels_last):
        raise ThroughputError(f'{preset}: --channels-last applies to U-Net networks only.')


def forward_flops_per_image(net: torch.nn.Module, img_channels: int, resolution: int, label_dim: int) -> float:
    """Forward flops of one image (2 per multiply-add), counted on a meta-device copy: no memory, no arithmetic."""
    with torch.device('meta'):
        meta = type(net)(*net.init_args, **net.init_kwargs).train()  # a persistent class keeps its arguments
    batch = 2
    x = torch.zeros([batch, img_channels, resolution, resolution], device='meta')
    labels = torch.zeros([batch, label_dim], device='meta') if label_dim else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(x, torch.ones([batch], device='meta'), labels)
    return counter.get_total_flops() / batch


def _timed(fn: Callable[[], None], device: torch.device, steps: int, clock: str) -> tuple[float, float]:
    """(seconds of the first call, e.g. a compile; median seconds per call of `steps` calls after one more).
    clock 'process' counts this process's CPU time (CPU only): with one thread it is the compute time even on a
    machine shared with other jobs, where wall-clock time counts their share too."""
    if clock not in ('wall', 'process') or (clock == 'process' and device.type != 'cpu'):
        raise ThroughputError(f"clock must be 'wall', or 'process' on the CPU; not {clock!r} on {device}.")
    now = time.perf_counter if clock == 'wall' else time.process_time

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    start = now()
    fn()
    sync()
    first = now() - start
    fn()
    times = []
    for _ in range(steps):
        sync()
        start = now()
        fn()
        sync()
        times.append(now() - start)
    return first, sorted(times)[len(times) // 2]


def _peak_memory_gb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident memory (Linux ru_maxrss in KiB), so
    a comparison needs one process per setting, as the bench scripts run."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _result(batch: int, seconds: float, flops_per_call: float, peak_tflops: float | None, **extra) -> dnnlib.EasyDict:
    tflops = flops_per_call / seconds / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    return dnnlib.EasyDict(img_s=batch / seconds, ms=seconds * 1e3, tflops=tflops, mfu=mfu, **extra)


def time_training_steps(
    preset: str,
    batch: int,
    resolution: int | None = None,
    img_channels: int = 3,
    label_dim: int = 10,
    precision: str = 'fp32',
    steps: int = 10,
    device: torch.device | str = 'cpu',
    compile: bool = False,
    checkpointing: bool = False,
    peak_tflops: float | None = None,
    clock: str = 'wall',
    channels_last: bool | None = None,
    keep_freed: bool = True,
) -> dnnlib.EasyDict:
    """EasyDict(img_s, ms (per step, median), ms_step (the same), tflops, mfu (None without a peak), params,
    gflops_per_img (training), first_s (first step, compile included), peak_mem_gb (CUDA tensors; CPU process
    RSS)) of `steps` Adam steps. cuDNN autotuning is on, as train_edm2.py's --bench default has it. On the CPU,
    `keep_freed` keeps freed host memory for the next step as training does (torch_utils/host_memory.py)."""
    device = torch.device(device)
    if keep_freed:
        keep_freed_memory(device)  # process-wide, cannot be undone: time the other setting in another process
    net, loss_fn, resolution = build_preset_net(preset, resolution, img_channels, label_dim, precision, device)
    flops = 3 * forward_flops_per_image(net, img_channels, resolution, label_dim) * batch
    if checkpointing and not set_checkpointing(net):
        raise ThroughputError(f'{preset}: --checkpointing applies to U-Net networks only.')
    set_layout(net, preset, channels_last)
    torch.backends.cudnn.benchmark = True
    compile_module(net, compile)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.99), eps=1e-8)
    images = torch.randn([batch, img_channels, resolution, resolution], device=device)
    labels = _random_labels(label_dim, batch, device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(net, images, labels).sum().backward()
        opt.step()

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    first, seconds = _timed(step, device, steps, clock)
    params = sum(t.numel() for t in net.parameters())
    extra = dict(params=params, gflops_per_img=flops / batch / 1e9, first_s=first, peak_mem_gb=_peak_memory_gb(device))
    result = _result(batch, seconds, flops, peak_tflops or known_peak_tflops(device, precision), **extra)
    result.ms_step = result.ms
    return result


def time_sampling(
    preset: str,
    batch: int,
    resolution: int | None = None,
    img_channels: int = 3,
    label_dim: int = 10,
    precision: str = 'fp32',
    steps: int = 10,
    sampler_steps: int = 32,
    device: torch.device | str = 'cpu',
    compile: bool = False,
    peak_tflops: float | None = None,
    clock: str = 'wall',
    channels_last: bool | None = None,
    keep_freed: bool = True,
) -> dnnlib.EasyDict:
    """EasyDict(img_s (images per second with the `sampler_steps`-step Heun sampler), evals_s (denoiser
    evaluations of one image per second), ms (per batch evaluation, median), tflops, mfu, gflops_per_img
    (per sampled image), first_s, peak_mem_gb) of `steps` evaluations of the eval-mode denoiser without autograd;
    `keep_freed` as in time_training_steps."""
    device = torch.device(device)
    if keep_freed:
        keep_freed_memory(device)
    net, _, resolution = build_preset_net(preset, resolution, img_channels, label_dim, precision, device)
    flops = forward_flops_per_image(net, img_channels, resolution, label_dim) * batch
    set_layout(net, preset, channels_last)
    net.eval().requires_grad_(False)
    compile_module(net, compile)
    x = torch.randn([batch, img_channels, resolution, resolution], device=device)
    sigma = torch.full([batch], 2.5, device=device)
    labels = _random_labels(label_dim, batch, device)

    def evaluate():
        with torch.no_grad():
            net(x, sigma, labels)

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    first, seconds = _timed(evaluate, device, steps, clock)
    evals = 2 * sampler_steps - 1
    result = _result(batch, seconds, flops, peak_tflops or known_peak_tflops(device, precision), first_s=first)
    result.update(
        evals_s=result.img_s,
        img_s=result.img_s / evals,
        gflops_per_img=flops / batch * evals / 1e9,
        peak_mem_gb=_peak_memory_gb(device),
    )
    return result


def settings_label(
    kind: str,
    preset: str,
    precision: str,
    device: str,
    batch: int,
    compile: bool = False,
    checkpointing: bool = False,
    channels_last: bool | None = None,
    keep_freed: bool = True,
) -> str:
    """The head of a bench line, e.g. 'train demo bf16 compile nchw on cpu (2 threads), batch 64'."""
    opts = precision + ' compile' * compile + ' checkpointing' * checkpointing
    opts += ' malloc-defaults' * (not keep_freed and torch.device(device).type == 'cpu')
    opts += {None: '', True: ' channels-last', False: ' nchw'}[channels_last]
    return f'{kind} {preset} {opts} on {device} ({torch.get_num_threads()} threads), batch {batch}'


def describe(r: dnnlib.EasyDict) -> str:
    """One line of a timing's figures, as the bench scripts print them."""
    line = f'{r.img_s:.2f} img/s, {r.ms:.1f} ms/call, {dnnlib.util.format_figure(r.gflops_per_img)} Gflop/img, {r.tflops:.3f} Tflop/s'
    line += f', MFU {r.mfu:.1%}' if r.mfu is not None else ', MFU n/a (give --peak-tflops)'
    line += f', first call {r.first_s:.1f} s'
    return line + f', peak memory {r.peak_mem_gb:.2f} GiB'
