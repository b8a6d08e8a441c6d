"""Loading networks to sample: edm2x and EDM2 network pickles, run folders (their newest snapshot), URLs, and DiT's
released checkpoints (training/dit_release.py)."""

import os
from typing import Any

import torch

import dnnlib
from torch_utils import distributed as dist
from training.dit_release import is_dit_checkpoint, load_dit_network
from training.snapshots import NetworkPickleError, load_network_pickle, parse_snapshot_name


def _snapshots_in(folder: str) -> list[tuple[int, float, str]]:
    found = []
    for name in os.listdir(folder):
        try:
            found.append((*parse_snapshot_name(name)[1:], name))
        except ValueError:
            continue
    return found


def resolve_network_path(path: str) -> str:
    """A run folder resolves to its newest snapshot: highest kimg, then highest EMA std."""
    if '://' in path:
        return path
    if not os.path.exists(path):
        where = '' if os.path.isabs(path) else f' (relative to the current folder {os.getcwd()})'
        raise NetworkPickleError(f'Network not found: {path}{where}.')
    if not os.path.isdir(path):
        return path
    found = _snapshots_in(path)
    if not found:
        raise NetworkPickleError(f'{path} holds no network snapshot (PREFIX-KIMG-STD.pkl); train one there first.')
    return os.path.join(path, max(found)[-1])


def _choice_note(folder: str) -> str:
    """How resolve_network_path chose among a folder's snapshots, for the loading message."""
    found = _snapshots_in(folder)
    if len(found) < 2:
        return ''
    return (
        f' (of {len(found)} snapshots in {folder}: the highest kimg, then the longest EMA std; '
        f'name one file with --net to choose another)'
    )


def load_network(
    path_or_url: str, device: torch.device, verbose: bool = False, vae: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """(net, encoder) of an edm2x or EDM2 network pickle, or of a DiT checkpoint (a state dict saved by torch.save,
    or a diffusers folder), frozen in eval mode on `device`. `vae` (a hub id or folder) replaces the VAE that a
    latent net's encoder decodes with. A URL is downloaded into dnnlib's cache first."""
    path = path_or_url if is_dit_checkpoint(path_or_url) else resolve_network_path(path_or_url)
    if verbose:
        note = _choice_note(path_or_url) if path != path_or_url and os.path.isdir(path_or_url) else ''
        dist.print0(f'Loading network from {path}{note} ...')
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
