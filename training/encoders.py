"""Encoders between dataset values, network space and uint8 pixels, as EDM2 (arXiv 2312.02696) prepares them.

A dataset stores what `encode_pixels` makes of uint8 pixels (the pixels themselves, or VAE
statistics); training maps those stored values to network space with `encode_latents`; `decode` turns
network output back into uint8 NCHW pixels. Encoders are persistent so that network pickles carry them.

Example:
    >>> encoder = StandardRGBEncoder()
    >>> x = encoder.encode(torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16))   # float32 in [-1, 1]
    >>> encoder.decode(x).flatten()[:3]
    tensor([0, 1, 2], dtype=torch.uint8)
"""

import os
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable

import numpy as np
import torch

import dnnlib
from torch_utils import misc, persistence


@persistence.persistent_class
class Encoder:
    """Common interface: `encode(x) = encode_latents(encode_pixels(x))`."""

    def init(self, device: torch.device | str) -> None:
        """Load whatever the encoder needs onto `device`; nothing for pixel encoders."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels -> network space."""
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels -> the values a dataset stores."""
        raise NotImplementedError(f'{type(self).__name__} does not define encode_pixels')

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Stored dataset values -> network space."""
        raise NotImplementedError(f'{type(self).__name__} does not define encode_latents')

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Network space -> uint8 NCHW pixels."""
        raise NotImplementedError(f'{type(self).__name__} does not define decode')


@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixels as they are: the dataset stores uint8 RGB, the network sees x / 127.5 - 1."""

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        # Adding 128 rather than 127.5 and truncating rounds to the nearest level.
        return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's host (HF_ENDPOINT) takes a connection within `timeout` seconds, its name
    lookup included; assumed behind a proxy, which decides. Without network huggingface_hub would retry for
    half a minute."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()  # the environment's, or the system's settings (macOS, Windows)
    if (proxies.get('https') or proxies.get('all')) and not urllib.request.proxy_bypass(endpoint.hostname or ''):
        return True
    port = endpoint.port or (443 if endpoint.scheme == 'https' else 80)
    answered = []

    def probe() -> None:
        # create_connection's timeout bounds each connect, not the DNS lookup before it (which can hang for
        # long without network): the probe runs here, and a lookup still hanging is left to this daemon thread.
        try:
            socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        except OSError:
            return
        answered.append(True)

    thread = threading.Thread(target=probe, name='hub-probe', daemon=True)
    thread.start()
    thread.join(timeout)  # at once when the probe fails fast (refused, no such host)
    return bool(answered)


def load_vae(vae_name: str, device: torch.device | str = 'cpu') -> torch.nn.Module:
    """diffusers' AutoencoderKL from a local folder (saved with `save_pretrained`) or a Hugging Face hub id,
    cached under `dnnlib.make_cache_dir_path('diffusers')`; offline (HF_HUB_OFFLINE=1, or the hub's host not
    reachable) only the cache is tried. Failure raises `dnnlib.util.DownloadError` with one sentence saying
    what to do."""
    from diffusers import AutoencoderKL  # Slow to import; only latent pipelines need it.

    cache_dir = dnnlib.make_cache_dir_path('diffusers')
    is_local = os.path.isdir(vae_name)
    if not is_local and (vae_name.startswith(('/', '.', '~')) or vae_name.count('/') != 1):
        raise dnnlib.util.DownloadError(
            f'{vae_name}: no such folder; pass a folder saved with save_pretrained or a '
            f'hub id like stabilityai/sd-vae-ft-mse.'
        )
    # The cache first (fast, and enough offline), then the hub unless HF_HUB_OFFLINE forbids it or it is unreachable.
    attempts = [True] if is_local or _truthy_env('HF_HUB_OFFLINE') else [True, False]
    vae = error = None
    for local_files_only in attempts:
        if not local_files_only and not hub_reachable():
            break
        try:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it no longer uses
                warnings.filterwarnings('ignore', 'The `local_dir_use_symlinks` argument is deprecated')
                vae = AutoencoderKL.from_pretrained(
                    vae_name,
                    cache_dir=None if is_local else cache_dir,
                    low_cpu_mem_usage=False,
                    local_files_only=local_files_only,
                )
            break
        except (OSError, ValueError) as e:
            error = e
    if vae is None:
        if is_local:
            raise dnnlib.util.DownloadError(
                f'{vae_name}: not a diffusers AutoencoderKL folder ({type(error).__name__}); '
                f'save one there with AutoencoderKL.save_pretrained.'
            ) from error
        raise dnnlib.util.DownloadError(
            f'Cannot load the VAE {vae_name!r} (no network or not cached): on a connected machine run '
            f'`huggingface-cli download {vae_name} --cache-dir={cache_dir}` and copy that folder here, or pass a '
            f'local folder saved with save_pretrained.'
        ) from error
    return vae.eval().requires_grad_(False).to(device)


