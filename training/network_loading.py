"""Loading networks to sample: edm2x and EDM2 network pickles, run folders (their newest snapshot), URLs, and DiT's
released checkpoints (training/dit_release.py)."""

import os
from typing import Any

import torch

import dnnlib
from torch_utils import distributed as dist
from training.dit_release import is_dit_checkpoint, load_dit_network
from training.snapshots import NetworkPickleError, load_network_pickle, parse_snapshot_name


def resolve_network_path(path: str) -> str:
    """A run folder resolves to its newest snapshot: highest kimg, then highest EMA std."""
    if '://' in path or not os.path.isdir(path):
        return path
    found = []
    for name in os.listdir(path):
        try:
            found.append((*parse_snapshot_name(name)[1:], name))
        except ValueError:
            continue
    if not found:
        raise NetworkPickleError(f'{path} holds no network snapshot (PREFIX-KIMG-STD.pkl); train one there first.')
    return os.path.join(path, max(found)[-1])


def load_network(
    path_or_url: str, device: torch.device, verbose: bool = False, vae: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """(net, encoder) of an edm2x or EDM2 network pickle, or of a DiT checkpoint (a state dict saved by torch.save,
    or a diffusers folder), frozen in eval mode on `device`. `vae` (a hub id or folder) replaces the VAE that a
    latent net's encoder decodes with. A URL is downloaded into dnnlib's cache first."""
    path = path_or_url if is_dit_checkpoint(path_or_url) else resolve_network_path(path_or_url)
    if verbose:
        dist.print0(f'Loading network from {path} ...')
    if '://' in path:  # Offline, a DownloadError names the cache path to place the file at.
        path = dnnlib.util.open_url(path, return_filename=True, verbose=verbose)
    if is_dit_checkpoint(path):
        net, encoder = load_dit_network(path)
    else:
        data = load_network_pickle(path)
        net, encoder = data['ema'], data.get('encoder')
    if not isinstance(net, torch.nn.Module) or any(
        not hasattr(net, k) for k in ('img_resolution', 'img_channels', 'label_dim')
    ):
        raise NetworkPickleError(f"{path} holds no network: its 'ema' entry is a {type(net).__name__}.")
    if vae is not None:
        if not hasattr(encoder, 'vae_name'):
            raise NetworkPickleError(f'--vae={vae} applies to latent networks, but {path} makes pixels.')
        encoder.vae_name = vae
    return net.eval().requires_grad_(False).to(device), encoder
