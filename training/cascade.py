"""Training and sampling text-conditioned and super-resolution stages (SPEC §8).

`TextEDM2Loss` is EDM2's loss (SPEC §3) with caption dropout and, for super-resolution nets, a
conditioning image derived from the training image: box-downsampled, randomly Gaussian-blurred
(Diff-DALLE) and noise-augmented with its level fed to the net (Imagen). `sample_stage` runs one stage
with edm_sampler, using the empty caption as the unconditional net for classifier-free guidance.
"""

import functools
import math
from typing import Any, Callable

import torch

from training.sampling import edm_sampler
from training.training_loop import EDM2Loss

# ----------------------------------------------------------------------------
# Degrading images into super-resolution conditioning.


def downsample(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Box-filter (area) downsampling to resolution x resolution."""
    return torch.nn.functional.adaptive_avg_pool2d(images, resolution)


def gaussian_blur(images: torch.Tensor, blur_sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur with std `blur_sigma` [N] pixels (0 = none), reflect padding."""
    n, c, h, w = images.shape
    radius = max(int(math.ceil(3 * float(blur_sigma.max()))), 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / blur_sigma.clamp(min=1e-3).unsqueeze(1)) ** 2)  # [N, K]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*C, K]
    x = torch.nn.functional.pad(images.reshape(1, n * c, h, w), [radius] * 4, mode='reflect')
    x = torch.nn.functional.conv2d(x, kernel[:, None, None, :].to(x.dtype), groups=n * c)
    x = torch.nn.functional.conv2d(x, kernel[:, None, :, None].to(x.dtype), groups=n * c)
    return x.reshape(n, c, h, w)


def _unwrap(net: Any) -> Any:
    return getattr(net, 'module', net)  # DistributedDataParallel holds the net as .module


# ----------------------------------------------------------------------------
# Loss.


class TextEDM2Loss(EDM2Loss):
    """EDM2Loss plus caption dropout and, when the net has `lowres`, degraded low-resolution conditioning.

    caption_dropout: probability of replacing a caption by '' (the unconditional prediction, for CFG).
    blur_prob, blur_sigma: probability and range (low-res pixels) of a random Gaussian blur.
    aug_max: the noise-augmentation std of the low-res image is drawn uniformly from [0, aug_max].
    """

    def __init__(
        self,
        P_mean: float = -0.4,
        P_std: float = 1.0,
        sigma_data: float = 0.5,
        caption_dropout: float = 0.1,
        blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.4, 0.8),
        aug_max: float = 0.2,
    ):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        self.caption_dropout = caption_dropout
        self.blur_prob = blur_prob
        self.blur_sigma = tuple(blur_sigma)
        self.aug_max = aug_max

    def drop_captions(self, captions: list[str] | Any) -> list[str] | Any:
        """Each caption becomes '' with probability caption_dropout; non-caption labels pass unchanged."""
        if not isinstance(captions, (list, tuple)) or self.caption_dropout == 0:
            return captions
        keep = torch.rand(len(captions)) >= self.caption_dropout
        return [caption if k else '' for caption, k in zip(captions, keep.tolist())]

    def degrade(self, images: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(low-res conditioning, its noise-augmentation std [N]) from training images."""
        n = images.shape[0]
        lowres = downsample(images, resolution)
        lo, hi = self.blur_sigma
        blur = torch.rand(n, device=images.device) * (hi - lo) + lo
        blur = blur * (torch.rand(n, device=images.device) < self.blur_prob)
        if self.blur_prob > 0:
            lowres = gaussian_blur(lowres, blur)
        aug_sigma = torch.rand(n, device=images.device) * self.aug_max
        return lowres + torch.randn_like(lowres) * aug_sigma.reshape(-1, 1, 1, 1), aug_sigma

    def __call__(self, net, images, labels=None):
        kwargs = {}
        lowres = getattr(_unwrap(net), 'lowres', None)
        if lowres:
            kwargs['lowres'], kwargs['aug_sigma'] = self.degrade(images, lowres)
        return super().__call__(functools.partial(net, **kwargs), images, self.drop_captions(labels))


# ----------------------------------------------------------------------------
# Sampling one stage.


def condition_on(net: Callable, captions: list[str] | None = None, **kwargs: Any) -> Callable:
    """net(x, sigma, labels) with captions and low-res kwargs fixed, for edm_sampler's net or gnet."""
    return lambda x, sigma, labels=None: net(x, sigma, captions, **kwargs)


def sample_stage(
    net: torch.nn.Module,
    noise: torch.Tensor,
    captions: list[str] | None = None,
    lowres: torch.Tensor | None = None,
    aug_sigma: float = 0.0,
    guidance: float = 1.0,
    gnet: torch.nn.Module | None = None,
    **sampler_kwargs: Any,
) -> torch.Tensor:
    """One cascade stage: text (and low-res) conditioned sampling, guided by gnet or else the empty caption."""
    kwargs = dict(lowres=lowres, aug_sigma=aug_sigma) if getattr(net, 'lowres', None) else {}
    if kwargs and aug_sigma > 0:  # Sampling-time augmentation, as in training (Imagen §2.4); per-seed noise.
        kwargs['lowres'] = lowres + aug_sigma * sampler_kwargs.get('randn_like', torch.randn_like)(lowres)
    n = noise.shape[0]
    captions = [''] * n if captions is None else list(captions)
    guide = None
    if guidance != 1:
        guide = condition_on(gnet, captions, **kwargs) if gnet is not None else condition_on(net, [''] * n, **kwargs)
    return edm_sampler(condition_on(net, captions, **kwargs), noise, None, guide, guidance=guidance, **sampler_kwargs)


def dataset_conditioning(
    net: torch.nn.Module, dataset: Any, encoder: Any, n: int, device: torch.device
) -> dict[str, Any]:
    """sample_stage kwargs for a training sample grid: the first n captions (and low-res images) of the data."""
    idx = [i % len(dataset) for i in range(n)]
    cond: dict[str, Any] = dict(captions=[dataset.get_caption(i) for i in idx])
    if getattr(net, 'lowres', None):
        images = torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).to(device)
        cond['lowres'] = downsample(encoder.encode_latents(images), net.lowres)
    return cond
