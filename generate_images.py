"""Generate images with an EDM2 network: presets, classifier-free guidance and autoguidance, torchrun.

Every image depends only on its seed and the sampler settings (SPEC §9), never on --batch or the
number of ranks. `generate_images()` and `sampler_options` are reused by calculate_metrics.py gen.
"""

import math
import os
from typing import Any, Callable, Iterable, Iterator

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training.cascade import sample_stage
from training.clip_guidance import check_clip_guide, clip_correction, load_clip_guide
from training.encoders import StandardRGBEncoder
from training.image_grid import save_image_grid
from training.presets_generate import cascades, presets
from training.sampling import StackedRandomGenerator, edm_sampler
from training.snapshots import NetworkPickleError, load_network_pickle, parse_snapshot_name


class GenerationError(Exception):
    """Settings that cannot generate images; the message is one sentence for the user."""


# ----------------------------------------------------------------------------
# Loading networks: a pickle path or URL, or a run folder (its newest snapshot).


def resolve_network_path(path: str) -> str:
    """A run folder resolves to its newest snapshot: highest kimg, then highest EMA std."""
    if '://' in path or not os.path.isdir(path):
        return path
    snapshots = []
    for name in os.listdir(path):
        try:
            _prefix, kimg, std = parse_snapshot_name(name)
        except ValueError:
            continue
        snapshots.append((kimg, std, name))
    if not snapshots:
        raise NetworkPickleError(f'{path} holds no network snapshot (PREFIX-KIMG-STD.pkl); train one there first.')
    return os.path.join(path, max(snapshots)[2])


