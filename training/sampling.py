"""The EDM sampler (Karras et al. 2022, arXiv 2206.00364, Algorithm 2) with guidance, and per-seed noise.

Pure functions of their inputs: the network, the unit noise and the settings fix the output. Guidance
follows Karras et al. 2024 (arXiv 2406.02507, Eq. 2): D_w = D_g + w·(D − D_g), where the guiding
net D_g is unconditional (classifier-free guidance) or weaker (autoguidance); w = 1 is no guidance.
Guidance may be limited to an interval of noise levels (Kynkäänniemi et al. 2024); the deterministic
solvers other than Heun and their schedules live in training/solvers.py.
"""

import math
from typing import Callable, Iterable

import torch

from training.solvers import SCHEDULES, SOLVERS, check_solver, sigma_steps

__all__ = ['StackedRandomGenerator', 'edm_sampler', 'guided_denoiser', 'sigma_steps']


class StackedRandomGenerator:
    """One torch.Generator per seed, so that image i's draws depend on seeds[i] alone, never on its batch.

    An image's stream is consumed in a fixed order (EDM2's convention, so images match its own): the
    initial noise, then the random class when none is given, then the churn noise of each step.
    """

    def __init__(self, device: torch.device | str, seeds: Iterable[int]) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def randn(self, size: Iterable[int], **kwargs) -> torch.Tensor:
        """A batch [len(seeds), *size[1:]] of standard normals, one row per generator."""
        row = list(size)[1:]
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randn(row, generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high: int, size: Iterable[int], **kwargs) -> torch.Tensor:
        row = list(size)[1:]
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randint(high, row, generator=g, **kwargs) for g in self.generators])


# D_w = D_g + w·(D − D_g) (Karras et al. 2024, Eq. 2), applied only for σ_lo < σ ≤ σ_hi when an interval is given
# (Kynkäänniemi et al. 2024, arXiv 2404.07724, Eq. 6); outside it D alone, and the guide is not evaluated.
def guided_denoiser(
    net: Callable[..., torch.Tensor],
    labels: torch.Tensor | None = None,
    gnet: Callable[..., torch.Tensor] | None = None,
    guidance: float = 1,
    guidance_interval: tuple[float, float] | None = None,
    correction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """D(x, sigma) for the solvers. `correction(x, sigma)` (e.g. CLIP guidance) is guidance too: it is added
    to the guided estimate, inside the interval only. `sigma` is the level the net is evaluated at."""
    if guidance != 1 and gnet is None:
        raise ValueError(f'guidance={guidance} needs a guiding network (gnet)')
    if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1]:
        raise ValueError(f'guidance interval {guidance_interval} needs 0 <= sigma_lo <= sigma_hi')

    def D(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = net(x, sigma, labels).to(dtype)
        if guidance_interval is not None and not guidance_interval[0] < sigma <= guidance_interval[1]:
            return out
        if guidance != 1:
            guide = gnet(x, sigma, labels).to(dtype)
            out = guide + guidance * (out - guide)
        if correction is not None:
            out = out + correction(x, sigma).to(dtype)
        return out

    return D


# Heun's second-order method on the probability-flow ODE, Euler on the last step, optional churn (EDM Alg. 2);
# or one of training/solvers.py's deterministic solvers on the same (guided) denoiser.
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
    solver: str = 'heun',
    schedule: str = 'karras',
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Denoised samples in network space from unit `noise` (scaled here by σ_max).

    `correction(x, sigma)`, if given, is added to every (guided) denoised estimate, e.g. CLIP guidance.
    The guiding net `gnet` is only evaluated when guidance != 1, and then only inside `guidance_interval`
    (σ_lo, σ_hi] when one is given. `solver` and `schedule` name entries of training/solvers.py.
    """
    check_solver(solver, schedule, num_steps, S_churn)
    D = guided_denoiser(net, labels, gnet, guidance, guidance_interval, correction, dtype)
    sigmas = SCHEDULES[schedule](num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    x = noise.to(dtype) * sigmas[0]
    if solver != 'heun':
        return SOLVERS[solver](D, x, sigmas)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if S_churn > 0 and S_min <= sigma <= S_max:  # Raise the noise level to σ̂ = (1 + γ)σ by adding fresh noise.
            sigma_hat = sigma + gamma_max * sigma
            x = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * randn_like(x)
            sigma = sigma_hat
        slope = (x - D(x, sigma)) / sigma
        x_euler = x + (sigma_next - sigma) * slope
        if i == num_steps - 1:
            x = x_euler
        else:
            slope_next = (x_euler - D(x_euler, sigma_next)) / sigma_next
            x = x + (sigma_next - sigma) * (0.5 * slope + 0.5 * slope_next)
    return x
