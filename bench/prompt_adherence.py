"""Per-attribute prompt adherence of a text-to-image net (or cascade) on the built-in shapes data.

Prompts are held out: captions that no training image carries as a whole (training/prompt_sets.py), each
sampled with seeds disjoint from the training grids. Every image is read back by
training/shape_attributes.py (checked first on dataset images) and scored on shape, foreground colour,
background colour and position separately and all four jointly, beside the chance of an image that ignores
the prompt. Rows: each guidance weight, the empty caption, and with --clip each CLIP scale; with --seen a
table on captions the data does carry; with --hold-out (the fragments given to `dataset_tool.py synth
--hold-out` for the net's data) a table on the combinations that data left out entirely. Trains demo-text
first when neither --net nor --cascade is given.

    python bench/prompt_adherence.py --net=runs/demo-text --guidance=1,2,3
    python bench/prompt_adherence.py --cascade=demo-text --guidance=2 --seen
    python bench/prompt_adherence.py --net=runs/demo-text --clip=runs/demo-clip --clip-scales=1,3
    python bench/prompt_adherence.py --net=runs/text-ho --hold-out='red circle' --seen
"""

import os
import subprocess
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import shapes  # noqa: E402
from training.generation import generate_cascade, generate_images  # noqa: E402
from training.presets_generate import cascades  # noqa: E402
from training.prompt_sets import ATTRIBUTES, held_out_scenes, scenes_containing, seen_scenes  # noqa: E402
from training.shape_attributes import CHANCE, classify  # noqa: E402
from training.user_errors import run_with_one_line_errors  # noqa: E402

FIRST_SEED = 1000  # Training grids use seeds 0-15.


def images_for(net: str | None, cascade: str | None, captions: list[str], steps: int, **kwargs) -> np.ndarray:
    """uint8 NHWC images, image i for captions[i] and seed FIRST_SEED + i."""
    seeds = range(FIRST_SEED, FIRST_SEED + len(captions))
    common = dict(seeds=seeds, device=torch.device('cpu'), **kwargs)
    if cascade is not None:
        batches = generate_cascade(cascades[cascade], captions, num_steps=steps, **common)
    else:
        batches = generate_images(net, prompts=captions, num_steps=steps, **common)
    return np.concatenate([b.images.permute(0, 2, 3, 1).cpu().numpy() for b in batches])


def scores(images: np.ndarray, scenes: list) -> dict[str, float]:
    found = [classify(image) for image in images]
    right = {name: [getattr(f, name) == getattr(s, name) for f, s in zip(found, scenes)] for name in ATTRIBUTES}
    right['joint'] = [all(r) for r in zip(*right.values())]
    return {name: float(np.mean(values)) for name, values in right.items()}


def print_table(title: str, rows: dict[str, dict[str, float]], num: int) -> None:
    print(f'\n{title} ({num} prompts)\n')
    print('| setting | shape | foreground | background | position | all four |')
    print('|---|---:|---:|---:|---:|---:|')
    for setting, s in rows.items():
        print(f'| {setting} | ' + ' | '.join(f'{s[n]:.0%}' for n in (*ATTRIBUTES, 'joint')) + ' |')
    chance = dict(CHANCE, joint=float(np.prod(list(CHANCE.values()))))
    print('| chance | ' + ' | '.join(f'{chance[n]:.2%}' for n in (*ATTRIBUTES, 'joint')) + ' |')


def parse_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(',')]
    except ValueError:
        raise click.BadParameter(f'{text!r}: give numbers separated by commas') from None


@click.command()
@click.option('--net', metavar='PKL|DIR', type=str, default=None, help='Text-to-image net.')
@click.option('--cascade', metavar='NAME', type=click.Choice(list(cascades)), default=None,
              help='Score the output of a cascade instead (its stages from presets_generate).')  # fmt: skip
@click.option('--outdir', metavar='DIR', type=str, default='runs/demo-text', show_default=True,
              help='Run folder to train demo-text into when neither --net nor --cascade is given.')  # fmt: skip
@click.option('--num', metavar='INT', type=click.IntRange(min=1), default=48, show_default=True,
              help='Held-out prompts.')  # fmt: skip
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=24, show_default=True,
              help='Sampling steps (every stage of a cascade).')  # fmt: skip
@click.option('--guidance', metavar='LIST', type=str, default='1,2,3', show_default=True,
              help='Guidance weights by the empty caption.')  # fmt: skip
@click.option('--clip', metavar='PKL|DIR', type=str, default=None, help='CLIP guide for the --clip-scales rows.')
@click.option('--clip-scales', metavar='LIST', type=str, default='1,3', show_default=True,
              help='CLIP guidance scales, at the first --guidance weight.')  # fmt: skip
@click.option('--seen', is_flag=True, help='Also score captions the training data carries.')
@click.option('--hold-out', 'hold_out', metavar='TEXT', multiple=True,
              help="Caption fragments the net's data was written without; also score those combinations.")  # fmt: skip
@click.option('--dataset-size', metavar='INT', type=click.IntRange(min=1), default=10000, show_default=True,
              help='Images of the built-in data the net trained on (seed 0), to tell held-out captions.')  # fmt: skip
def main(net, cascade, outdir, num, steps, guidance, clip, clip_scales, seen, hold_out, dataset_size) -> None:
    """Score shape, colours and position of held-out prompts, per attribute and jointly."""
    outdir = os.path.abspath(outdir)  # training runs with the repository as its folder
    if net is None and cascade is None:
        subprocess.run(
            [sys.executable, 'train_edm2.py', f'--outdir={outdir}', '--preset=demo-text', '--workers=1'],
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        net = outdir
    weights = parse_list(guidance)
    data = dict(dataset_size=dataset_size, hold_out=hold_out)
    try:
        sets = {'held-out captions': held_out_scenes(num, **data)}
    except ValueError as e:  # --num beyond the captions the data leaves out
        raise click.ClickException(str(e)) from None
    if seen:
        sets['captions in the training data'] = seen_scenes(num, **data)
    if hold_out:
        combinations = scenes_containing(hold_out)
        order = np.random.default_rng(0).permutation(len(combinations))[:num]
        sets['combinations left out of the data'] = [combinations[i] for i in sorted(order)]
    for title, scenes in sets.items():
        reader = np.mean([classify(shapes.render_scene(s, 16)).clean for s in scenes])
        print(f'Reader on the {title} rendered at 16x16: {reader:.0%} clean')
    for title, scenes in sets.items():
        captions = [s.caption for s in scenes]
        rows = {}
        for w in weights:
            rows[f'guidance {w:g}'] = scores(images_for(net, cascade, captions, steps, guidance=w), scenes)
        rows['empty caption'] = scores(images_for(net, cascade, [''] * len(scenes), steps, guidance=1.0), scenes)
        for scale in parse_list(clip_scales) if clip is not None else []:
            images = images_for(net, cascade, captions, steps, guidance=weights[0], clip=clip, clip_scale=scale)
            rows[f'guidance {weights[0]:g}, CLIP {scale:g}'] = scores(images, scenes)
        print_table(title, rows, len(scenes))


if __name__ == '__main__':
    run_with_one_line_errors(main)
