"""How many samples of a demo net show exactly one clean shape of the requested class.

Reads every sample back with training/shape_attributes.py (a fit of the renderer's own geometry), after
checking that reader on the dataset's images at the net's resolution. For a class-conditional net the
classes are requested in turn (`--per-class` seeds each); an unconditional net is scored on clean shapes
of any class. Runs on the CPU.

    python bench/demo_quality.py --net=runs/demo                      # 8 samples per class, 24 steps
    python bench/demo_quality.py --net=runs/demo --guidance=2 --S_churn=10 --steps=32   # as --preset=demo samples
    python bench/demo_quality.py --net=runs/demo-dit --per-class=16 --grid=out/demo-dit-quality.png
"""

import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import shapes  # noqa: E402
from training.click_types import FiniteFloatRange
from training.generation import load_network, network_kind, sample  # noqa: E402
from training.image_grid import save_image_grid  # noqa: E402
from training.output_paths import check_output_file  # noqa: E402
from training.presets_generate import presets  # noqa: E402
from training.shape_attributes import classify  # noqa: E402
from training.user_errors import run_with_one_line_errors  # noqa: E402

_PRESET_CHURN = ', '.join(
    f'{name} {p.sampler_kwargs.S_churn:g}' for name, p in presets.items() if p.sampler_kwargs.get('S_churn')
)


def reader_accuracy(resolution: int, num: int = 200) -> float:
    """Fraction of dataset images whose shape, colours and position are all read back, and clean."""
    right = 0
    for index in range(num):
        scene = shapes.sample_scene(seed=1, index=index)
        found = classify(shapes.render_scene(scene, resolution))
        same = (found.shape, found.color, found.background, found.position)
        right += found.clean and same == (scene.shape, scene.color, scene.background, scene.position)
    return right / num


@click.command()
@click.option('--net', metavar='PKL|DIR', type=str, required=True, help='Class-conditional or unconditional demo net.')
@click.option('--per-class', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True,
              help='Samples per class (an unconditional net: this times the number of classes).')  # fmt: skip
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=24, show_default=True,
              help='Sampling steps (EDM Heun).')  # fmt: skip
@click.option('--S_churn', 'S_churn', metavar='FLOAT', type=FiniteFloatRange(min=0), default=0.0, show_default=True,
              help='Churn (stochasticity strength) of the EDM sampler; generation presets use '
                   f'{_PRESET_CHURN} (generate_images.py --preset).')  # fmt: skip
@click.option('--gnet', metavar='PKL|DIR', type=str, default=None, help='Guiding net (with --guidance).')
@click.option(
    '--guidance', metavar='FLOAT', type=FiniteFloatRange(), default=1.0, show_default=True, help='Guidance strength.'
)
@click.option('--grid', metavar='PNG', type=str, default=None, help='Save the samples, one class per row.')
def main(
    net: str, per_class: int, steps: int, S_churn: float, gnet: str | None, guidance: float, grid: str | None
) -> None:
    """Score a demo net's samples: one clean shape of the requested class per image."""
    if grid is not None:
        check_output_file('--grid', grid, ('.png',), [('--net', net), ('--gnet', gnet)])
    device = torch.device('cpu')
    model, encoder = load_network(net, device, verbose=True)
    if network_kind(model) != 'edm2' or model.img_channels != 3:
        raise click.ClickException(f'{net}: give a pixel-space class-conditional or unconditional net.')
    guide = load_network(gnet, device)[0] if gnet is not None else None
    resolution, classes = model.img_resolution, len(shapes.SHAPES)
    print(f'Reader on {resolution}x{resolution} dataset images: {reader_accuracy(resolution):.1%} fully right')
    wanted = [c for c in range(classes) for _ in range(per_class)]
    with torch.no_grad():
        out = sample(
            model,
            range(len(wanted)),
            class_idx=wanted if model.label_dim else None,
            gnet=guide,
            guidance=guidance,
            num_steps=steps,
            S_churn=S_churn,
        )
        images = encoder.decode(out.latents).permute(0, 2, 3, 1).cpu().numpy()
    found = [classify(image) for image in images]
    if model.label_dim:
        good = [f.clean and f.shape == shapes.SHAPES[c] for f, c in zip(found, wanted)]
        for c, name in enumerate(shapes.SHAPES):
            row = good[c * per_class : (c + 1) * per_class]
            print(f'  {name:9s} {sum(row):3d} of {per_class}')
        what = 'one clean shape of the requested class'
    else:
        good = [f.clean for f in found]
        what = 'one clean shape'
    print(f'{sum(good)} of {len(good)} samples ({np.mean(good):.1%}) show exactly {what}.')
    if grid is not None:
        save_image_grid(images.transpose(0, 3, 1, 2), grid, grid_w=per_class)
        print(f'Samples: {grid}')


if __name__ == '__main__':
    run_with_one_line_errors(main)
