"""Encoders between dataset values, network space and uint8 pixels (SPEC §6).

A dataset stores what `encode_pixels` makes of uint8 pixels (the pixels themselves, or VAE
statistics); training maps those stored values to network space with `encode_latents`; `decode` turns
network output back into uint8 NCHW pixels. Encoders are persistent so that network pickles carry them.

Example:
    >>> encoder = StandardRGBEncoder()
    >>> x = encoder.encode(torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16))   # float32 in [-1, 1]
    >>> encoder.decode(x).flatten()[:3]
    tensor([0, 1, 2], dtype=torch.uint8)
"""

import torch

from torch_utils import persistence


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
        raise NotImplementedError

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Stored dataset values -> network space."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Network space -> uint8 NCHW pixels."""
        raise NotImplementedError


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
