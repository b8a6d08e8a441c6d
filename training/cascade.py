"""Training text-conditioned and super-resolution stages of a cascade (Imagen, Saharia et al. 2022).

`TextEDM2Loss` is EDM2's loss (EDM2 Eq. 21) with caption dropout, so that one net also gives the
unconditional prediction for classifier-free guidance (Ho & Salimans 2022), and, for super-resolution
nets, a conditioning image derived from the training image: box-downsampled, randomly Gaussian-blurred
(Diff-DALLE) and noise-augmented with its level fed to the net (Imagen §2.4). Sampling a stage is
training.generation.sample's job.
"""

import math
from typing import Any

import torch

from torch_utils import persistence
from training.loss import P_MEAN, P_STD, EDM2Loss, unwrap

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


# ----------------------------------------------------------------------------
# Loss.


@persistence.persistent_class
class TextEDM2Loss(EDM2Loss):
    """EDM2Loss plus caption dropout and, when the net has `lowres`, degraded low-resolution conditioning.

    caption_dropout: probability of replacing a caption by '' (the unconditional prediction, for CFG).
    blur_prob, blur_sigma: probability and range (low-res pixels) of a random Gaussian blur.
    aug_max: the noise-augmentation std of the low-res image is drawn uniformly from [0, aug_max].
    """

    def __init__(
        self,
        P_mean: float = P_MEAN,
        P_std: float = P_STD,
        sigma_data: float | None = None,
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

    def __call__(self, net, images: torch.Tensor, labels: Any = None) -> torch.Tensor:
        kwargs = {}
        lowres = getattr(unwrap(net), 'lowres', None)
        if lowres:
            kwargs['lowres'], kwargs['aug_sigma'] = self.degrade(images, lowres)
        return super().__call__(net, images, self.drop_captions(labels), **kwargs)

    def grid_conditioning(
        self, net: Any, dataset: Any, encoder: Any, num: int, device: torch.device
    ) -> dict[str, Any] | None:
        """The first `num` captions of the data (and their low-res images for a super-resolution net)."""
        idx = [i % len(dataset) for i in range(num)]
        cond: dict[str, Any] = dict(captions=[dataset.get_caption(i) for i in idx])
        if getattr(net, 'lowres', None):
            images = torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).to(device)
            cond['lowres'] = downsample(encoder.encode_latents(images), net.lowres)
        return cond
