"""Super-resolution 16->32 against bicubic upsampling on real demo images (SR3, Saharia et al. 2021).

Downsamples held-out 32x32 shapes images to 16x16 (box filter, as in training), upsamples them with the
demo-sr stage and with bicubic interpolation, and prints the RMSE and PSNR of each against the real
32x32 images (pixel values 0..255). Trains the demo-sr preset first when no net is given.

    python bench/sr_quality.py                                   # trains runs/demo-sr if needed
    python bench/sr_quality.py --net=runs/demo-sr --num=256
"""

import os
import subprocess
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.cascade import downsample  # noqa: E402
from training.click_types import FiniteFloatRange
from training.generation import load_network, sample  # noqa: E402
from training.shapes import make_image  # noqa: E402
from training.user_errors import run_with_one_line_errors  # noqa: E402


def errors(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(RMSE, PSNR in dB) of uint8 images against a uint8 reference."""
    rmse = float((images.double() - reference.double()).square().mean().sqrt())
    return rmse, 20 * np.log10(255 / rmse)


@click.command()
@click.option(
    '--net',
    metavar='PKL|DIR',
    type=str,
    default=None,
    help='Super-resolution net  [default: train demo-sr into --outdir]',
)
@click.option(
    '--outdir', metavar='DIR', type=str, default='runs/demo-sr', show_default=True, help='Run folder when training.'
)
@click.option('--num', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True, help='Test images.')
@click.option(
    '--steps', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True, help='Sampling steps.'
)
@click.option(
    '--aug-sigma',
    'aug_sigma',
    metavar='FLOAT',
    type=FiniteFloatRange(min=0),
    default=0.0,
    show_default=True,
    help='Noise augmentation of the low-res input.',
)
@click.option(
    '--seed',
    metavar='INT',
    type=int,
    default=1,
    show_default=True,
    help='Data seed of the test images (training uses 0).',
)
def main(net: str | None, outdir: str, num: int, steps: int, aug_sigma: float, seed: int) -> None:
    """Train (if needed) and compare SR 16->32 with bicubic upsampling."""
    outdir = os.path.abspath(outdir)  # training runs with the repository as its folder
    if net is None:
        subprocess.run(
            [sys.executable, 'train_edm2.py', f'--outdir={outdir}', '--preset=demo-sr', '--workers=1'],
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        net = outdir
    model, encoder = load_network(net, torch.device('cpu'), verbose=True)
    if getattr(model, 'lowres', None) != 16 or model.img_resolution != 32:
        raise click.ClickException(f'{net}: give a 16->32 super-resolution stage (--preset=demo-sr).')
    encoder.init(torch.device('cpu'))
    real = torch.stack([torch.as_tensor(make_image(seed, i, 32)[0]).permute(2, 0, 1) for i in range(num)])
    lowres = downsample(encoder.encode_latents(real), model.lowres)
    bicubic = torch.nn.functional.interpolate(lowres, size=32, mode='bicubic', align_corners=False)
    with torch.no_grad():
        sr = sample(model, range(num), lowres=lowres, aug_sigma=aug_sigma, num_steps=steps).latents
    for name, images in (('bicubic', bicubic), ('demo-sr', sr)):
        rmse, psnr = errors(encoder.decode(images), real)
        print(f'{name:8s} RMSE {rmse:6.2f}  PSNR {psnr:5.2f} dB  ({num} images, 16->32)')


if __name__ == '__main__':
    run_with_one_line_errors(main)
