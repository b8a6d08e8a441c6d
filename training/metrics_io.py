"""What calculate_metrics.py reads and where its results go: images for the detectors (folders, ZIPs or tar
shards, checked to be RGB pixels), this rank's share of them in batches, EDM2's published reference statistics,
and the training run a result is logged to."""

import os
from typing import Iterator

import numpy as np
import torch

from torch_utils import distributed as dist
from training.dataset import ImageFolderDataset
from training.metrics import METRICS, MetricsError
from training.network_loading import resolve_network_path
from training.shard_files import is_shard_spec
from training.shards import ShardDataset
from training.snapshots import NetworkPickleError, parse_snapshot_name
from training.tracking import Tracker

REF_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/{}.pkl'


def open_images(
    path: str,
    num: int | None = None,
    seed: int = 0,
    allow_shards: bool = False,
    resolution: int | None = None,
    upscale: bool = False,
) -> ImageFolderDataset | ShardDataset:
    """The RGB images of a folder or ZIP; with `num`, exactly `num` of them, subsampled by `seed`. Tar shards
    (with `allow_shards`) stream one pass, each rank and data worker reading its own share; with `resolution`
    resized and centre-cropped as they stream (as dataset_tool.py convert --resolution; `upscale` for smaller
    images, which are an error otherwise)."""
    if allow_shards and is_shard_spec(path):
        # Statistics of every image, or an error.
        dataset = ShardDataset(path, resolution=resolution, upscale=upscale, shuffle=0, loop=False, strict=True)
    elif resolution is not None:
        raise MetricsError(
            f'{path}: --resolution resizes tar shards as they stream; resize a ZIP or folder once with '
            f'dataset_tool.py convert --resolution.'
        )
    else:
        dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise MetricsError(f'{path} holds {len(dataset)} images, fewer than --num={num}; add images or lower --num.')
    image, _label = dataset[0]
    if image.dtype != np.uint8:
        raise MetricsError(f'{path} holds {image.dtype} arrays (latents?), not images; metrics need pixels.')
    if dataset.num_channels != 3:
        raise MetricsError(
            f'{path} holds images with {dataset.num_channels} channel(s); the detectors need RGB '
            f'(3 channels); convert them with dataset_tool.py.'
        )
    return dataset


def dataset_batches(dataset: ImageFolderDataset, batch: int, workers: int) -> Iterator[torch.Tensor]:
    """This rank's share of the dataset (every world-size-th image), as uint8 NCHW batches."""
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        dataset = torch.utils.data.Subset(dataset, range(dist.get_rank(), len(dataset), dist.get_world_size()))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    for images, *_labels in loader:
        yield images


def default_ref(preset: str | None) -> str | None:
    for dataset in ('img512', 'img64'):
        if preset is not None and preset.startswith(f'edm2-{dataset}-'):
            return REF_URL.format(dataset)
    return None


RUN_DIR_WITHOUT_LOGGER = '--run-dir applies with --logger only: it names the training run to log to.'


def results_tracker(net: str | None, run_dir: str | None, loggers: tuple) -> Tracker:
    """The tracker of the run the results belong to: --run-dir, else the folder --net names or lies in."""
    if run_dir is None and loggers:
        if net is None or '://' in net or not os.path.exists(net):
            raise MetricsError('--logger needs --run-dir: the training run whose tracking gets the results.')
        run_dir = net if os.path.isdir(net) else os.path.dirname(net) or '.'
    if loggers and not os.path.isdir(run_dir):
        raise MetricsError(f'--run-dir={run_dir} is not a folder; name the training run to log to.')
    return Tracker(run_dir or '.', loggers)


def log_results(tracker: Tracker, net: str, rows: list[dict]) -> None:
    """Each setting's metrics, at the training time of the evaluated snapshot (0 when its name tells none);
    with one setting also as scalars, so that evaluating every snapshot draws a curve."""
    if not tracker.names:
        return
    try:
        nimg = parse_snapshot_name(resolve_network_path(net))[1] * 1000
    except (ValueError, NetworkPickleError):
        nimg = 0
    scalars = {f'Metrics/{m}': rows[0][m] for m in METRICS if m in rows[0]} if len(rows) == 1 else None
    tracker.results('Metrics', [dict(net=net, **row) for row in rows], nimg, scalars)
