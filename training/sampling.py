"""EDM sampler (Karras et al. 2022, Alg. 2) with classifier-free guidance and autoguidance, and
per-seed random streams, shared by generate_images.py, calculate_metrics.py and the training loop."""

import math
from typing import Callable, Iterable

import torch

# ----------------------------------------------------------------------------
# One torch.Generator per seed (SPEC §9): image i's noise, random class and churn noise all come
# from seeds[i] alone, so an image never depends on the batch it was generated in.


class StackedRandomGenerator:
    def __init__(self, device: torch.device | str, seeds: Iterable[int]) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed)) for seed in seeds]

    def randn(self, size: Iterable[int], **kwargs) -> torch.Tensor:
        size = list(size)
        assert size[0] == len(self.generators)
        return torch.stack(
            [torch.randn(size[1:], generator=gen, device=self.device, **kwargs) for gen in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout)

    def randint(self, high: int, size: Iterable[int], **kwargs) -> torch.Tensor:
        size = list(size)
        assert size[0] == len(self.generators)
        return torch.stack(
            [torch.randint(high, size[1:], generator=gen, device=self.device, **kwargs) for gen in self.generators]
        )


# ----------------------------------------------------------------------------
# Noise levels of EDM Eq. 5: sigma_max^(1/rho) to sigma_min^(1/rho) linearly, to the power rho,
# followed by sigma_N = 0.


def sigma_steps(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


# ----------------------------------------------------------------------------
# EDM stochastic sampler (Alg. 2): Heun's 2nd-order method, Euler on the last step, optional churn.
# `noise` is unit Gaussian; the chain starts at x_0 = sigma_0 * noise. Guidance (Karras et al. 2024):
# D = D_g + w * (D - D_g), the guiding net is only evaluated when w != 1. `correction(x, sigma)`, if
# given, is added to the (guided) denoised estimate at every evaluation, e.g. CLIP guidance (clip_guidance.py).


def edm_sampler(
    net: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    gnet: Callable[..., torch.Tensor] | None = None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guidance: float = 1,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float('inf'),
    S_noise: float = 1,
    dtype: torch.dtype = torch.float32,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    correction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    if guidance != 1 and gnet is None:
        raise ValueError(f'guidance={guidance} needs a guiding network (gnet)')

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d = net(x, sigma, labels).to(dtype)
        if guidance != 1:
            d_g = gnet(x, sigma, labels).to(dtype)
            d = d_g + guidance * (d - d_g)
        return d if correction is None else d + correction(x, sigma).to(dtype)

    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    gamma_churn = min(S_churn / num_steps, math.sqrt(2) - 1)
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat by adding fresh noise.
        gamma = gamma_churn if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step, then Heun's correction unless this step reaches sigma = 0.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
