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
from training.encoders import StandardRGBEncoder
from training.image_grid import save_image_grid
from training.presets_generate import presets
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
    if not isinstance(net, torch.nn.Module) or not all(hasattr(net, k) for k in ('img_resolution', 'img_channels', 'label_dim')):
        raise NetworkPickleError(f"{path} holds no network: its 'ema' entry is a {type(net).__name__}.")
    encoder = data.get('encoder')
    return net.eval().requires_grad_(False).to(device), encoder


def _shape(net: torch.nn.Module) -> str:
    return f'{net.img_channels}x{net.img_resolution}x{net.img_resolution}'

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
    **sampler_kwargs: Any,
) -> Iterator[dnnlib.EasyDict]:
    """Sample this rank's share of `seeds`, yielding per batch EasyDict(images, seeds, labels).

    `images` are uint8 NCHW on `device`, `labels` one-hot [N, label_dim] (None for unconditional
    nets). Seeds are split across torchrun ranks; each rank yields only its own batches. `net` and
    `gnet` may be pickle paths, URLs or run folders; the guiding net is neither loaded nor evaluated
    when guidance is 1. `sampler_kwargs` go to edm_sampler (num_steps, sigma_min, guidance, ...).
    """
    device = torch.device(device) if device is not None else dist.device()
    if isinstance(net, str):
        net, pickled_encoder = load_network(net, device, verbose)
        encoder = pickled_encoder if encoder is None else encoder
    encoder = StandardRGBEncoder() if encoder is None else encoder
    if sampler_kwargs.get('guidance', 1) == 1:
        gnet = None
    elif gnet is None:
        raise GenerationError(f"Guidance {sampler_kwargs['guidance']} needs a guiding network (--gnet).")
    elif isinstance(gnet, str):
        gnet = load_network(gnet, device, verbose)[0]
    if gnet is not None and (_shape(gnet) != _shape(net) or gnet.label_dim not in (0, net.label_dim)):
        raise GenerationError(f'The guiding network makes {_shape(gnet)} images with {gnet.label_dim} classes, but the '
                              f'network makes {_shape(net)} with {net.label_dim}; guide it with a net trained on the same data.')
    if class_idx is not None and not 0 <= class_idx < net.label_dim:
        labels_range = f'has classes 0 to {net.label_dim - 1}' if net.label_dim else 'is unconditional'
        raise GenerationError(f'Class {class_idx} was requested, but the network {labels_range}.')
    encoder.init(device)

    # Interleave batches over ranks: global step k runs batches k*world ... k*world + world - 1.
    rank, world = dist.get_rank(), dist.get_world_size()
    seeds = np.asarray(list(seeds), dtype=np.int64)
    num_batches = max(math.ceil(len(seeds) / (max_batch_size * world)), 1) * world
    batches = np.array_split(seeds, num_batches)
    progress = tqdm.tqdm(total=len(seeds), unit='img', disable=not verbose or rank != 0)
    for step in range(num_batches // world):
        batch_seeds = batches[step * world + rank]
        if len(batch_seeds) > 0:
            yield _generate_batch(net, encoder, gnet, batch_seeds.tolist(), class_idx, device, sampler_kwargs)
        progress.update(sum(len(b) for b in batches[step * world:(step + 1) * world]))
    progress.close()


def _generate_batch(net: torch.nn.Module, encoder: Any, gnet: torch.nn.Module | None, seeds: list[int],
                    class_idx: int | None, device: torch.device, sampler_kwargs: dict) -> dnnlib.EasyDict:
    # Per image: noise first, then (without --class) its random class, then churn noise (SPEC §9).
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim > 0:
        idx = rnd.randint(net.label_dim, size=[len(seeds)]) if class_idx is None else torch.full([len(seeds)], class_idx)
        labels = torch.eye(net.label_dim, device=device)[idx.to(device)]
    with torch.no_grad():
        latents = edm_sampler(net, noise, labels, gnet, randn_like=rnd.randn_like, **sampler_kwargs)
        images = encoder.decode(latents)
    return dnnlib.EasyDict(images=images, seeds=seeds, labels=labels)

# ----------------------------------------------------------------------------
# Command-line options shared with calculate_metrics.py gen.


def sampler_options(fn: Callable) -> Callable:
    """Add --preset --net --gnet --guidance and the sampler options (EDM2's names) to a click command;
    pass the resulting keyword arguments to resolve_sampler_options()."""
    options = [
        click.option('--preset', metavar='NAME', type=str, default=None,
                     help='Named net/gnet/guidance, e.g. edm2-img512-s-autog-fid, or demo (newest snapshot in runs/demo).'),
        click.option('--net', metavar='PKL|URL|DIR', type=str, default=None, help='Network pickle, or a run folder (its newest snapshot).'),
        click.option('--gnet', metavar='PKL|URL|DIR', type=str, default=None, help='Guiding network: unconditional (CFG) or weaker (autoguidance).'),
        click.option('--guidance', metavar='FLOAT', type=float, default=None, help='Guidance strength w; 1 = none  [default: preset, else 1]'),
        click.option('--steps', 'num_steps', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True, help='Number of sampling steps.'),
        click.option('--sigma_min', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True, help='Lowest noise level.'),
        click.option('--sigma_max', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80.0, show_default=True, help='Highest noise level.'),
        click.option('--rho', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True, help='Time step exponent.'),
        click.option('--S_churn', 'S_churn', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0, show_default=True, help='Stochasticity strength.'),
        click.option('--S_min', 'S_min', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0, show_default=True, help='Lowest noise level with churn.'),
        click.option('--S_max', 'S_max', metavar='FLOAT', type=click.FloatRange(min=0), default=float('inf'), show_default=True, help='Highest noise level with churn.'),
        click.option('--S_noise', 'S_noise', metavar='FLOAT', type=float, default=1.0, show_default=True, help='Churn noise inflation.'),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def resolve_sampler_options(preset: str | None, net: str | None, gnet: str | None, guidance: float | None,
                            **sampler_kwargs: Any) -> dnnlib.EasyDict:
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
    if guidance != 1 and gnet is None:
        raise GenerationError(f'--guidance={guidance} needs a guiding network: give --gnet=PKL.')
    return dnnlib.EasyDict(net=net, gnet=gnet, sampler_kwargs=dnnlib.EasyDict(guidance=guidance, **sampler_kwargs))

# ----------------------------------------------------------------------------
# Output files.


def _save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(f, format='PNG')


def _gather_to_rank0(images: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    if dist.get_world_size() == 1:
        return images
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    torch.distributed.gather_object(images, parts, dst=0)
    return {seed: image for part in parts or [] for seed, image in part.items()}


@click.command()
@sampler_options
@click.option('--outdir', metavar='DIR', type=str, default=None, help='Write {seed:06d}.png images here.')
@click.option('--subdirs', is_flag=True, help='Put images in subfolders of 1000 seeds ({seed//1000*1000:06d}/).')
@click.option('--seeds', metavar='LIST', type=str, default='0-63', show_default=True, help='Seeds, e.g. 0-49999 or 1,2,5-10.')
@click.option('--class', 'class_idx', metavar='INT', type=int, default=None, help='Class label  [default: random per seed]')
@click.option('--batch', 'max_batch_size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True, help='Images per batch and rank.')
@click.option('--grid', metavar='PNG', type=str, default=None, help='Also write all images as one PNG grid.')
@click.option('--npz', metavar='NPZ', type=str, default=None, help='Also write all images to one .npz (uint8 NHWC under arr_0).')
@click.option('--device', metavar='DEVICE', type=str, default=None, help='Torch device, e.g. cpu or cuda:1  [default: cuda if available]')
def main(outdir: str | None, subdirs: bool, seeds: str, class_idx: int | None, max_batch_size: int,
         grid: str | None, npz: str | None, device: str | None, **opts: Any) -> None:
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
        c = resolve_sampler_options(**opts)
        dist.print0(f'Generating {len(seed_list)} images on {dist.get_world_size()} rank(s) ...')
        collected = {}
        for batch in generate_images(c.net, gnet=c.gnet, seeds=seed_list, class_idx=class_idx, max_batch_size=max_batch_size,
                                     device=torch_device, verbose=True, **c.sampler_kwargs):
            images = batch.images.permute(0, 2, 3, 1).cpu().numpy()
            for seed, image in zip(batch.seeds, images):
                if outdir is not None:
                    _save_png(image, os.path.join(outdir, f'{seed // 1000 * 1000:06d}' if subdirs else '', f'{seed:06d}.png'))
                if grid is not None or npz is not None:
                    collected[seed] = image
        collected = _gather_to_rank0(collected)
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
