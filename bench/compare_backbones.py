"""U-Net vs transformer, MP vs not: train EDM2's MP U-Net, DiT and MP-DiT on the built-in shapes data at
about equal Gflops per image and for the same number of images, all with EDM2's preconditioning and loss,
and report each one's final training loss, a held-out denoising loss and a sample grid.

python bench/compare_backbones.py --outdir=runs/compare --nimg=32Ki
python bench/compare_backbones.py --outdir=runs/compare --nimg=8Ki --resolution=16 --channels=16

The U-Net is the demo preset's (--channels wide); each transformer's width is the multiple of 32 (4x4
patches, depth --depth) whose Gflops come nearest the U-Net's. Gflops count a multiply-add once (torch's
FlopCounterMode total halved), the convention of DiT's and EDM2's tables. The held-out loss is EDM2's
weighted denoising error E[λ(σ)·‖D(y + n; σ) − y‖²] of the 0.100 power-function EMA on 256 images the
nets never saw, at 16 fixed quantiles of the training distribution of ln σ and fixed noise.
"""

import json
import os
import shutil
import sys

import click
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training import backbones  # noqa: E402
from training.click_types import FiniteFloatRange
from training.dataset_io import write_synthetic_dataset  # noqa: E402
from training.encoders import StandardRGBEncoder  # noqa: E402
from training.output_paths import OutputPathError, check_output_folder  # noqa: E402
from training.snapshots import load_network_pickle  # noqa: E402
from training.training_loop import training_loop  # noqa: E402

P_MEAN, P_STD = -0.8, 1.6  # the demo presets' pixel-space noise levels


def gflops(net: torch.nn.Module, resolution: int, label_dim: int) -> float:
    """Forward-pass Gflops of one image, a multiply-add counted once."""
    x = torch.zeros([1, 3, resolution, resolution])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.ones([1]), torch.zeros([1, label_dim]))
    return counter.get_total_flops() / 2e9


def network_kwargs(arch: str, resolution: int, channels: int, depth: int, width: int | None) -> dict:
    unet = dict(model_channels=channels, channel_mult=[1, 2, 4], num_blocks=1, attn_resolutions=[8])
    transformer = dict(patch_size=4 if resolution >= 32 else 2, hidden_size=width or 64, depth=depth, num_heads=1)
    net, _ = backbones.build_kwargs(arch, 'edm', resolution, unet, transformer, use_fp16=False)
    return net


def build(kwargs: dict, resolution: int, label_dim: int) -> torch.nn.Module:
    return dnnlib.util.construct_class_by_name(img_resolution=resolution, img_channels=3, label_dim=label_dim, **kwargs)


def matched_width(arch: str, target: float, resolution: int, channels: int, depth: int, label_dim: int) -> int:
    widths = range(32, 513, 32)
    costs = [
        gflops(
            build(network_kwargs(arch, resolution, channels, depth, w), resolution, label_dim), resolution, label_dim
        )
        for w in widths
    ]
    return widths[int(np.argmin([abs(c - target) for c in costs]))]


