"""Prompt adherence with and without CLIP guidance on the built-in shapes data (GLIDE, Nichol et al. 2021).

For sample i the prompt is the caption of a fresh scene (shapes.sample_scene(seed=--scene-seed, index=i));
an image adheres when its dominant foreground colour (shapes.dominant_foreground_color) is the colour
the prompt names. Every guidance scale uses the same seeds, so only the CLIP term differs. The denoiser
may be unconditional, class-conditional (its class is the scene's shape) or text-conditioned (it also
reads the prompt); the guide must be trained on images of the same size.

    python bench/clip_adherence.py --net=runs/demo-tiny --clip=runs/demo-clip --scales=0,1,3,10
"""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training import shapes  # noqa: E402
from training.click_types import FiniteFloatRange
from training.clip_guidance import check_clip_guide, load_clip_guide  # noqa: E402
from training.encoders import StandardRGBEncoder  # noqa: E402
from training.generation import load_network, resolve_network_path, sample  # noqa: E402
from training.image_grid import save_image_grid  # noqa: E402
from training.user_errors import run_with_one_line_errors  # noqa: E402


def generate(
    net, encoder, clip, scenes: list, seeds: list[int], scale: float, steps: int, guidance: float, device: torch.device
) -> np.ndarray:
    """uint8 NHWC images for the scenes' captions, CLIP-guided with `scale`; a class-conditional net gets
    each scene's shape as its class."""
    captions = [s.caption for s in scenes]
    with torch.no_grad():
        out = sample(
            net,
            seeds,
            class_idx=[s.label for s in scenes],
            captions=captions,
            guidance=guidance,
            clip=clip,
            clip_scale=scale,
            num_steps=steps,
        )
        return encoder.decode(out.latents).permute(0, 2, 3, 1).cpu().numpy()


@click.command()
@click.option(
    '--net', metavar='PKL|DIR', type=str, required=True, help='Denoiser pickle or run folder (its newest snapshot).'
)
@click.option(
    '--clip', metavar='PKL|DIR', type=str, required=True, help='CLIP guide pickle or run folder (its newest snapshot).'
)
@click.option(
    '--scales',
    metavar='LIST',
    type=str,
    default='0,1,3,10',
    show_default=True,
    help='CLIP guidance scales, comma-separated.',
)
@click.option(
    '--num',
    metavar='INT',
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help='Prompts (one image each) per scale.',
)
@click.option(
    '--steps', metavar='INT', type=click.IntRange(min=1), default=16, show_default=True, help='Sampling steps.'
)
@click.option(
    '--guidance',
    metavar='FLOAT',
    type=FiniteFloatRange(),
    default=1.0,
    show_default=True,
    help='CFG with the empty caption (text nets only).',
)
@click.option(
    '--scene-seed', metavar='INT', type=int, default=12345, show_default=True, help='Seed of the prompt scenes.'
)
@click.option(
    '--batch', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True, help='Images per batch.'
)
@click.option('--device', metavar='STR', type=str, default='cpu', show_default=True, help='Torch device.')
@click.option(
    '--outdir', metavar='DIR', type=str, default=None, help='Also write a grid per scale (scale-S.png) and the prompts.'
)
def main(net, clip, scales, num, steps, guidance, scene_seed, batch, device, outdir):
    """Measure how often generated images show the colour their prompt names, per CLIP guidance scale."""
    device = torch.device(device)
    try:
        scale_list = [float(s) for s in scales.split(',')]
    except ValueError:
        raise click.ClickException(f'--scales={scales}: expected comma-separated numbers, e.g. 0,1,3') from None
    denoiser, encoder = load_network(resolve_network_path(net), device)
    encoder = encoder or StandardRGBEncoder()
    encoder.init(device)
    guide = load_clip_guide(resolve_network_path(clip), device)
    check_clip_guide(guide, denoiser)
    scenes = [shapes.sample_scene(scene_seed, i) for i in range(num)]
    print(f'{num} prompts, {steps} steps, chance = 1/{len(shapes.COLOR_NAMES)} = {1 / len(shapes.COLOR_NAMES):.3f}')
    print(f'{"scale":>7s} {"adherence":>10s} {"no-fg":>6s} {"sec":>6s}')
    for scale in scale_list:
        start, hits, empty, grid = time.time(), 0, 0, []
        for i in range(0, num, batch):
            images = generate(
                denoiser,
                encoder,
                guide,
                scenes[i : i + batch],
                list(range(i, min(i + batch, num))),
                scale,
                steps,
                guidance,
                device,
            )
            colors = [shapes.dominant_foreground_color(image) for image in images]
            hits += sum(c == s.color for c, s in zip(colors, scenes[i : i + batch]))
            empty += sum(c is None for c in colors)
            grid.append(images)
        if outdir is not None:
            os.makedirs(outdir, exist_ok=True)
            save_image_grid(np.concatenate(grid).transpose(0, 3, 1, 2), os.path.join(outdir, f'scale-{scale:g}.png'))
            with dnnlib.util.atomic_write(os.path.join(outdir, 'prompts.txt'), 'wt') as f:
                f.write(''.join(f'{i:06d} {s.caption}\n' for i, s in enumerate(scenes)))
        print(f'{scale:7.2f} {hits / num:10.3f} {empty:6d} {time.time() - start:6.1f}')


if __name__ == '__main__':
    run_with_one_line_errors(main)
