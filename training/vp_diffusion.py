"""Discrete-time variance-preserving diffusion (DDPM): β schedules, respacing, losses, and an EDM view.

Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM: cosine schedule, learned-range variance,
hybrid loss, respacing), Salimans & Ho 2022 (v-prediction), Karras et al. 2022 (EDM Table 1, "VP").
Indices t = 0 … T−1 address the schedule held by a `VPDiffusion`; after respacing, `timesteps[t]` is the
index in the original schedule, which is what the network receives.
"""

import math

import numpy as np
import torch

from dnnlib import EasyDict
from torch_utils import persistence
from training.loss import TrainingLoss

PREDICTIONS = ('eps', 'v')
VARIANCES = ('fixed_small', 'fixed_large', 'learned_range')


class VPDiffusionError(ValueError):
    """A schedule, respacing string or option that cannot be used."""


# β schedules. We build them in float64 ourselves: diffusers.DDPMScheduler builds the same three in float32,
# while DDPM, improved DDPM and DiT trained with float64 schedules, and ᾱ near 1 needs the precision.
def beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    T = num_timesteps
    if T < 1:
        raise VPDiffusionError(f'A β schedule needs at least one timestep, got {T}')
    if name == 'linear':  # Ho et al. 2020 §4, stretched so that any T covers the same range (Nichol & Dhariwal §3).
        return np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    if name == 'scaled_linear':  # Latent diffusion / Stable Diffusion.
        return np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    if name == 'cosine':  # Nichol & Dhariwal Eq. 17, with β clipped at 0.999.
        f = np.cos((np.arange(T + 1, dtype=np.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    raise VPDiffusionError(f"Unknown β schedule {name!r}; expected 'linear', 'cosine' or 'scaled_linear'")


# Respacing strings in the notation of improved DDPM's code: 'ddimN' takes every k-th step for the constant
# stride k that gives exactly N steps; 'a,b,c' splits [0, T) into as many near-equal sections and takes that
# many evenly spaced steps (ends included) in each; '' keeps all T steps.
def parse_respacing(spacing: str, num_timesteps: int) -> list[int]:
    T = num_timesteps
    fail = lambda why: VPDiffusionError(f'Cannot respace {T} timesteps as {spacing!r}: {why}')
    spacing = spacing.strip()
    if spacing == '':
        return list(range(T))
    if spacing.startswith('ddim'):
        count = spacing[len('ddim') :]
        if not count.isdecimal():
            raise fail("expected 'ddim' followed by a step count, e.g. 'ddim25'")
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == int(count):
                return list(range(0, T, stride))
        raise fail(f'no constant stride gives exactly {int(count)} steps')
    counts = spacing.split(',')
    if not all(c.strip().isdecimal() and int(c) > 0 for c in counts):
        raise fail("expected positive step counts separated by commas, e.g. '250' or '10,15,20', or 'ddim25'")
    base, extra = divmod(T, len(counts))
    start, kept = 0, []
    for i, count in enumerate(int(c) for c in counts):
        size = base + (i < extra)
        if count > size:
            raise fail(f'section {i} has {size} steps, fewer than the {count} asked for')
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        position = 0.0
        for _ in range(count):  # Accumulating the stride (not k·stride) keeps the reference's rounding of ties.
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


# KL(N(m1, e^lv1) ‖ N(m2, e^lv2)) per element, in nats.
def normal_kl(m1: torch.Tensor, lv1: torch.Tensor, m2: torch.Tensor, lv2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2) - 1)


# log P(x) for data on [-1, 1] quantised to 256 levels under N(mean, e^(2 log_scale)), the DDPM decoder
# (Ho et al. Eq. 13); the end bins take the tails. We use the exact normal CDF (log_ndtr) where the reference
# code used a tanh approximation of it, and subtract CDFs in the tail nearer the mean for precision.
def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    inv_std = torch.exp(-log_scale)
    lo = (x - mean - 1 / 255) * inv_std
    hi = (x - mean + 1 / 255) * inv_std
    flip = lo > 0  # Φ(hi) − Φ(lo) = Φ(−lo) − Φ(−hi)
    near_lo, near_hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_near_hi = torch.special.log_ndtr(near_hi)
    log_gap = torch.log((-torch.expm1(torch.special.log_ndtr(near_lo) - log_near_hi)).clamp(min=1e-30))
    log_bin = log_near_hi + log_gap
    left_edge, right_edge = torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo)
    return torch.where(x < -0.999, left_edge, torch.where(x > 0.999, right_edge, log_bin))


class VPDiffusion:
    """A discrete VP process q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) over given β's, held in float64.

    prediction: what the net's first `channels` outputs estimate, 'eps' (ε) or 'v' (√ᾱ ε − √(1−ᾱ) x_0).
    variance: the reverse step's variance, β̃_t ('fixed_small'), β_t ('fixed_large') or interpolated between
    them in the log domain by the net's second half of channels ('learned_range', Nichol & Dhariwal Eq. 15).
    timesteps: the original index of each step (after respacing); defaults to 0 … T−1.
    """

    def __init__(
        self,
        betas: np.ndarray | torch.Tensor,
        prediction: str = 'eps',
        variance: str = 'fixed_small',
        timesteps: list[int] | None = None,
    ) -> None:
        if prediction not in PREDICTIONS:
            raise VPDiffusionError(f'Unknown prediction {prediction!r}; expected one of {PREDICTIONS}')
        if variance not in VARIANCES:
            raise VPDiffusionError(f'Unknown variance {variance!r}; expected one of {VARIANCES}')
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            found = f'{len(betas)} values in [{betas.min():g}, {betas.max():g}]' if betas.numel() else 'none'
            raise VPDiffusionError(f'β must be a 1-D sequence of values in (0, 1), got {found}')
        self.prediction, self.variance = prediction, variance
        self.timesteps = torch.arange(len(betas)) if timesteps is None else torch.as_tensor(timesteps)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        a, a_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        # Square roots in float64 before any cast: √(1 − ᾱ) of ᾱ ≈ 1 loses its digits in float32.
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = a.sqrt(), (1 - a).sqrt()
        self.log_betas = betas.log()
        # Posterior q(x_{t−1} | x_t, x_0) (Ho et al. Eqs. 6-7).
        self.posterior_variance = betas * (1 - a_prev) / (1 - a)
        self.posterior_mean_coef_x0 = a_prev.sqrt() * betas / (1 - a)
        self.posterior_mean_coef_xt = (1 - betas).sqrt() * (1 - a_prev) / (1 - a)
        # β̃_0 = 0; its log is replaced by log β̃_1, and so is the large variance's at t = 0, as in DDPM's code.
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.log_variance_small = torch.cat([first[None], self.posterior_variance[1:]]).log()
        self.log_variance_large = torch.cat([first[None], betas[1:]]).log()

    @classmethod
    def from_schedule(
        cls, schedule: str = 'linear', num_timesteps: int = 1000, respacing: str = '', **kwargs
    ) -> 'VPDiffusion':
        return cls(beta_schedule(schedule, num_timesteps), **kwargs).respace(respacing)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def sigmas(self) -> torch.Tensor:  # EDM's noise level of each step, σ_t = √((1 − ᾱ_t) / ᾱ_t).
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    # Keep a subset of steps with the same ᾱ's: β_i = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}} (Nichol & Dhariwal §4).
    def respace(self, spacing: str) -> 'VPDiffusion':
        kept = parse_respacing(spacing, self.num_timesteps)
        a = self.alphas_cumprod[kept]
        betas = 1 - a / torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        return VPDiffusion(betas, self.prediction, self.variance, self.timesteps[kept].tolist())

    def _at(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """values[t] per sample, shaped to broadcast against x, in x's dtype."""
        return values.to(t.device)[t].to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(t.device)[t]

    def _roots(self, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._at(self.sqrt_alphas_cumprod, t, x), self._at(self.sqrt_one_minus_alphas_cumprod, t, x)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma = self._roots(t, x0)
        return sqrt_a * x0 + sqrt_1ma * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and (clipped) log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef_x0, t, x_t) * x0 + self._at(self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.log_variance_small, t, x_t)

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma = self._roots(t, x0)
        return sqrt_a * noise - sqrt_1ma * x0

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma = self._roots(t, x_t)
        return (x_t - sqrt_1ma * eps) / sqrt_a

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma = self._roots(t, x_t)
        return sqrt_a * x_t - sqrt_1ma * v

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        sqrt_a, sqrt_1ma = self._roots(t, x_t)
        return (x_t - sqrt_a * x0) / sqrt_1ma

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The net's (ε or v, variance value) halves; the second is None unless the variance is learned."""
        if self.variance != 'learned_range':
            return output, None
        if output.shape[1] % 2:
            raise VPDiffusionError(f'A learned-variance net needs an even channel count, got {output.shape[1]}')
        return output.chunk(2, dim=1)

    def p_mean_variance(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_x0: bool = False
    ) -> EasyDict:
        """The reverse step p(x_{t−1} | x_t) given the net's output: mean, variance, log_variance, x0, eps.

        A fixed variance comes per sample, shaped to broadcast against x_t.
        """
        pred, var_value = self.split(output)
        x0 = self.x0_from_eps(x_t, t, pred) if self.prediction == 'eps' else self.x0_from_v(x_t, t, pred)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if self.variance == 'learned_range':  # Nichol & Dhariwal Eq. 15, u = (v + 1) / 2.
            u = (var_value + 1) / 2
            log_variance = u * self._at(self.log_betas, t, x_t) + (1 - u) * self._at(self.log_variance_small, t, x_t)
        else:
            table = self.log_variance_small if self.variance == 'fixed_small' else self.log_variance_large
            log_variance = self._at(table, t, x_t)  # Broadcasts against x_t.
        mean = self.q_posterior(x0, x_t, t)[0]
        eps = self.eps_from_x0(x_t, t, x0)
        return EasyDict(mean=mean, variance=log_variance.exp(), log_variance=log_variance, x0=x0, eps=eps)

    # L_t of the variational bound in bits per dimension: KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) for t > 0,
    # −log p(x_0 | x_1) under the discretized decoder for t = 0 (Ho et al. Eq. 5, Nichol & Dhariwal Eq. 4).
    def vlb_terms(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(output, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, p.mean, p.log_variance))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance))
        return torch.where(t == 0, nll, kl) / math.log(2)

    # Per-sample loss: L_simple (Ho et al. Eq. 14, on ε or v), plus λ·L_vlb for a learned variance with the
    # mean's gradient stopped (L_hybrid, Nichol & Dhariwal Eq. 16). L_vlb = Σ_t L_t is estimated as T·L_t; at
    # T = 1000 and λ = 0.001 this is the L_simple + L_t that improved DDPM and DiT train.
    def loss(
        self,
        output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        vlb_weight: float = 0.001,
    ) -> torch.Tensor:
        pred, var_value = self.split(output)
        target = noise if self.prediction == 'eps' else self.v_target(x0, noise, t)
        mse = _mean_flat((pred - target) ** 2)
        if var_value is None:
            return mse
        vlb = self.vlb_terms(torch.cat([pred.detach(), var_value], dim=1), x0, x_t, t)
        return mse + vlb_weight * self.num_timesteps * vlb

    # The fractional original timestep whose σ equals the given one, interpolating log σ linearly between
    # neighbouring steps; σ outside the schedule's range maps to its first or last step.
    def timestep_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.sigmas.log().to(sigma.device)
        steps = self.timesteps.to(device=sigma.device, dtype=torch.float64)
        x = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
        if len(log_sigmas) == 1:
            return steps.expand_as(x).clone()
        j = torch.searchsorted(log_sigmas, x).clamp(1, len(log_sigmas) - 1)
        w = (x - log_sigmas[j - 1]) / (log_sigmas[j] - log_sigmas[j - 1])
        return steps[j - 1] + w * (steps[j] - steps[j - 1])


