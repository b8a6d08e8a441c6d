"""Generate images with an EDM2 network (edm2x or NVIDIA pickle) or DiT: presets, samplers, guidance, cascades.

Every image depends only on its seed and settings, never on --batch or ranks. The library: training/generation.py.
"""

import os
from typing import Any

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from training.click_types import click_options
from training.generation import GenerationError, distinct_seeds, generate_cascade, generate_images
from training.image_sink import ImageSink
from training.output_paths import check_output_file, check_output_folder
from training.presets_generate import cascades
from training.sampler_options import (
    SAMPLER_OPTIONS,
    SWEEP_NAMES,
    Option,
    cascade_settings,
    read_prompts,
    sweep_path,
    sweep_settings,
)
from training.snapshots import TRUST_HELP, trust_pickles
from training.user_errors import USER_ERRORS, one_line, plain_warnings

OUTPUT_OPTIONS = [
    Option('--outdir', 'outdir', str, None, 'DIR', 'Write {seed:06d}.png images here.'),
    Option('--seeds', 'seeds', str, '0-63', 'LIST', 'Seeds, e.g. 0-49999 or 1,2,5-10.'),
    Option('--class', 'class_idx', int, None, 'INT', 'Class label  [default: random per seed]'),
    Option('--batch', 'max_batch_size', int, 32, 'INT', 'Images per batch and rank.', min=1),
    Option('--grid', 'grid', str, None, 'PNG', 'Also write all images as one PNG grid.'),
    Option('--npz', 'npz', str, None, 'NPZ', 'Also write all images to one .npz (uint8 NHWC under arr_0).'),
    Option('--device', 'device', str, None, 'DEVICE', 'Torch device, e.g. cpu or cuda:1  [default: cuda if any]'),
    Option('--precision', 'precision', str, None, 'fp32|fp16|bf16', 'Compute precision  [default: as pickled]'),
    Option('--prompts', 'prompts_file', str, None, 'FILE', 'Text file of prompts, one per line.'),
    Option('--cascade', 'cascade', str, None, 'NAME', 'Run a named cascade (base + super-resolution stages).'),
    Option('--aug-sigma', 'aug_sigma', float, None, 'FLOAT', 'Low-res noise augmentation  [default: cascade]', min=0),
    Option('--clip', 'clip', str, None, 'PKL|DIR', 'Noise-aware CLIP guide (pickle or run folder) for the prompts.'),
    Option(
        '--clip-scale',
        'clip_scale',
        float,
        0.0,
        'FLOAT',
        'CLIP guidance scale S (adds S*sigma^2*grad sim); give it with --clip.',
    ),
]


def _save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(f, format='PNG')


def _image_path(outdir: str, seed: int, subdirs: bool) -> str:
    return os.path.join(outdir, f'{seed // 1000 * 1000:06d}' if subdirs else '', f'{seed:06d}.png')


def _save_captions(
    captions: dict[int, str], seeds: list[int], outdir: str | None, subdirs: bool, grid: str | None
) -> None:
    """captions.txt in --outdir (file, seed, prompt per line) and GRID.txt beside --grid (seed, prompt in grid order)."""
    if outdir is not None:
        with dnnlib.util.atomic_write(os.path.join(outdir, 'captions.txt'), 'wt') as f:
            f.writelines(
                f'{os.path.relpath(_image_path(outdir, s, subdirs), outdir)}\t{s}\t{captions[s]}\n' for s in seeds
            )
    if grid is not None:
        os.makedirs(os.path.dirname(grid) or '.', exist_ok=True)
        with dnnlib.util.atomic_write(os.path.splitext(grid)[0] + '.txt', 'wt') as f:
            f.writelines(f'{seed}\t{captions[seed]}\n' for seed in seeds)


def _check_outputs(o: dnnlib.EasyDict, labels: list[str]) -> None:
    """Before anything is generated: every output of every combination can be written and replaces no input."""
    inputs = [(f, o[name]) for f, name in [('--net', 'net'), ('--gnet', 'gnet'), ('--clip', 'clip')]]
    inputs += [('--prompts', o.prompts_file), ('--vae', o.vae)]
    for label in labels:
        if o.outdir is not None:
            folder = sweep_path(o.outdir, label, folder=True)
            check_output_folder('--outdir', folder, inputs, also=os.path.join(folder, 'captions.txt'))
        if o.grid is not None:
            grid = sweep_path(o.grid, label)
            check_output_file('--grid', grid, ('.png',), inputs, also=os.path.splitext(grid)[0] + '.txt')
        if o.npz is not None:
            check_output_file('--npz', sweep_path(o.npz, label), ('.npz',), inputs)


def _gather_to_rank0(items: dict[int, Any]) -> dict[int, Any]:
    if dist.get_world_size() == 1:
        return items
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    torch.distributed.gather_object(items, parts, dst=0)
    return {seed: item for part in parts or [] for seed, item in part.items()}


def _write(batches, seeds: list[int], outdir: str | None, subdirs: bool, grid: str | None, npz: str | None) -> None:
    """PNGs as they come, the grid and .npz through a file on disk (ImageSink); captions once every rank is done."""
    sink, captions = ImageSink(seeds, grid, npz), {}
    try:
        for batch in batches:
            for i, (seed, image) in enumerate(zip(batch.seeds, batch.images.permute(0, 2, 3, 1).cpu().numpy())):
                if outdir is not None:
                    _save_png(image, _image_path(outdir, seed, subdirs))
                sink.add(seed, image)
                if batch.captions is not None:
                    captions[seed] = batch.captions[i]
    except BaseException:  # Ctrl-C too: the rows file is as large as the .npz
        sink.abort()
        raise
    sink.finish()
    captions = _gather_to_rank0(captions)
    if dist.get_rank() == 0 and captions:
        _save_captions(captions, seeds, outdir, subdirs, grid)


