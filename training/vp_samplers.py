"""Samplers for discrete-time VP diffusion: DDPM ancestral sampling and DDIM.

Pure functions with one shape (as k-diffusion's): a model callable model(x_t, t) -> output, where t holds
each sample's original timestep index, the initial noise x_T ~ N(0, I), a `VPDiffusion` (respaced or not),
and `randn_like` for the fresh noise of each step. Passing a per-seed generator's `randn_like` (edm2x's
StackedRandomGenerator) makes each image depend only on its seed, never on its batch. Guidance is the
model callable's business; `guided_model` builds classifier-free guidance from two callables, and
`denoiser_as_eps_model` lets a continuous-time EDM denoiser D(x; σ) run these samplers.

We step ourselves rather than through diffusers' DDPMScheduler / DDIMScheduler (whose single steps the tests
match): they hold the schedule in float32, draw step noise from torch generators rather than a per-seed
randn_like, and their timestep spacings ('leading', 'linspace', 'trailing') lack improved DDPM's sectioned
respacing ('10,15,20', 'ddim25') in which DiT's and guided-diffusion's settings are written.
"""

from typing import Callable

import torch

from training.vp_diffusion import VPDiffusion

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _step_index(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.full([x.shape[0]], i, dtype=torch.long, device=x.device)


# Ho et al. 2020 Alg. 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, with no noise on the last step. The variance is the
# diffusion's (β̃_t, β_t, or learned range).
def ddpm_sampler(
    model: Model,
    noise: torch.Tensor,
    diffusion: VPDiffusion,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    clip_x0: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    x = noise.to(dtype)
    for i in reversed(range(diffusion.num_timesteps)):
        t = _step_index(x, i)
        p = diffusion.p_mean_variance(model(x, diffusion.model_timesteps(t)).to(dtype), x, t, clip_x0)
        x = p.mean if i == 0 else p.mean + (0.5 * p.log_variance).exp() * randn_like(x)
    return x


# Song et al. 2021 Eq. 12 with σ_t(η) from Eq. 16: x_{t'} = √ᾱ_{t'} x̂_0 + √(1 − ᾱ_{t'} − σ²) ε̂ + σ z,
# σ = η √((1 − ᾱ_{t'}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t'}), t' the previous kept step (ᾱ = 1 after the last).
# η = 0 is the deterministic sampler (no noise drawn), η = 1 DDPM's posterior variance.
def ddim_sampler(
    model: Model,
    noise: torch.Tensor,
    diffusion: VPDiffusion,
    eta: float = 0.0,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    clip_x0: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    x = noise.to(dtype)
    for i in reversed(range(diffusion.num_timesteps)):
        t = _step_index(x, i)
        p = diffusion.p_mean_variance(model(x, diffusion.model_timesteps(t)).to(dtype), x, t, clip_x0)
        a, a_prev = float(diffusion.alphas_cumprod[i]), float(diffusion.alphas_cumprod_prev[i])
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * p.x0 + (1 - a_prev - sigma**2) ** 0.5 * p.eps
        if sigma > 0:
            x = x + sigma * randn_like(x)
    return x


# Classifier-free guidance (Ho & Salimans 2022): u + w·(c − u) on the first `channels` output channels (all
# when None; DiT's sampler guides 3 of its 4 ε channels), the rest taken from the conditional output.
def guided_model(cond: Model, uncond: Model, guidance: float, channels: int | None = None) -> Model:
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = cond(x, t)
        if guidance == 1:
            return c
        u = uncond(x, t)
        k = c.shape[1] if channels is None else channels
        return torch.cat([u[:, :k] + guidance * (c[:, :k] - u[:, :k]), c[:, k:]], dim=1)

    return model


# An EDM denoiser D(x; σ) as an ε-predictor on a VP schedule, EDM Table 1's VP column read backwards: at original
# timestep t, σ_t = √((1 − ᾱ_t) / ᾱ_t) and x = x_t / √ᾱ_t = x_t·√(1 + σ_t²), so ε̂ = (x − D(x; σ_t)) / σ_t, and the
# sampler's x̂_0 = (x_t − √(1 − ᾱ_t)·ε̂) / √ᾱ_t is D itself. `diffusion` is the unrespaced schedule whose
# indices the samplers pass (VPDiffusion.model_timesteps). σ reaches the denoiser shaped [N, 1, 1, 1].
def denoiser_as_eps_model(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], diffusion: VPDiffusion
) -> Model:
    sigmas = diffusion.sigmas

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = sigmas[t.cpu().long()].to(device=x_t.device, dtype=x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        x = x_t * (1 + sigma**2).sqrt()
        return (x - denoiser(x, sigma).to(x.dtype)) / sigma

    return model


def is_discrete(net: object) -> bool:
    """A discrete-time VP net seen as an EDM denoiser (training.vp_diffusion.VPDenoiser: `.net`, `.diffusion`)."""
    return hasattr(net, 'diffusion') and hasattr(net, 'net')


def vp_model(denoiser: Callable, labels: torch.Tensor | None, diffusion: VPDiffusion) -> Model:
    """model(x_t, t) for these samplers with fixed labels: a VPDenoiser's own net output (ε or v, and its variance
    channels), any other EDM denoiser D(x, σ, labels) through denoiser_as_eps_model on `diffusion`."""
    if is_discrete(denoiser):
        return lambda x_t, t: denoiser.net(x_t, t.to(torch.float32), labels)
    return denoiser_as_eps_model(lambda x, sigma: denoiser(x, sigma, labels), diffusion)