@persistence.persistent_class
class VPLoss(TrainingLoss):
    """Training loss for a net(x_t, t, labels) on the VP process, one value per sample; t is drawn uniformly
    per sample (Ho et al. Alg. 1) and the net receives the original timestep index. `export` presents the
    trained net as an EDM denoiser for snapshots and sample grids."""

    def __init__(
        self,
        schedule: str = 'linear',
        num_timesteps: int = 1000,
        prediction: str = 'eps',
        variance: str = 'learned_range',
        vlb_weight: float = 0.001,
    ) -> None:
        super().__init__()
        self.diffusion = VPDiffusion.from_schedule(schedule, num_timesteps, prediction=prediction, variance=variance)
        self.vlb_weight = vlb_weight

    def export(self, net: torch.nn.Module) -> 'VPDenoiser':
        """The net as an EDM denoiser; its geometry comes from the net (DiT's or an adapter's names)."""
        resolution = getattr(net, 'img_resolution', getattr(net, 'input_size', None))
        channels = getattr(net, 'img_channels', getattr(net, 'in_channels', None))
        label_dim = getattr(net, 'label_dim', getattr(net, 'num_classes', 0))
        return VPDenoiser(net, self.diffusion, resolution, channels, label_dim)

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.randint(0, self.diffusion.num_timesteps, [images.shape[0]], device=images.device)
        noise = torch.randn_like(images)
        x_t = self.diffusion.q_sample(images, t, noise)
        output = net(x_t, self.diffusion.model_timesteps(t), labels)
        return self.diffusion.loss(output.to(images.dtype), images, x_t, t, noise, self.vlb_weight)