@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Stable Diffusion VAE latents (Rombach et al. 2022), normalised as in EDM2. The dataset stores 8 raw channels per pixel of the latent
    grid, the posterior mean and std; training samples z = mean + std·n and normalises it per channel.

    The VAE itself is loaded on `init(device)` (or first use) and never pickled: network pickles keep only
    `vae_name`, a hub id or a local folder saved with `save_pretrained`.
    """

    def __init__(
        self,
        vae_name: str = 'stabilityai/sd-vae-ft-mse',
        raw_mean: list[float] = [5.81, 3.25, 0.12, -2.15],
        raw_std: list[float] = [4.17, 4.62, 3.71, 3.28],
        final_mean: float = 0,
        final_std: float = 0.5,
        batch_size: int = 8,
    ) -> None:
        self.vae_name, self.batch_size = vae_name, int(batch_size)
        self.raw_mean, self.raw_std = np.asarray(raw_mean, np.float32), np.asarray(raw_std, np.float32)
        self.final_mean, self.final_std = np.float32(final_mean), np.float32(final_std)
        self._vae: torch.nn.Module | None = None  # loaded on first use

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _vae=None)  # Weights stay out of network pickles.

    def init(self, device: torch.device | str) -> None:
        self._vae = load_vae(self.vae_name, device) if self._vae is None else self._vae.to(device)

    @property
    def downsampling(self) -> int:
        """Pixels per latent along each side (8 for Stable Diffusion's VAE); the VAE must be loaded."""
        if self._vae is None:
            raise RuntimeError('StabilityVAEEncoder.downsampling: call init(device) first')
        return 2 ** (len(self._vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def _run_batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        self.init(x.device)
        return torch.cat([fn(batch) for batch in x.split(self.batch_size)])

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels -> float32 [N, 2C, H/f, W/f]: posterior mean, then std."""

        def encode(batch: torch.Tensor) -> torch.Tensor:
            # x/255 rather than the VAE's native [-1, 1]: EDM2's raw statistics were measured this way.
            posterior = self._vae.encode(batch.to(torch.float32) / 255).latent_dist
            return torch.cat([posterior.mean, posterior.std], dim=1)

        return self._run_batched(encode, x)

    def _per_channel(self, value: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
        return misc.const_like(ref, value.reshape(1, -1, 1, 1), dtype=torch.float32)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Stored mean and std -> a sample z = mean + std·n, normalised per channel to network space."""
        mean, std = x.float().chunk(2, dim=1)
        z = mean + std * torch.randn_like(mean)
        scale = self._per_channel(self.final_std / self.raw_std, z)
        return (z - self._per_channel(self.raw_mean, z)) * scale + self.final_mean

    def latents_to_vae(self, x: torch.Tensor) -> torch.Tensor:
        """Network space -> the VAE's latent space: the inverse of the normalisation in encode_latents."""
        x = x.float()
        scale = self._per_channel(self.raw_std / self.final_std, x)
        return (x - self.final_mean) * scale + self._per_channel(self.raw_mean, x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Network space -> uint8 NCHW pixels: VAE output clamped to [0, 1], times 255, rounded."""
        images = self._run_batched(lambda batch: self._vae.decode(batch).sample, self.latents_to_vae(x))
        return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8)


@persistence.persistent_class
class DiTVAEEncoder(StabilityVAEEncoder):
    """Stable Diffusion VAE latents as DiT and latent diffusion scale them (Rombach et al. 2022): the VAE reads
    pixels in [-1, 1] and the network sees z·0.18215. The dataset stores the posterior mean and std, as for
    StabilityVAEEncoder; `decode` maps the VAE's [-1, 1] output to uint8 as DiT saves its samples.
    """

    def __init__(self, vae_name: str = 'stabilityai/sd-vae-ft-ema', scale: float = 0.18215, batch_size: int = 8):
        super().__init__(vae_name=vae_name, batch_size=batch_size)
        self.scale = float(scale)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW pixels -> float32 [N, 2C, H/f, W/f]: posterior mean, then std."""

        def encode(batch: torch.Tensor) -> torch.Tensor:
            posterior = self._vae.encode(batch.to(torch.float32) / 127.5 - 1).latent_dist
            return torch.cat([posterior.mean, posterior.std], dim=1)

        return self._run_batched(encode, x)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = x.float().chunk(2, dim=1)
        return (mean + std * torch.randn_like(mean)) * self.scale

    def latents_to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / self.scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        images = self._run_batched(lambda batch: self._vae.decode(batch).sample, self.latents_to_vae(x))
        return ((images + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
