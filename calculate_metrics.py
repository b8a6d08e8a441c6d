"""FID and FD-DINOv2: reference statistics of a dataset (ref), metrics of an image folder or ZIP
(calc), and metrics of a network's images generated on the fly (gen). Runs under torchrun.

Detector weights are fetched once into dnnlib's download cache. Offline, put them in a folder and
name it with --detectors or the EDM2X_DETECTORS environment variable:
  pt_inception-2015-12-05-6726825d.pth  (FID; or NVIDIA's TorchScript inception-2015-12-05.pkl)
  dinov2_vitl14_pretrain.pth            (FD-DINOv2)
"""

import json
from typing import Any

import click
import torch

from torch_utils import distributed as dist
from training.click_types import click_options
from training.detectors import DETECTORS_ENV
from training.faults import first_error
from training.generation import generate_images, load_network, network_kind
from training.metrics import (
    MetricsError,
    Stats,
    calculate_metrics_from_stats,
    calculate_stats_for_iterable,
    load_stats,
    parse_metrics,
    require_metrics,
    save_stats,
)
from training.metrics_io import (
    RUN_DIR_WITHOUT_LOGGER,
    dataset_batches,
    default_ref,
    log_results,
    open_images,
    results_tracker,
)
from training.output_paths import check_output_file
from training.sampler_options import SAMPLER_OPTIONS, SWEEP_NAMES, read_prompts, sweep_settings
from training.shards import ShardDataset
from training.snapshots import TRUST_HELP, trust_pickles
from training.tracking import LOGGERS
from training.user_errors import USER_ERRORS, one_line, plain_warnings


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call fn, turning user-facing errors into one-line click errors."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        raise click.ClickException(one_line(err)) from None


def _device(device: str | None) -> torch.device:
    try:
        return dist.device_from_name(device)
    except ValueError as err:
        raise click.ClickException(f'--device={device}: {err}') from None


def _check_metrics(metrics: str) -> list[str]:
    try:
        return parse_metrics(metrics)
    except MetricsError as err:
        raise click.ClickException(f'--metrics={metrics}: {err}') from None


_sampler_options = click_options(SAMPLER_OPTIONS, as_text=SWEEP_NAMES)


