"""Noise-level schedules and ODE solvers for the probability-flow ODE in EDM's σ parameterisation.

With s(t) = 1 and σ(t) = t the ODE is dx/dσ = (x − D(x; σ)) / σ (Karras et al. 2022, Eq. 3 and Eq. 4).
Every solver is a pure function solver(D, x, sigmas) -> x: `D(x, sigma)` is the (guided) denoiser,
`x` the start at σ_0 = sigmas[0], `sigmas` the descending noise levels ending with 0. The last step,
to σ = 0, is an Euler step in every solver, which lands on the denoised estimate itself.

The multistep solvers integrate the ODE in λ = −log σ, where its linear part is exact (an exponential
integrator, Lu et al. 2022, arXiv 2211.01095, Eq. 9 with α = 1): over a step of length h = λ_{i+1} − λ_i,

    x_{i+1} = e^{−h} x_i + e^{−h} ∫_0^h e^{τ} D(λ_i + τ) dτ,

and they differ in the polynomial that stands in for D under the integral, fitted to the denoised
estimates of the last one, two or three steps.

diffusers' EDMDPMSolverMultistepScheduler takes the same second-order step (tests/test_solvers.py checks
it step for step), but it is a stateful object (step index and past outputs live between calls), wants
the raw network output F rather than the guided D, and would sit beside, not inside, the per-seed noise
of StackedRandomGenerator. Pure functions over D keep every image a function of its seed and the
settings alone, for any batch. (Its third-order update measured second order on the Gaussian toy of
the tests; the quadratic below measures third.)
"""

import math
from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------
# Schedules: num_steps noise levels from sigma_max down to sigma_min, then 0.


