"""Feature statistics and Fréchet distances for FID (Heusel et al. 2017) and FD-DINOv2 (Stein et al. 2023).

Statistics are {metric: {'mu': float64 [D], 'sigma': float64 [D, D]}}, EDM2's reference-file layout.
Under torchrun every rank embeds its own share of the images and the sums (count, Σx, Σxxᵀ, float64)
are all-reduced, so the result equals a single-process run over the same images.

    stats = calculate_stats_for_iterable(batches, metrics=['fid'])   # batches: uint8 NCHW tensors
    ref = load_stats('https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl')
    print(calculate_metrics_from_stats(stats, ref))                   # {'fid': 2.56...}
"""

import io
import os
import pickle
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

import dnnlib
from torch_utils import distributed as dist
from torch_utils.host_memory import keep_freed_memory
from training.detectors import METRICS, fetch_detector_files, load_detector

Stats = dict[str, dict[str, np.ndarray]]

# A covariance eigenvalue below -(MAX_NEGATIVE_EIGENVALUE x the largest one + NEGATIVE_EIGENVALUE_FLOOR)
# is not round-off: the matrix is not a covariance (corrupt statistics). Smaller negative ones are noise
# of a near-singular matrix; the floor covers near-constant features, whose covariance is all round-off.
MAX_NEGATIVE_EIGENVALUE = 1e-6
NEGATIVE_EIGENVALUE_FLOOR = 1e-10


class MetricsError(Exception):
    """A user-facing problem with images or statistics (one-line message)."""


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """'fid,fd_dinov2' -> ['fid', 'fd_dinov2'], checked and without repeats."""
    names = [m.strip() for m in metrics.split(',')] if isinstance(metrics, str) else list(metrics)
    names = list(dict.fromkeys(m for m in names if m))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise MetricsError(f'Unknown metric "{",".join(unknown)}"; choose from {",".join(METRICS)}.')
    return names


def load_detectors(
    metrics: Iterable[str], detectors: str | None = None, device: torch.device | str | None = None, verbose: bool = True
) -> dict[str, nn.Module]:
    """Detector modules by metric; rank 0 fetches the weights first so ranks never download twice."""
    device = device if device is not None else dist.device()
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        sources = fetch_detector_files(list(metrics), detectors, verbose=verbose and dist.is_main())
        modules = {m: load_detector(m, src, device, verbose=verbose and dist.is_main()) for m, src in sources.items()}
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    return modules