@torch.no_grad()
def heldout_loss(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    gen = torch.Generator().manual_seed(0)
    quantiles = (np.arange(16) + 0.5) / 16
    ln_sigma = torch.distributions.Normal(P_MEAN, P_STD).icdf(torch.tensor(quantiles))
    total = 0.0
    for s in ln_sigma.exp().tolist():
        noise = torch.randn(images.shape, generator=gen) * s
        weight = (s**2 + 0.25) / (s * 0.5) ** 2
        total += weight * (net(images + noise, s, labels) - images).square().mean().item()
    return total / len(ln_sigma)


@click.command()
@click.option('--outdir', metavar='DIR', type=str, required=True, help='Where the runs, grids and results go.')
@click.option('--nimg', metavar='NIMG', type=str, default='32Ki', show_default=True, help='Training images per net.')
@click.option(
    '--resolution',
    metavar='16|32',
    type=click.Choice(['16', '32']),
    default='32',
    show_default=True,
    help='Size of the built-in shapes images.',
)
@click.option('--channels', metavar='INT', type=int, default=16, show_default=True, help='U-Net model_channels.')
@click.option('--depth', metavar='INT', type=int, default=4, show_default=True, help='Transformer blocks.')
@click.option('--batch', metavar='INT', type=int, default=64, show_default=True, help='Batch size.')
@click.option(
    '--lr', metavar='FLOAT', type=FiniteFloatRange(), default=0.01, show_default=True, help='Reference learning rate.'
)
@click.option(
    '--archs',
    metavar='LIST',
    type=str,
    default='unet,dit,mp-dit',
    show_default=True,
    help='Backbones to train, comma-separated.',
)
def main(outdir: str, nimg: str, resolution: str, channels: int, depth: int, batch: int, lr: float, archs: str) -> None:
    """Train each architecture on the shapes data at equal Gflops and images; print and save the results."""
    try:
        check_output_folder('--outdir', outdir)
    except OutputPathError as e:
        raise click.ClickException(str(e)) from None
    res, total = int(resolution), dnnlib.util.parse_nimg(nimg)
    data = os.path.join(outdir, f'shapes-{res}px.zip')
    if not os.path.isfile(data):
        os.makedirs(outdir, exist_ok=True)
        write_synthetic_dataset(data, resolution=res, num_images=10256, seed=0)
    dataset = dnnlib.util.construct_class_by_name(
        class_name='training.dataset.ImageFolderDataset', path=data, use_labels=True
    )
    label_dim = dataset.label_dim
    heldout = range(len(dataset) - 256, len(dataset))
    images = StandardRGBEncoder().encode_latents(torch.as_tensor(np.stack([dataset[i][0] for i in heldout])))
    labels = torch.as_tensor(np.stack([dataset[i][1] for i in heldout]))
    unet_cost = gflops(build(network_kwargs('unet', res, channels, depth, None), res, label_dim), res, label_dim)
    results = []
    for arch in archs.split(','):
        width = None if arch == 'unet' else matched_width(arch, unet_cost, res, channels, depth, label_dim)
        kwargs = network_kwargs(arch, res, channels, depth, width)
        net = build(kwargs, res, label_dim)
        run = os.path.join(outdir, arch)
        shutil.rmtree(run, ignore_errors=True)
        os.makedirs(run)
        training_loop(
            dataset_kwargs=dict(
                class_name='training.dataset.ImageFolderDataset',
                path=data,
                use_labels=True,
                max_size=len(dataset) - 256,
            ),
            encoder_kwargs=dict(class_name='training.encoders.StandardRGBEncoder'),
            data_loader_kwargs=dict(num_workers=1, prefetch_factor=2, persistent_workers=True),
            network_kwargs=kwargs,
            loss_kwargs=dict(class_name='training.loss.EDM2Loss', P_mean=P_MEAN, P_std=P_STD),
            optimizer_kwargs=dict(class_name='torch.optim.Adam', betas=(0.9, 0.99), eps=1e-8),
            lr_kwargs=dict(
                func_name='training.loss.learning_rate_schedule', ref_lr=lr, ref_batches=500, rampup_Mimg=0.005
            ),
            ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA', stds=[0.100]),
            run_dir=run,
            batch_size=batch,
            total_nimg=total,
            status_nimg=total // 8,
            snapshot_nimg=total,
            checkpoint_nimg=None,
            sample_steps=24,
            device=torch.device('cpu'),
        )
        stats = [json.loads(line) for line in open(os.path.join(run, 'stats.jsonl'))]
        snapshot = sorted(p for p in os.listdir(run) if p.startswith('network-snapshot-'))[-1]
        ema_net = load_network_pickle(os.path.join(run, snapshot))['ema'].float()
        grid = sorted(p for p in os.listdir(run) if p.startswith('samples-'))[-1]
        shutil.copyfile(os.path.join(run, grid), os.path.join(outdir, f'grid-{arch}.png'))
        row = dict(
            arch=arch,
            width=width or channels,
            params=sum(p.numel() for p in net.parameters()),
            gflops=gflops(net, res, label_dim),
            train_loss=stats[-1]['Loss/loss'],
            heldout_loss=heldout_loss(ema_net, images, labels),
            sec_per_kimg=float(np.mean([s['Timing/sec_per_kimg'] for s in stats[1:]])),
        )
        results.append(row)
        print(json.dumps(row))
    with open(os.path.join(outdir, 'results.json'), 'wt') as f:
        json.dump(results, f, indent=2)
    print(f'{"arch":8s} {"width":>5s} {"params":>9s} {"Gflops":>7s} {"train":>7s} {"held-out":>8s} {"s/kimg":>7s}')
    for r in results:
        print(
            f'{r["arch"]:8s} {r["width"]:5d} {r["params"]:9,d} {r["gflops"]:7.4f} {r["train_loss"]:7.4f} {r["heldout_loss"]:8.4f} {r["sec_per_kimg"]:7.1f}'
        )


if __name__ == '__main__':
    main()
