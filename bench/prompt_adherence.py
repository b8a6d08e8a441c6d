"""Prompt adherence of a text-to-image net on the built-in shapes data (Imagen-style CFG, Ho & Salimans 2022).

Samples 64 images for prompts that name a colour, and reports the fraction whose dominant foreground
colour (training/shapes.py, exact palette) matches the prompt; then the same seeds with the empty
caption, which should match at chance (1/8). Trains the demo-text preset first when no net is given.

    python bench/prompt_adherence.py                                  # trains runs/demo-text if needed
    python bench/prompt_adherence.py --net=runs/demo-text --guidance=2
"""

import os
import subprocess
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training.generation import load_network, sample  # noqa: E402
from training.shapes import COLOR_NAMES, POSITIONS, SHAPES, dominant_foreground_color  # noqa: E402


def color_prompts(num: int) -> tuple[list[str], list[str]]:
    """(prompts, the colour each names): colours cycle, shapes, backgrounds and positions vary."""
    prompts, colors = [], []
    for i in range(num):
        n = len(COLOR_NAMES)
        color, background = COLOR_NAMES[i % n], COLOR_NAMES[(i + 1 + (i // n) % (n - 1)) % n]
        article = 'an' if color[0] in 'aeiou' else 'a'
        position = list(POSITIONS)[i % len(POSITIONS)]
        prompts.append(f'{article} {color} {SHAPES[i % len(SHAPES)]} on a {background} background, at the {position}')
        colors.append(color)
    return prompts, colors


def match_rate(
    net: torch.nn.Module, encoder, prompts: list[str], colors: list[str], guidance: float, steps: int
) -> float:
    with torch.no_grad():
        out = sample(net, range(len(prompts)), captions=prompts, guidance=guidance, num_steps=steps)
        images = encoder.decode(out.latents)
    found = [dominant_foreground_color(image) for image in images.permute(0, 2, 3, 1).numpy()]
    return float(np.mean([f == c for f, c in zip(found, colors)]))


@click.command()
@click.option(
    '--net',
    metavar='PKL|DIR',
    type=str,
    default=None,
    help='Text-to-image net  [default: train demo-text into --outdir]',
)
@click.option(
    '--outdir', metavar='DIR', type=str, default='runs/demo-text', show_default=True, help='Run folder when training.'
)
@click.option(
    '--num', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True, help='Images per measurement.'
)
@click.option(
    '--steps', metavar='INT', type=click.IntRange(min=1), default=24, show_default=True, help='Sampling steps.'
)
@click.option(
    '--guidance',
    metavar='FLOAT',
    type=float,
    default=2.0,
    show_default=True,
    help='Classifier-free guidance (empty caption).',
)
def main(net: str | None, outdir: str, num: int, steps: int, guidance: float) -> None:
    """Train (if needed) and measure colour adherence with and without the caption."""
    if net is None:
        subprocess.run(
            [sys.executable, 'train_edm2.py', f'--outdir={outdir}', '--preset=demo-text', '--workers=1'],
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        net = outdir
    model, encoder = load_network(net, torch.device('cpu'), verbose=True)
    prompts, colors = color_prompts(num)
    conditional = {w: match_rate(model, encoder, prompts, colors, w, steps) for w in sorted({1.0, guidance})}
    unconditional = match_rate(model, encoder, [''] * num, colors, 1.0, steps)
    for w, rate in conditional.items():
        print(f'prompted, guidance {w:g}: {rate:.1%} of {num} match the prompted colour')
    print(f'empty caption:           {unconditional:.1%} match (chance {1 / len(COLOR_NAMES):.1%})')


if __name__ == '__main__':
    main()