def _common_options(fn: Any) -> Any:
    options = [
        click.option(
            '--metrics',
            metavar='LIST',
            type=str,
            default='fid,fd_dinov2',
            show_default=True,
            help='Comma-separated metrics: fid, fd_dinov2.',
        ),
        click.option(
            '--batch',
            metavar='INT',
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help='Images per batch and rank.',
        ),
        click.option(
            '--detectors',
            metavar='PATH[,PATH]',
            type=str,
            default=None,
            help=f'Detector weight files, folders or URLs  [default: ${DETECTORS_ENV}, else download]',
        ),
        click.option(
            '--device',
            metavar='DEVICE',
            type=str,
            default=None,
            help='Torch device, e.g. cpu or cuda:1  [default: cuda if available]',
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
def cli() -> None:
    """Calculate FID and FD-DINOv2 the EDM2 way (Inception-v3 pool3 as in Heusel et al. 2017; DINOv2 ViT-L/14 as in Stein et al. 2023).

    Examples:

    \b
    # Reference statistics of a dataset
    python calculate_metrics.py ref --data=datasets/img512.zip --dest=refs/img512.pkl

    \b
    # Metrics of 50k generated PNGs against NVIDIA's published reference, 8 GPUs
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py calc --images=out \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl

    \b
    # Generate on the fly from a preset and evaluate (nothing written)
    torchrun --standalone --nproc_per_node=8 calculate_metrics.py gen --preset=edm2-img512-s-autog-fid

    \b
    # With --num under torchrun, '--' keeps torchrun from taking it for its --numa-binding
    torchrun --standalone --nproc_per_node=8 -- calculate_metrics.py gen --preset=edm2-img512-s-autog-fid --num=10000

    \b
    # Offline: detector weights placed by hand in ~/detectors
    EDM2X_DETECTORS=~/detectors python calculate_metrics.py calc --images=out --ref=refs/img512.pkl

    Detector weights are downloaded once into dnnlib's cache. Offline, put these files in a folder
    and name it with --detectors or $EDM2X_DETECTORS: pt_inception-2015-12-05-6726825d.pth (FID;
    NVIDIA's TorchScript inception-2015-12-05.pkl is used instead when present) and
    dinov2_vitl14_pretrain.pth (FD-DINOv2).
    """


@cli.command()
@click.option('--data', metavar='PATH', type=str, required=True, help='Dataset folder or ZIP of images, or tar shards.')
@click.option('--dest', metavar='PKL|NPZ', type=str, required=True, help='Where to write the statistics.')
@_common_options
@click.option(
    '--workers',
    metavar='INT',
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help='Data loader processes per rank.',
)
@click.option(
    '--resolution',
    metavar='INT',
    type=click.IntRange(min=1),
    default=None,
    help='Tar shards only: resize and centre-crop images to this size as they stream (as dataset_tool.py convert).',
)
@click.option('--upscale', is_flag=True, help='With --resolution: upscale smaller images instead of stopping.')
def ref(
    data: str,
    dest: str,
    metrics: str,
    batch: int,
    detectors: str | None,
    device: str | None,
    workers: int,
    resolution: int | None,
    upscale: bool,
) -> None:
    """Reference statistics of every image in a dataset.

    \b
    python calculate_metrics.py ref --data=datasets/img64.zip --dest=refs/img64.pkl --metrics=fid
    python calculate_metrics.py ref --data='shards/{000000..000099}.tar' --resolution=256 --dest=refs/mine.pkl
    """
    dist.init()
    metric_list, torch_device = _check_metrics(metrics), _device(device)
    if upscale and resolution is None:
        raise click.ClickException('--upscale needs --resolution, the size to upscale to.')
    _run(check_output_file, '--dest', dest, ('.pkl', '.npz'), [('--data', data)])
    dataset = _run(open_images, data, allow_shards=True, resolution=resolution, upscale=upscale)
    streaming = isinstance(dataset, ShardDataset)
    size = f'the images of {len(dataset.shards)} shards' if streaming else f'{len(dataset)} images'
    dist.print0(f'Embedding {size} of {data} for {",".join(metric_list)} ...')
    stats = _run(
        calculate_stats_for_iterable,
        dataset_batches(dataset, batch, workers),
        metric_list,
        detector_source=detectors,
        device=torch_device,
        num_images=None if streaming else len(dataset),
    )
    if dist.is_main():
        _run(save_stats, stats, dest)
        print(f'Saved {dest}')
    dist.finish()


def _load_ref(ref_path: str, metric_list: list[str]) -> Stats | None:
    """Rank 0 reads and checks the reference before any embedding, so a bad one fails fast: with one error line
    from rank 0, while the other ranks leave quietly (instead of failing at the next collective)."""
    ref_stats, error = None, None
    if dist.is_main():
        try:
            ref_stats = _run(load_stats, ref_path)
            _run(require_metrics, ref_stats, metric_list, ref_path)
        except click.ClickException as e:
            error = e.message
    error = first_error(error)
    if error is not None and dist.is_main():
        raise click.ClickException(error)
    if error is not None:
        raise SystemExit(1)
    return ref_stats


def _report(stats: Stats, ref_stats: Stats | None, ref_path: str, metric_list: list[str]) -> None:
    if dist.is_main():
        results = _run(calculate_metrics_from_stats, stats, ref_stats, metric_list, ref_name=ref_path)
        for metric, value in results.items():
            print(f'{metric} {value:g}')


@cli.command()
@click.option('--images', metavar='PATH', type=str, required=True, help='Folder or ZIP of images to evaluate.')
@click.option('--ref', 'ref_path', metavar='PKL|NPZ|URL', type=str, required=True, help='Reference statistics.')
@click.option(
    '--num',
    metavar='INT',
    type=click.IntRange(min=2),
    default=50000,
    show_default=True,
    help='Number of images; more are subsampled, fewer is an error.',
)
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Seed of the subsampling.')
@_common_options
@click.option(
    '--workers',
    metavar='INT',
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help='Data loader processes per rank.',
)
def calc(
    images: str,
    ref_path: str,
    num: int,
    seed: int,
    metrics: str,
    batch: int,
    detectors: str | None,
    device: str | None,
    workers: int,
) -> None:
    """Metrics of a folder or ZIP of images against reference statistics.

    \b
    python calculate_metrics.py calc --images=out --ref=refs/img64.pkl --num=10000 --metrics=fid
    """
    dist.init()
    metric_list, torch_device = _check_metrics(metrics), _device(device)
    ref_stats = _load_ref(ref_path, metric_list)
    dataset = _run(open_images, images, num, seed)
    dist.print0(f'Embedding {len(dataset)} images of {images} for {",".join(metric_list)} ...')
    stats = _run(
        calculate_stats_for_iterable,
        dataset_batches(dataset, batch, workers),
        metric_list,
        detector_source=detectors,
        device=torch_device,
        num_images=len(dataset),
    )
    _report(stats, ref_stats, ref_path, metric_list)
    dist.finish()


@cli.command()
@_sampler_options
@click.option('--trust-pickles', is_flag=True, callback=trust_pickles, expose_value=False, help=TRUST_HELP)
@click.option(
    '--ref',
    'ref_path',
    metavar='PKL|NPZ|URL',
    type=str,
    default=None,
    help="Reference statistics  [default: the preset's dataset reference]",
)
@click.option(
    '--num',
    metavar='INT',
    type=click.IntRange(min=2),
    default=50000,
    show_default=True,
    help='Number of images to generate.',
)
@click.option(
    '--seed',
    metavar='INT',
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help='First seed; images use seeds seed .. seed+num-1.',
)
@click.option(
    '--class', 'class_idx', metavar='INT', type=int, default=None, help='Class label  [default: random per seed]'
)
@click.option(
    '--prompts',
    'prompts_file',
    metavar='FILE',
    type=str,
    default=None,
    help='Prompts of a text-to-image net, one per line (cycled over seeds).',
)
@click.option(
    '--precision',
    type=click.Choice(['fp32', 'fp16', 'bf16']),
    default=None,
    help='Compute precision  [default: as pickled]',
)
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the networks (pays for many images).')
@_common_options
@click.option(
    '--logger',
    'loggers',
    metavar='|'.join(LOGGERS),
    type=click.Choice(LOGGERS),
    multiple=True,
    help='Log the results to the training run in TensorBoard or W&B (repeatable)  [default: none]',
)
@click.option(
    '--run-dir', metavar='DIR', type=str, default=None, help="Training run to log to  [default: --net's folder]"
)
def gen(
    ref_path: str | None,
    num: int,
    seed: int,
    class_idx: int | None,
    prompts_file: str | None,
    metrics: str,
    batch: int,
    detectors: str | None,
    device: str | None,
    loggers: tuple,
    run_dir: str | None,
    precision: str | None,
    compile_net: bool,
    **opts: Any,
) -> None:
    """Metrics of images generated on the fly (nothing is written). Comma lists of --guidance,
    --guidance-interval (LO,HI pairs), --solver and --steps evaluate every combination, one JSON line each.

    \b
    python calculate_metrics.py gen --net=run/network-snapshot-0008388-0.100.pkl --ref=refs/img64.pkl --num=10000
    python calculate_metrics.py gen --preset=edm2-img512-s-guid-fid --guidance=1.4,2 --guidance-interval=0.3,5
    """
    dist.init(cpu=device == 'cpu')
    if run_dir is not None and not loggers:
        raise click.ClickException(RUN_DIR_WITHOUT_LOGGER)
    metric_list, torch_device = _check_metrics(metrics), _device(device)
    ref_path = ref_path or default_ref(opts['preset'])
    if ref_path is None:
        raise click.ClickException('No reference statistics: give --ref=PKL (make one with calculate_metrics.py ref).')
    ref_stats = _load_ref(ref_path, metric_list)
    settings = _run(sweep_settings, opts)
    prompts = _run(read_prompts, (), prompts_file) if prompts_file is not None else None
    c = settings[0][1]  # The net, its guide and decoder are the same in every combination.
    tracker = _run(results_tracker, c.net, run_dir, loggers if dist.is_main() else ())
    rows = []
    with dist.rank0_first():  # one download into the cache, not one per rank
        net, encoder = _run(load_network, c.net, torch_device, verbose=True, vae=c.vae)
        guided = any(setting.sampler_kwargs.guidance != 1 for _label, setting in settings)
        gnet = _run(load_network, c.gnet, torch_device, verbose=True)[0] if c.gnet and guided else None
    if network_kind(net) == 'text' and prompts is None:
        raise click.ClickException('The network is text-to-image: give --prompts=FILE, one caption per line.')
    for label, setting in settings:
        dist.print0(
            f'Generating and embedding {num} images (seeds {seed}-{seed + num - 1}) for {",".join(metric_list)} '
            f'{label}...'
        )
        batches = (
            b.images
            for b in generate_images(
                net,
                encoder,
                gnet if setting.sampler_kwargs.guidance != 1 else None,
                seeds=range(seed, seed + num),
                class_idx=class_idx,
                max_batch_size=batch,
                device=torch_device,
                prompts=prompts,
                precision=precision,
                compile=compile_net,
                **setting.sampler_kwargs,
            )
        )
        stats = _run(
            calculate_stats_for_iterable,
            batches,
            metric_list,
            detector_source=detectors,
            device=torch_device,
            num_images=num,
        )
        if not dist.is_main():
            continue
        results = _run(calculate_metrics_from_stats, stats, ref_stats, metric_list, ref_name=ref_path)
        swept = {name: setting.sampler_kwargs.get(name) for name in SWEEP_NAMES}
        sampler = setting.sampler_kwargs.get('sampler', 'edm')
        if sampler != 'edm':  # DDPM and DDIM run no EDM solver.
            swept['solver'] = None
        rows.append(dict(setting=label, sampler=sampler, **swept, **results))
        if len(settings) == 1:
            print('\n'.join(f'{metric} {value:g}' for metric, value in results.items()))
        else:
            print(json.dumps(rows[-1]), flush=True)
    log_results(tracker, c.net, rows)
    dist.finish()


if __name__ == '__main__':
    plain_warnings()
    cli()