class FeatureStats:
    """Running count, Σx and Σxxᵀ of feature vectors in float64, summable across ranks."""

    def __init__(self, dim: int, device: torch.device | str) -> None:
        self.count = torch.zeros([], dtype=torch.float64, device=device)
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)

    def append(self, features: torch.Tensor) -> None:
        x = features.to(torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def all_reduce(self) -> None:
        if dist.get_world_size() > 1:
            for t in (self.count, self.sum, self.sum_outer):
                torch.distributed.all_reduce(t)

    def mu_sigma(self) -> dict[str, np.ndarray]:
        """Mean and unbiased covariance (as numpy.cov) of everything appended."""
        n = int(self.count.item())
        if n < 2:
            raise MetricsError(f'Statistics need at least 2 images, got {n}.')
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return {'mu': mu.cpu().numpy(), 'sigma': sigma.cpu().numpy()}


def check_images(images: torch.Tensor) -> None:
    """Raise MetricsError unless `images` is a uint8 [N, 3, H, W] batch."""
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise MetricsError(
            f'Expected uint8 image batches of shape [N, 3, H, W], got {images.dtype} {list(images.shape)}.'
        )
    if images.shape[1] != 3:
        raise MetricsError(
            f'The detectors need RGB images with 3 channels, got {images.shape[1]}; convert the images to RGB first.'
        )


def calculate_stats_for_iterable(
    image_iter: Iterable[torch.Tensor],
    metrics: str | Iterable[str] = METRICS,
    detectors: dict[str, nn.Module] | None = None,
    detector_source: str | None = None,
    device: torch.device | str | None = None,
    num_images: int | None = None,
    verbose: bool = True,
) -> Stats:
    """Feature statistics of uint8 NCHW RGB batches; collective under torchrun (every rank must call it
    with its own share of the images). `detectors` reuses loaded modules (see load_detectors), else they
    are loaded from `detector_source` (files/folders/URLs, as --detectors). `num_images` (all ranks
    together) sizes the progress bar."""
    metrics = parse_metrics(metrics)
    device = torch.device(device if device is not None else dist.device())
    keep_freed_memory(device)  # CPU: Inception runs ~10 % faster (docs/benchmarks.md)
    if detectors is None:
        detectors = load_detectors(metrics, detector_source, device, verbose)
    accum = {m: FeatureStats(detectors[m].feature_dim, device) for m in metrics}
    world = dist.get_world_size()
    with dnnlib.util.progress_bar(
        total=num_images, unit='img', desc='Embedding', disable=not (verbose and dist.is_main())
    ) as bar:
        for images in image_iter:
            check_images(images)
            images = images.to(device)
            with torch.no_grad():
                for m in metrics:
                    accum[m].append(detectors[m](images))
            bar.update(images.shape[0] * world)
    stats = {}
    for m in metrics:
        accum[m].all_reduce()
        stats[m] = accum[m].mu_sigma()
    return stats


def _sqrt_psd(sigma: np.ndarray, which: str) -> np.ndarray:
    """Symmetric square root of a covariance matrix; round-off negative eigenvalues count as zero."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    if w[0] < -(MAX_NEGATIVE_EIGENVALUE * max(w[-1], 0.0) + NEGATIVE_EIGENVALUE_FLOOR):
        raise MetricsError(
            f'The {which} covariance is not positive semi-definite (eigenvalue {w[0]:.3g}, largest '
            f'{w[-1]:.3g}); the statistics are corrupt.'
        )
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# Fréchet distance between two Gaussians, ‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) (Dowson & Landau 1982), in float64.
# Tr((Σ₁Σ₂)^{1/2}) is the sum of singular values of √Σ₁√Σ₂ (the eigenvalues of Σ₁Σ₂ equal those of
# √Σ₁Σ₂√Σ₁ = (√Σ₁√Σ₂)(√Σ₁√Σ₂)ᵀ): real by construction, and accurate for nearly singular covariances,
# where a general matrix square root of the product picks up spurious imaginary parts.
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise MetricsError(
            f'Statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}.'
        )
    trace_root = np.linalg.svd(_sqrt_psd(sigma1, 'first') @ _sqrt_psd(sigma2, 'second'), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def require_metrics(ref: Stats, metrics: Iterable[str], ref_name: str = 'the reference statistics') -> None:
    """Raise MetricsError naming what is missing unless `ref` holds every metric in `metrics`."""
    missing = [m for m in metrics if m not in ref]
    if missing:
        raise MetricsError(
            f'{ref_name} holds no "{",".join(missing)}" statistics (only {",".join(ref) or "none"}); '
            f'compute them with: calculate_metrics.py ref --metrics={",".join(metrics)}'
        )


def calculate_metrics_from_stats(
    stats: Stats, ref: Stats, metrics: Iterable[str] | None = None, ref_name: str = 'the reference statistics'
) -> dict[str, float]:
    """FID / FD-DINOv2 of `stats` against `ref`, for `metrics` (default: all metrics in `stats`)."""
    metrics = parse_metrics(metrics if metrics is not None else list(stats))
    require_metrics(ref, metrics, ref_name)
    return {m: frechet_distance(stats[m]['mu'], stats[m]['sigma'], ref[m]['mu'], ref[m]['sigma']) for m in metrics}


def _stats_from_npz(data: dict[str, np.ndarray], name: str) -> Stats:
    if 'mu' in data and 'sigma' in data:  # single-metric file, as pytorch-fid and ADM write them
        dim_to_metric = {2048: 'fid', 1024: 'fd_dinov2'}
        metric = dim_to_metric.get(data['mu'].shape[-1])
        if metric is None:
            raise MetricsError(
                f'{name}: mu has {data["mu"].shape[-1]} features; expected 2048 (FID) or 1024 (FD-DINOv2).'
            )
        return {metric: {'mu': data['mu'], 'sigma': data['sigma']}}
    return {
        m: {'mu': data[f'{m}_mu'], 'sigma': data[f'{m}_sigma']}
        for m in METRICS
        if f'{m}_mu' in data and f'{m}_sigma' in data
    }


def load_stats(path_or_url: str, verbose: bool = False) -> Stats:
    """Statistics from a .pkl ({metric: {'mu', 'sigma'}}) or .npz (mu/sigma, or {metric}_mu/{metric}_sigma), local or URL."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            raw = f.read()
    except (OSError, ValueError) as err:
        raise MetricsError(f'Cannot read statistics {path_or_url}: {err}') from None
    try:
        if raw[:2] == b'PK':
            with np.load(io.BytesIO(raw)) as npz:
                stats = _stats_from_npz(dict(npz), path_or_url)
        else:
            stats = pickle.loads(raw)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise MetricsError(f'{path_or_url} is not a statistics file ({type(err).__name__}: {err}).') from None
    valid = (
        isinstance(stats, dict)
        and stats
        and all(isinstance(s, dict) and 'mu' in s and 'sigma' in s for s in stats.values())
    )
    if not valid:
        raise MetricsError(f'{path_or_url} does not hold {{metric: {{"mu", "sigma"}}}} statistics.')
    return {
        m: {'mu': np.asarray(s['mu'], np.float64), 'sigma': np.asarray(s['sigma'], np.float64)}
        for m, s in stats.items()
    }


def save_stats(stats: Stats, path: str) -> None:
    """Write statistics atomically: .npz as {metric}_mu / {metric}_sigma arrays, anything else as a pickle."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        if path.endswith('.npz'):
            np.savez(f, **{f'{m}_{k}': v for m, s in stats.items() for k, v in s.items()})
        else:
            pickle.dump(stats, f)