# Evenly spaced in σ^(1/ρ) (EDM Eq. 5).
def sigma_steps(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = torch.arange(num_steps, dtype=dtype, device=device) / max(num_steps - 1, 1)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.nn.functional.pad(sigmas, [0, 1])


# Evenly spaced in log σ, i.e. in log-SNR = −2 log σ (the uniform-λ steps of Lu et al. 2022, DPM-Solver §3.3).
def logsnr_uniform_steps(
    num_steps: int, sigma_min: float, sigma_max: float, rho: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    ramp = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    sigmas = torch.exp(math.log(sigma_max) + ramp * (math.log(sigma_min) - math.log(sigma_max)))
    return torch.nn.functional.pad(sigmas, [0, 1]).to(dtype=dtype, device=device)


Schedule = Callable[[int, float, float, float, torch.dtype, torch.device], torch.Tensor]
SCHEDULES: dict[str, Schedule] = {'karras': sigma_steps, 'logsnr-uniform': logsnr_uniform_steps}


# ----------------------------------------------------------------------------
# Solvers.


# Explicit Euler on dx/dσ (EDM Alg. 1 with a first-order step): first order, one evaluation per step.
def euler(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) / sigma * (x - D(x, sigma))
    return x


def _exp_step(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, d: list[torch.Tensor], lam: list):
    """One exponential-integrator step from σ to σ_next with D replaced by the polynomial through the
    estimates d[0] (at the current λ), d[1], d[2] (older) at log-levels lam[0], lam[1], lam[2]."""
    if sigma_next == 0:
        return d[0]
    h = (torch.log(sigma) - torch.log(sigma_next)).item()
    em1 = math.expm1(-h)
    x = (sigma_next / sigma) * x - em1 * d[0]  # Integral of the constant term: (1 − e^{−h}) D.
    if len(d) == 1:
        return x
    h1 = lam[0] - lam[1]
    slope = (d[0] - d[1]) / h1
    if len(d) == 2:
        # DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): D ≈ (1 + 1/2r) d_0 − (1/2r) d_1 under the φ_1 integral.
        return x - em1 * (h / 2) * slope
    # Quadratic through the three estimates (Newton form): D'(λ_i) = s_0 + h1·c, D'' = 2c, integrated
    # exactly against e^{τ}: ∫τ e^{τ−h} = h − 1 + e^{−h}, ∫(τ²/2) e^{τ−h} = h²/2 − h + 1 − e^{−h}.
    curvature = (slope - (d[1] - d[2]) / (lam[1] - lam[2])) / (lam[0] - lam[2])
    first = h + em1
    second = h * h / 2 - h - em1
    return x + first * (slope + h1 * curvature) + second * 2 * curvature


def _multistep(order: int) -> Callable[[Denoiser, torch.Tensor, torch.Tensor], torch.Tensor]:
    def solver(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        d, lam = [], []  # Newest first: the denoised estimates and their λ = −log σ.
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            d = [D(x, sigma), *d][:order]
            lam = [-math.log(sigma.item()), *lam][:order]
            x = _exp_step(x, sigma, sigma_next, d, lam)
        return x

    return solver


# DPM-Solver++(2M) and its third-order multistep sibling (Lu et al. 2022, §4.2): one evaluation per step,
# the first steps at the order their history allows.
dpmpp_2m = _multistep(2)
dpmpp_3m = _multistep(3)


def _weights(h: float, nodes: list[float]) -> list[float]:
    """w such that Σ_j w_j d_j = e^{−h} ∫_0^h e^{τ} p(τ) dτ, p the polynomial through (nodes[j], d_j).

    Moments I_k = e^{−h} ∫_0^h e^{τ} τ^k dτ by parts: I_0 = 1 − e^{−h}, I_k = h^k − k·I_{k−1}; then w = V^{−T} I
    for the Vandermonde matrix V_jk = nodes[j]^k.
    """
    moments = [-math.expm1(-h)]
    for k in range(1, len(nodes)):
        moments.append(h**k - k * moments[-1])
    V = torch.tensor([[t**k for k in range(len(nodes))] for t in nodes], dtype=torch.float64)
    return torch.linalg.solve(V.T, torch.tensor(moments, dtype=torch.float64)).tolist()


# Predictor-corrector in the manner of UniPC (Zhao et al. 2023, arXiv 2302.04867, §3): a second-order
# multistep predictor, the net evaluated once at the predicted point, and a corrector whose polynomial also
# passes through that new estimate, which raises the order to 3 at one evaluation per step (the estimate is
# reused by the next predictor, not recomputed at the corrected point). The weights integrate the polynomial
# exactly (above) rather than through UniPC's B(h) approximations.
def unipc(D: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    d, lam = [D(x, sigmas[0])], [-math.log(sigmas[0].item())]  # Newest first.
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if sigma_next == 0:
            return d[0]
        lam_next = -math.log(sigma_next.item())
        h, decay = lam_next - lam[0], sigma_next / sigma
        past = [level - lam[0] for level in lam]
        pred = decay * x + sum(w * e for w, e in zip(_weights(h, past), d))
        d_next = D(pred, sigma_next)
        x = decay * x + sum(w * e for w, e in zip(_weights(h, [h, *past]), [d_next, *d]))
        d, lam = [d_next, *d][:2], [lam_next, *lam][:2]
    return x


SOLVERS: dict[str, Callable[[Denoiser, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    'euler': euler,
    'dpm++2m': dpmpp_2m,
    'dpm++3m': dpmpp_3m,
    'unipc': unipc,
}

# Order of convergence, and the fewest steps at which a solver reaches it.
ORDERS: dict[str, int] = {'heun': 2, 'euler': 1, 'dpm++2m': 2, 'dpm++3m': 3, 'unipc': 3}


def check_solver(solver: str, schedule: str, num_steps: int, S_churn: float = 0) -> None:
    """A ValueError with one line for the user when these settings cannot run."""
    if solver not in ORDERS:
        raise ValueError(f'Unknown solver {solver!r}; choose one of: {", ".join(ORDERS)}.')
    if schedule not in SCHEDULES:
        raise ValueError(f'Unknown schedule {schedule!r}; choose one of: {", ".join(SCHEDULES)}.')
    if solver != 'heun' and num_steps < ORDERS[solver]:
        raise ValueError(f'Solver {solver} needs at least {ORDERS[solver]} steps for its order; got {num_steps}.')
    if solver != 'heun' and S_churn > 0:
        raise ValueError(f'Churn (S_churn={S_churn}) works with the heun solver only; set S_churn=0 for {solver}.')


def num_evaluations(solver: str, num_steps: int) -> int:
    """Network evaluations (NFE) of one image: Heun evaluates twice per step except the last."""
    return 2 * num_steps - 1 if solver == 'heun' else num_steps