@persistence.persistent_class
class VPDenoiser(torch.nn.Module):
    """A net(x_t, t, labels) trained on a VP process, seen as an EDM denoiser D(x; σ) (EDM Table 1).

    The diffusion's float64 tables stay outside the module's tensors: `.to(device)` and `.half()` leave
    them as they are, and each call copies what it reads to the input's device, so a snapshot moved to a
    GPU or stored in float16 keeps its exact schedule.

    x = x_t / √ᾱ_t, so the net gets c_in·x with c_in = 1/√(σ²+1) = √ᾱ, and c_noise is the fractional
    original timestep with that σ. ε-prediction: c_skip = 1, c_out = −σ (EDM Table 1, VP and iDDPM columns);
    v-prediction: c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1). Only the first img_channels outputs are used.
    """

    def __init__(
        self, net: torch.nn.Module, diffusion: VPDiffusion, img_resolution: int, img_channels: int, label_dim: int = 0
    ) -> None:
        super().__init__()
        self.net = net
        self.diffusion = diffusion
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min = float(diffusion.sigmas[0])
        self.sigma_max = float(diffusion.sigmas[-1])

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out, c_in, c_noise for each σ."""
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.diffusion.prediction == 'eps':
            c_skip, c_out = torch.ones_like(sigma), -sigma
        else:
            c_skip, c_out = c_in**2, -sigma * c_in
        return c_skip, c_out, c_in, self.diffusion.timestep_of_sigma(sigma).to(sigma.dtype)

    def forward(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | None = None, **net_kwargs
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, *[1] * (x.ndim - 1)) for c in self.preconditioning(sigma))
        F = self.net(c_in * x, c_noise.flatten(), class_labels, **net_kwargs)[:, : self.img_channels]
        return c_skip * x + c_out * F.to(torch.float32)