def load_network(path_or_url: str, device: torch.device, verbose: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load (net, encoder) from an edm2x or EDM2 network pickle, ready for sampling on `device`."""
    path = resolve_network_path(path_or_url)
    if verbose:
        dist.print0(f'Loading network from {path} ...')
    data = load_network_pickle(path)
    net = data['ema']
    if not isinstance(net, torch.nn.Module) or not all(
        hasattr(net, k) for k in ('img_resolution', 'img_channels', 'label_dim')
    ):
        raise NetworkPickleError(f"{path} holds no network: its 'ema' entry is a {type(net).__name__}.")
    encoder = data.get('encoder')
    return net.eval().requires_grad_(False).to(device), encoder


def _shape(net: torch.nn.Module) -> str:
    return f'{net.img_channels}x{net.img_resolution}x{net.img_resolution}'


def _is_text_net(net: torch.nn.Module) -> bool:
    return hasattr(net, 'text_encoder')  # training/networks_text.py: captions as labels, maybe a low-res input


# ----------------------------------------------------------------------------
# The generator shared by this script and calculate_metrics.py gen.


def generate_images(
    net: torch.nn.Module | str,
    encoder: Any = None,
    gnet: torch.nn.Module | str | None = None,
    seeds: Iterable[int] = range(16),
    class_idx: int | None = None,
    max_batch_size: int = 32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    prompts: list[str] | None = None,
    clip: torch.nn.Module | str | None = None,
    clip_scale: float = 0.0,
    **sampler_kwargs: Any,
) -> Iterator[dnnlib.EasyDict]:
    """Sample this rank's share of `seeds`, yielding per batch EasyDict(images, seeds, labels, captions).

    `images` are uint8 NCHW on `device`, `labels` one-hot [N, label_dim] (None for unconditional
    nets). Seeds are split across torchrun ranks; each rank yields only its own batches. `net` and
    `gnet` may be pickle paths, URLs or run folders; the guiding net is neither loaded nor evaluated
    when guidance is 1. `sampler_kwargs` go to edm_sampler (num_steps, sigma_min, guidance, ...).
    Text-to-image nets take `prompts` (image i gets prompts[i % len(prompts)], also yielded as
    `captions`) and without `gnet` are guided by the empty caption (classifier-free guidance).
    `clip` (a CLIP guide or its pickle) with `clip_scale` != 0 steers any net towards the prompts
    (training/clip_guidance.py); scale 0 leaves sampling unchanged.
    """
    device = torch.device(device) if device is not None else dist.device()
    if isinstance(net, str):
        net, pickled_encoder = load_network(net, device, verbose)
        encoder = pickled_encoder if encoder is None else encoder
    encoder = StandardRGBEncoder() if encoder is None else encoder
    if sampler_kwargs.get('guidance', 1) == 1:
        gnet = None
    elif gnet is None and not _is_text_net(net):
        raise GenerationError(f'Guidance {sampler_kwargs["guidance"]} needs a guiding network (--gnet).')
    elif isinstance(gnet, str):
        gnet = load_network(gnet, device, verbose)[0]
    if gnet is not None and (_shape(gnet) != _shape(net) or gnet.label_dim not in (0, net.label_dim)):
        raise GenerationError(
            f'The guiding network makes {_shape(gnet)} images with {gnet.label_dim} classes, but the '
            f'network makes {_shape(net)} with {net.label_dim}; guide it with a net trained on the same data.'
        )
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        labels_range = f'has classes 0 to {net.label_dim - 1}' if net.label_dim else 'is unconditional'
        raise GenerationError(f'Class {class_idx} was requested, but the network {labels_range}.')
    if getattr(net, 'lowres', None):
        raise GenerationError(
            f'The network is a {net.lowres}->{net.img_resolution} super-resolution stage; '
            f'run it after a base net with --cascade.'
        )
    if _is_text_net(net) and not prompts:
        raise GenerationError('The network is text-to-image: give --prompt="..." or --prompts=FILE.')
    clip = _load_clip(clip, clip_scale, [net], prompts, device, verbose)
    encoder.init(device)
    with_captions = _is_text_net(net) or clip is not None
    for batch_seeds, captions in _rank_batches(seeds, prompts if with_captions else None, max_batch_size, verbose):
        yield _generate_batch(
            net, encoder, gnet, batch_seeds, class_idx, device, sampler_kwargs, captions, clip, clip_scale
        )


def _load_clip(
    clip: torch.nn.Module | str | None,
    clip_scale: float,
    nets: list[torch.nn.Module],
    prompts: list[str] | None,
    device: torch.device,
    verbose: bool,
) -> torch.nn.Module | None:
    """The CLIP guide when CLIP guidance is on (scale != 0), checked to read the images of one of `nets`; else None."""
    if clip is None or clip_scale == 0:
        return None
    if not prompts:
        raise GenerationError('CLIP guidance needs prompts: give --prompt="..." or --prompts=FILE.')
    if isinstance(clip, str):
        path = resolve_network_path(clip)
        if verbose:
            dist.print0(f'Loading CLIP guide from {path} ...')
        clip = load_clip_guide(path, device)
    check_clip_guide(clip, next((net for net in nets if _shape(net) == _shape(clip)), nets[-1]))
    return clip


def _rank_batches(
    seeds: Iterable[int], prompts: list[str] | None, max_batch_size: int, verbose: bool
) -> Iterator[tuple[list[int], list[str] | None]]:
    """This rank's batches of (seeds, captions); image i of the run gets prompts[i % len(prompts)]."""
    # Interleave batches over ranks: global step k runs batches k*world ... k*world + world - 1.
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = np.asarray(list(seeds), dtype=np.int64)
    num_batches = max(math.ceil(len(seeds) / (max_batch_size * world)), 1) * world
    batches = np.array_split(np.arange(len(seeds)), num_batches)
    progress = tqdm.tqdm(total=len(seeds), unit='img', disable=not verbose or rank != 0)
    for step in range(num_batches // world):
        idx = batches[step * world + rank]
        if len(idx) > 0:
            yield seeds[idx].tolist(), None if prompts is None else [prompts[i % len(prompts)] for i in idx]
        progress.update(sum(len(b) for b in batches[step * world : (step + 1) * world]))
    progress.close()


def _generate_batch(
    net: torch.nn.Module,
    encoder: Any,
    gnet: torch.nn.Module | None,
    seeds: list[int],
    class_idx: int | None,
    device: torch.device,
    sampler_kwargs: dict,
    captions: list[str] | None = None,
    clip: torch.nn.Module | None = None,
    clip_scale: float = 0.0,
) -> dnnlib.EasyDict:
    # Per image: noise first, then (without --class) its random class, then churn noise (SPEC §9).
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim > 0:
        idx = (
            rnd.randint(net.label_dim, size=[len(seeds)]) if class_idx is None else torch.full([len(seeds)], class_idx)
        )
        labels = torch.eye(net.label_dim, device=device)[idx.to(device)]
    if clip is not None:  # S·σ²·∇ₓ sim(image, prompt) added to every denoised estimate.
        sampler_kwargs = dict(sampler_kwargs, correction=clip_correction(clip, captions, clip_scale))
    with torch.no_grad():
        if _is_text_net(net):
            latents = sample_stage(net, noise, captions, gnet=gnet, randn_like=rnd.randn_like, **sampler_kwargs)
        else:
            latents = edm_sampler(net, noise, labels, gnet, randn_like=rnd.randn_like, **sampler_kwargs)
        images = encoder.decode(latents)
    return dnnlib.EasyDict(images=images, seeds=seeds, labels=labels, captions=captions)


def generate_cascade(
    stages: list[dnnlib.EasyDict],
    prompts: list[str],
    seeds: Iterable[int] = range(16),
    max_batch_size: int = 32,
    device: torch.device | str | None = None,
    verbose: bool = False,
    guidance: float | None = None,
    aug_sigma: float | None = None,
    clip: torch.nn.Module | str | None = None,
    clip_scale: float = 0.0,
) -> Iterator[dnnlib.EasyDict]:
    """Run a text-to-image net and its super-resolution stages in order (SPEC §8), yielding per batch
    EasyDict(images, seeds, labels=None, captions) at the last stage's resolution. A stage is
    EasyDict(net, num_steps, guidance, aug_sigma) as in presets_generate.cascades; `guidance` overrides
    the first stage's, `aug_sigma` the super-resolution stages'. Pixel-space stages only. CLIP guidance
    (`clip`, `clip_scale`) applies to the stages whose images the guide reads."""
    device = torch.device(device) if device is not None else dist.device()
    nets = [load_network(stage.net, device, verbose) for stage in stages]
    for k, (net, _encoder) in enumerate(nets):
        want = nets[k - 1][0].img_resolution if k else None
        if not _is_text_net(net) or getattr(net, 'lowres', None) != want:
            role = f'a {want}->N super-resolution stage' if k else 'a text-to-image base net'
            raise GenerationError(f'Cascade stage {k + 1} ({stages[k].net}) must be {role}.')
    clip = _load_clip(clip, clip_scale, [net for net, _encoder in nets], prompts, device, verbose)
    encoder = nets[-1][1] or StandardRGBEncoder()
    encoder.init(device)
    for batch_seeds, captions in _rank_batches(seeds, prompts, max_batch_size, verbose):
        rnd = StackedRandomGenerator(device, batch_seeds)
        x = None
        with torch.no_grad():
            for k, ((net, _encoder), stage) in enumerate(zip(nets, stages)):
                noise = rnd.randn([len(batch_seeds), net.img_channels, net.img_resolution, net.img_resolution])
                x = sample_stage(
                    net,
                    noise,
                    captions,
                    lowres=None if x is None else x.clamp(-1, 1),
                    aug_sigma=stage.aug_sigma if aug_sigma is None else aug_sigma,
                    guidance=stage.guidance if guidance is None or k else guidance,
                    num_steps=stage.num_steps,
                    randn_like=rnd.randn_like,
                    correction=clip_correction(clip, captions, clip_scale)
                    if clip is not None and _shape(clip) == _shape(net)
                    else None,
                )
            images = encoder.decode(x)
        yield dnnlib.EasyDict(images=images, seeds=batch_seeds, labels=None, captions=captions)


# ----------------------------------------------------------------------------
# Command-line options shared with calculate_metrics.py gen.


def sampler_options(fn: Callable) -> Callable:
    """Add --preset --net --gnet --guidance and the sampler options (EDM2's names) to a click command;
    pass the resulting keyword arguments to resolve_sampler_options()."""
    options = [
        click.option(
            '--preset',
            metavar='NAME',
            type=str,
            default=None,
            help='Named net/gnet/guidance, e.g. edm2-img512-s-autog-fid, or demo (newest snapshot in runs/demo).',
        ),
        click.option(
            '--net',
            metavar='PKL|URL|DIR',
            type=str,
            default=None,
            help='Network pickle, or a run folder (its newest snapshot).',
        ),
        click.option(
            '--gnet',
            metavar='PKL|URL|DIR',
            type=str,
            default=None,
            help='Guiding network: unconditional (CFG) or weaker (autoguidance).',
        ),
        click.option(
            '--guidance',
            metavar='FLOAT',
            type=float,
            default=None,
            help='Guidance strength w; 1 = none  [default: preset, else 1]',
        ),
        click.option(
            '--steps',
            'num_steps',
            metavar='INT',
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help='Number of sampling steps.',
        ),
        click.option(
            '--sigma_min',
            metavar='FLOAT',
            type=click.FloatRange(min=0, min_open=True),
            default=0.002,
            show_default=True,
            help='Lowest noise level.',
        ),
        click.option(
            '--sigma_max',
            metavar='FLOAT',
            type=click.FloatRange(min=0, min_open=True),
            default=80.0,
            show_default=True,
            help='Highest noise level.',
        ),
        click.option(
            '--rho',
            metavar='FLOAT',
            type=click.FloatRange(min=0, min_open=True),
            default=7.0,
            show_default=True,
            help='Time step exponent.',
        ),
        click.option(
            '--S_churn',
            'S_churn',
            metavar='FLOAT',
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help='Stochasticity strength.',
        ),
        click.option(
            '--S_min',
            'S_min',
            metavar='FLOAT',
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help='Lowest noise level with churn.',
        ),
        click.option(
            '--S_max',
            'S_max',
            metavar='FLOAT',
            type=click.FloatRange(min=0),
            default=float('inf'),
            show_default=True,
            help='Highest noise level with churn.',
        ),
        click.option(
            '--S_noise',
            'S_noise',
            metavar='FLOAT',
            type=float,
            default=1.0,
            show_default=True,
            help='Churn noise inflation.',
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def resolve_sampler_options(
    preset: str | None, net: str | None, gnet: str | None, guidance: float | None, **sampler_kwargs: Any
) -> dnnlib.EasyDict:
    """Expand a preset under the options given: EasyDict(net, gnet, sampler_kwargs) for generate_images()."""
    if preset is not None:
        if preset not in presets:
            raise GenerationError(f'Unknown preset {preset!r}; choose one of: {", ".join(presets)}.')
        net = net or presets[preset].net
        gnet = gnet or presets[preset].gnet
        guidance = presets[preset].guidance if guidance is None else guidance
    if net is None:
        raise GenerationError('No network given: use --net=PKL or --preset=NAME.')
    guidance = 1.0 if guidance is None else guidance
    return dnnlib.EasyDict(net=net, gnet=gnet, sampler_kwargs=dnnlib.EasyDict(guidance=guidance, **sampler_kwargs))


# ----------------------------------------------------------------------------
# Output files.


def _save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(f, format='PNG')


def read_prompts(prompt: Iterable[str], prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts=FILE."""
    prompts = list(prompt)
    if prompts_file is not None:
        try:
            with open(prompts_file, encoding='utf-8') as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise GenerationError(
                f'--prompts={prompts_file}: cannot read it ({e}); give a UTF-8 text file, one prompt a line.'
            ) from None
        if not prompts:
            raise GenerationError(f'--prompts={prompts_file} holds no prompts; write one prompt a line.')
    return prompts


def _save_captions(
    captions: dict[int, str], seeds: list[int], outdir: str | None, subdirs: bool, grid: str | None
) -> None:
    """captions.txt in --outdir (file, seed, prompt per line) and GRID.txt beside --grid (seed, prompt in grid order)."""
    if outdir is not None:
        lines = [
            f'{seed // 1000 * 1000:06d}/' * subdirs + f'{seed:06d}.png\t{seed}\t{captions[seed]}\n' for seed in seeds
        ]
        with dnnlib.util.atomic_write(os.path.join(outdir, 'captions.txt'), 'wt') as f:
            f.writelines(lines)
    if grid is not None:
        os.makedirs(os.path.dirname(grid) or '.', exist_ok=True)
        with dnnlib.util.atomic_write(os.path.splitext(grid)[0] + '.txt', 'wt') as f:
            f.writelines(f'{seed}\t{captions[seed]}\n' for seed in seeds)


def _gather_to_rank0(images: dict[int, Any]) -> dict[int, Any]:
    if dist.get_world_size() == 1:
        return images
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    torch.distributed.gather_object(images, parts, dst=0)
    return {seed: image for part in parts or [] for seed, image in part.items()}


@click.command()
@sampler_options
@click.option('--outdir', metavar='DIR', type=str, default=None, help='Write {seed:06d}.png images here.')
@click.option('--subdirs', is_flag=True, help='Put images in subfolders of 1000 seeds ({seed//1000*1000:06d}/).')
@click.option(
    '--seeds', metavar='LIST', type=str, default='0-63', show_default=True, help='Seeds, e.g. 0-49999 or 1,2,5-10.'
)
@click.option(
    '--class', 'class_idx', metavar='INT', type=int, default=None, help='Class label  [default: random per seed]'
)
@click.option(
    '--batch',
    'max_batch_size',
    metavar='INT',
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help='Images per batch and rank.',
)
@click.option('--grid', metavar='PNG', type=str, default=None, help='Also write all images as one PNG grid.')
@click.option(
    '--npz', metavar='NPZ', type=str, default=None, help='Also write all images to one .npz (uint8 NHWC under arr_0).'
)
@click.option(
    '--device',
    metavar='DEVICE',
    type=str,
    default=None,
    help='Torch device, e.g. cpu or cuda:1  [default: cuda if available]',
)
@click.option(
    '--prompt',
    'prompt',
    metavar='TEXT',
    type=str,
    multiple=True,
    help='Caption for text-to-image nets; repeat for several (cycled over seeds).',
)
@click.option(
    '--prompts', 'prompts_file', metavar='FILE', type=str, default=None, help='Text file of prompts, one per line.'
)
@click.option(
    '--cascade',
    metavar='NAME',
    type=str,
    default=None,
    help='Run a named cascade (base + super-resolution stages, their steps and guidance).',
)
@click.option(
    '--aug-sigma',
    'aug_sigma',
    metavar='FLOAT',
    type=click.FloatRange(min=0),
    default=None,
    help='Noise augmentation of low-res inputs  [default: cascade preset]',
)
@click.option(
    '--clip',
    metavar='PKL|DIR',
    type=str,
    default=None,
    help='Noise-aware CLIP guide (pickle or run folder) steering towards the prompts.',
)
@click.option(
    '--clip-scale',
    'clip_scale',
    metavar='FLOAT',
    type=float,
    default=0.0,
    show_default=True,
    help='CLIP guidance scale S (adds S*sigma^2*grad sim); 0 = off.',
)
def main(
    outdir: str | None,
    subdirs: bool,
    seeds: str,
    class_idx: int | None,
    max_batch_size: int,
    grid: str | None,
    npz: str | None,
    device: str | None,
    prompt: tuple[str, ...],
    prompts_file: str | None,
    cascade: str | None,
    aug_sigma: float | None,
    clip: str | None,
    clip_scale: float,
    **opts: Any,
) -> None:
    """Generate images with an EDM2 network (edm2x or NVIDIA pickle), with optional guidance.

    Examples:

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
    # Text-to-image cascade of the CPU demo (runs/demo-text, runs/demo-sr): 32x32 images and their captions
    python generate_images.py --cascade=demo-text --prompt="a red circle on a blue background, at the center" \\
        --seeds=0-15 --grid=out/cascade.png --outdir=out/cascade --device=cpu

    \b
    # CLIP guidance of the unconditional 16x16 demo net by the demo-clip guide (runs/demo-clip)
    python generate_images.py --net=runs/demo-tiny --clip=runs/demo-clip --clip-scale=100 \\
        --prompt="a red circle on a blue background, at the center" --grid=out/clip.png --device=cpu
    """
    dist.init()
    if outdir is None and grid is None and npz is None:
        raise click.ClickException('Nothing to write: give --outdir, --grid or --npz.')
    try:
        seed_list = dnnlib.util.parse_int_list(seeds)
    except ValueError as e:
        raise click.ClickException(f'--seeds={seeds}: {e}') from None
    try:
        torch_device = torch.device(device) if device is not None else dist.device()
    except RuntimeError as e:
        raise click.ClickException(f'--device={device}: {e}') from None
    try:
        prompts = read_prompts(prompt, prompts_file)
        if cascade is not None:
            if cascade not in cascades:
                raise GenerationError(f'Unknown cascade {cascade!r}; choose one of: {", ".join(cascades)}.')
            batches = generate_cascade(
                cascades[cascade],
                prompts,
                seed_list,
                max_batch_size,
                torch_device,
                verbose=True,
                guidance=opts['guidance'],
                aug_sigma=aug_sigma,
                clip=clip,
                clip_scale=clip_scale,
            )
        else:
            c = resolve_sampler_options(**opts)
            batches = generate_images(
                c.net,
                gnet=c.gnet,
                seeds=seed_list,
                class_idx=class_idx,
                max_batch_size=max_batch_size,
                device=torch_device,
                verbose=True,
                prompts=prompts,
                clip=clip,
                clip_scale=clip_scale,
                **c.sampler_kwargs,
            )
        dist.print0(f'Generating {len(seed_list)} images on {dist.get_world_size()} rank(s) ...')
        collected, captions = {}, {}
        for batch in batches:
            images = batch.images.permute(0, 2, 3, 1).cpu().numpy()
            for i, (seed, image) in enumerate(zip(batch.seeds, images)):
                if outdir is not None:
                    _save_png(
                        image, os.path.join(outdir, f'{seed // 1000 * 1000:06d}' if subdirs else '', f'{seed:06d}.png')
                    )
                if grid is not None or npz is not None:
                    collected[seed] = image
                if batch.get('captions') is not None:
                    captions[seed] = batch.captions[i]
        collected, captions = _gather_to_rank0(collected), _gather_to_rank0(captions)
        if dist.get_rank() == 0 and captions:
            _save_captions(captions, seed_list, outdir, subdirs, grid)
        if dist.get_rank() == 0 and collected:
            all_images = np.stack([collected[seed] for seed in seed_list])
            if grid is not None:
                os.makedirs(os.path.dirname(grid) or '.', exist_ok=True)
                save_image_grid(all_images.transpose(0, 3, 1, 2), grid)
            if npz is not None:
                os.makedirs(os.path.dirname(npz) or '.', exist_ok=True)
                with dnnlib.util.atomic_write(npz) as f:
                    np.savez(f, arr_0=all_images)
    except (GenerationError, NetworkPickleError, OSError) as e:
        raise click.ClickException(str(e)) from None
    dist.print0('Done.')


if __name__ == '__main__':
    main()