@click.command()
@click_options(SAMPLER_OPTIONS + OUTPUT_OPTIONS, as_text=SWEEP_NAMES)
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the networks (pays for many images).')
@click.option('--subdirs', is_flag=True, help='Put images in subfolders of 1000 seeds ({seed//1000*1000:06d}/).')
@click.option('--prompt', metavar='TEXT', type=str, multiple=True, help='Caption for text nets; repeat for several.')
@click.option('--trust-pickles', is_flag=True, callback=trust_pickles, expose_value=False, help=TRUST_HELP)
def main(**o: Any) -> None:
    """Generate images with an EDM2 network (edm2x or NVIDIA pickle) or DiT, with optional guidance. Examples:

    \b
    # Grid of 64 images from the newest snapshot of the CPU demo (runs/demo)
    python generate_images.py --preset=demo --grid=out/demo-grid.png --device=cpu

    \b
    # 50k images from NVIDIA's img512-S with autoguidance, 8 GPUs
    torchrun --standalone --nproc_per_node=8 generate_images.py \\
        --preset=edm2-img512-s-autog-fid --outdir=out --subdirs --seeds=0-49999

    \b
    # Your own pickle, class 3, with classifier-free guidance by an unconditional net
    python generate_images.py --net=run/net.pkl --gnet=run/uncond.pkl --guidance=1.5 --class=3 --outdir=out

    \b
    # Sweep: one sub-folder of out/ per combination (2 weights x 2 solvers)
    python generate_images.py --net=run/net.pkl --gnet=run/uncond.pkl --guidance=1.5,2 --solver=heun,dpm++2m \\
        --guidance-interval=0.3,5 --steps=20 --outdir=out

    \b
    # DiT-XL/2 at 256x256 as DiT samples it (250 DDPM steps, CFG 1.5); or --sampler=ddim --respacing=ddim25
    python generate_images.py --preset=dit-xl2-256 --class=207 --seeds=0-7 --grid=out/dit.png

    \b
    # Text-to-image cascade of the CPU demo (runs/demo-text, runs/demo-sr): 32x32 images and their captions
    python generate_images.py --cascade=demo-text --prompt="a red circle on a blue background, at the center" \\
        --seeds=0-15 --grid=out/cascade.png --outdir=out/cascade --device=cpu

    \b
    # CLIP guidance of the class-conditional 16x16 demo-tiny net (its classes drawn at random) by the demo-clip guide
    python generate_images.py --net=runs/demo-tiny --clip=runs/demo-clip --clip-scale=100 \\
        --prompt="a red circle on a blue background, at the center" --grid=out/clip.png --device=cpu
    """
    o = dnnlib.EasyDict(o)
    dist.init(cpu=o.device == 'cpu')
    if o.outdir is None and o.grid is None and o.npz is None:
        raise click.ClickException('Nothing to write: give --outdir, --grid or --npz.')
    try:
        seeds = distinct_seeds(dnnlib.util.parse_int_list(o.seeds))
    except (ValueError, GenerationError) as e:
        raise click.ClickException(f'--seeds={o.seeds}: {e}') from None
    try:
        device = dist.device_from_name(o.device)
    except ValueError as e:
        raise click.ClickException(f'--device={o.device}: {e}') from None
    common = dict(seeds=seeds, max_batch_size=o.max_batch_size, device=device, verbose=True)
    common.update(clip=o.clip, clip_scale=o.clip_scale, precision=o.precision, compile=o.compile_net)
    try:
        prompts = read_prompts(o.prompt, o.prompts_file)
        if o.clip is not None and o.clip_scale == 0:
            raise GenerationError('--clip needs --clip-scale, e.g. 100: at its default 0 the guide steers nothing.')
        if o.clip is None and o.clip_scale != 0:
            raise GenerationError('--clip-scale applies with --clip only; name the guide (a pickle or run folder).')
        if o.cascade is None and o.aug_sigma is not None:
            raise GenerationError('--aug-sigma applies to --cascade only (the low-res input of its later stages).')
        if o.cascade is not None:
            if o.cascade not in cascades:
                raise GenerationError(f'Unknown cascade {o.cascade!r}; choose one of: {", ".join(cascades)}.')
            if o.class_idx is not None:
                raise GenerationError('--class does not apply to --cascade, whose stages read captions, not classes.')
            settings = cascade_settings({opt.name: o[opt.name] for opt in SAMPLER_OPTIONS})
            jobs = [('', generate_cascade(cascades[o.cascade], prompts, aug_sigma=o.aug_sigma, **settings, **common))]
        else:
            kw = dict(class_idx=o.class_idx, prompts=prompts, **common)
            sweep = sweep_settings({opt.name: o[opt.name] for opt in SAMPLER_OPTIONS})
            jobs = [
                (label, generate_images(c.net, gnet=c.gnet, vae=c.vae, **kw, **c.sampler_kwargs)) for label, c in sweep
            ]
        _check_outputs(o, [label for label, _ in jobs])
        for label, batches in jobs:
            dist.print0(f'Generating {len(seeds)} images on {dist.get_world_size()} rank(s) ... {label}')
            paths = sweep_path(o.outdir, label, folder=True), sweep_path(o.grid, label), sweep_path(o.npz, label)
            _write(batches, seeds, paths[0], o.subdirs, *paths[1:])
    except USER_ERRORS as e:
        raise click.ClickException(one_line(e)) from None
    dist.print0('Done.')
    dist.finish()


if __name__ == '__main__':
    plain_warnings()
    main()
