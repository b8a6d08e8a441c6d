"""The Python API, re-exported as the `edm2x` package: load a network, sample it, rebuild post-hoc EMAs, measure FID.

Every function is a thin layer over what the command-line tools call (network_loading.load_network,
generation.generate_images, phema_reconstruct.reconstruct_phema, metrics.calculate_stats_for_iterable), so a
script and a notebook make the same images for the same seeds and settings.

    >>> import edm2x
    >>> net = edm2x.load('runs/demo', device='cpu')
    >>> images = net.sample(seeds=range(16), solver='heun', num_steps=32)  # uint8 [16, H, W, C]
"""

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import PIL.Image
import torch

from training.generation import GenerationError, generate_images
from training.metrics import calculate_metrics_from_stats, calculate_stats_for_iterable, load_stats
from training.network_loading import load_network
from training.phema_reconstruct import list_snapshots, reconstruct_phema
from training.presets_generate import presets
from training.sampler_options import check_solver_options, override_sampler_settings, resolve_sampler_options
from training.snapshots import parse_snapshot_name

OUTPUTS = ('numpy', 'pil', 'torch')


class Network:
    """A loaded network with its decoder, its guiding network (if any) and its default sampler settings."""

    def __init__(
        self,
        net: torch.nn.Module,
        encoder: Any = None,
        gnet: torch.nn.Module | None = None,
        defaults: dict | None = None,
        device: torch.device | str = 'cpu',
    ) -> None:
        self.net, self.encoder, self.gnet = net, encoder, gnet
        self.defaults = dict(defaults or {})
        self.device = torch.device(device)

    def __repr__(self) -> str:
        n = self.net
        return f'edm2x.Network({type(n).__name__}, {n.img_channels}x{n.img_resolution}x{n.img_resolution}, {n.label_dim} classes)'

    def sample(
        self,
        seeds: Iterable[int] = range(16),
        labels: int | None = None,
        prompts: list[str] | None = None,
        guidance: float | None = None,
        solver: str | None = None,
        num_steps: int | None = None,
        output: str = 'numpy',
        batch_size: int = 32,
        **sampler_kwargs: Any,
    ) -> np.ndarray | list[PIL.Image.Image] | torch.Tensor:
        """One image per seed, as generate_images.py --seeds makes them: uint8 NHWC ('numpy'), PIL images ('pil') or
        uint8 NCHW ('torch'). labels: the class of every image (None: a random class per seed). prompts: a text
        net's captions (image i gets prompts[i % len(prompts)]). guidance, solver, num_steps and sampler_kwargs
        (sampler, schedule, guidance_interval, S_churn, ...) override the preset's or sample()'s defaults."""
        if output not in OUTPUTS:
            raise GenerationError(f'Unknown output {output!r}; choose one of: {", ".join(OUTPUTS)}.')
        named = dict(guidance=guidance, solver=solver, num_steps=num_steps)
        given = {**sampler_kwargs, **{k: v for k, v in named.items() if v is not None}}
        options = override_sampler_settings(self.defaults, given)
        check_solver_options(options, given)  # As generate_images.py: refuses settings the sampler would not read.
        seeds = list(seeds)
        batches = generate_images(
            self.net,
            self.encoder,
            self.gnet,
            seeds=seeds,
            class_idx=labels,
            max_batch_size=batch_size,
            device=self.device,
            prompts=prompts,
            **options,
        )
        by_seed = {seed: image for batch in batches for seed, image in zip(batch.seeds, batch.images.cpu())}
        images = torch.stack([by_seed[seed] for seed in seeds])
        if output == 'torch':
            return images
        array = images.permute(0, 2, 3, 1).numpy()
        if output == 'numpy':
            return array
        return [PIL.Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in array]


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')


def load(
    path_or_preset: str, gnet: str | None = None, device: torch.device | str | None = None, vae: str | None = None
) -> Network:
    """A network from a snapshot (.pkl or .safetensors), a run folder (its newest snapshot), a URL or a preset name
    of generate_images.py --preset (its net, guiding net, guidance and sampler settings). gnet: a guiding network
    (autoguidance or an unconditional net), loaded at once. vae: replaces a latent net's VAE (hub id or folder)."""
    preset = path_or_preset if path_or_preset in presets and not os.path.exists(path_or_preset) else None
    c = resolve_sampler_options(preset, None if preset else path_or_preset, gnet, None, vae)
    device = _device(device)
    net, encoder = load_network(c.net, device, vae=c.vae)
    guide = load_network(c.gnet, device)[0] if c.gnet is not None else None
    return Network(net, encoder, guide, c.sampler_kwargs, device)


def reconstruct(
    snapshots: str | list[str],
    std: float,
    kimg: int | None = None,
    device: torch.device | str | None = None,
    max_error: float = 0.1,
) -> Network:
    """The post-hoc EMA of length `std` (EDM2 §3.2) at `kimg` (default: the newest snapshot's), rebuilt from a run
    folder's snapshots or a list of snapshot paths, as reconstruct_phema.py builds it."""
    paths = list_snapshots(snapshots) if isinstance(snapshots, str) else list(snapshots)
    kimg = kimg if kimg is not None else max(parse_snapshot_name(p)[1] for p in paths)
    (_std, data), *_ = reconstruct_phema(paths, [std], kimg, batch_size=1, max_error=max_error)
    device = _device(device)
    return Network(data['ema'].eval().requires_grad_(False).to(device), data.get('encoder'), device=device)


def fid(
    net: Network,
    ref: str,
    num: int = 50000,
    seed: int = 0,
    metric: str = 'fid',
    detectors: str | None = None,
    batch_size: int = 32,
    **sample_options: Any,
) -> float:
    """FID (or metric='fd_dinov2') of `num` images of `net` (seeds seed ... seed+num-1) against reference statistics
    `ref` (a file of calculate_metrics.py ref, or a URL), as calculate_metrics.py gen computes it. sample_options go
    to Network.sample (labels, guidance, solver, num_steps, ...); detectors: as --detectors."""
    ref_stats = load_stats(ref)
    batches = (
        batch.images
        for batch in generate_images(
            net.net,
            net.encoder,
            net.gnet,
            seeds=range(seed, seed + num),
            class_idx=sample_options.pop('labels', None),
            max_batch_size=batch_size,
            device=net.device,
            prompts=sample_options.pop('prompts', None),
            **{**net.defaults, **sample_options},
        )
    )
    stats = calculate_stats_for_iterable(batches, [metric], detector_source=detectors, device=net.device, verbose=False)
    return calculate_metrics_from_stats(stats, ref_stats, [metric], ref_name=ref)[metric]
