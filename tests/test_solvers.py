"""Tests for training/solvers.py and the guidance interval of training/sampling.py: convergence orders on a
Gaussian toy with a closed-form ODE solution, schedules, the interval's semantics and evaluation counts, and
per-seed determinism and batch invariance of every solver through generation.sample()."""

import math

import numpy as np
import pytest
import torch

from training.generation import sample
from training.sampling import edm_sampler, guided_denoiser
from training.solvers import ORDERS, check_solver, dpmpp_2m, logsnr_uniform_steps, num_evaluations, sigma_steps

MU = torch.tensor([0.3, -0.5], dtype=torch.float64).reshape(1, 2, 1, 1)
S = torch.tensor([0.7, 0.2], dtype=torch.float64).reshape(1, 2, 1, 1)
SOLVER_NAMES = list(ORDERS)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
    # E[y | y + n = x] for y ~ N(MU, S^2), n ~ N(0, sigma^2).
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_sample(noise: torch.Tensor, sigma_max: float, sigma_min: float) -> torch.Tensor:
    """The ODE's exact solution from σ_max to σ_min, then the final step every solver takes (x ← D(x; σ_min)).

    For Gaussian data the ODE is linear: x(σ) − MU = (x(σ_max) − MU)·sqrt((S² + σ²) / (S² + σ_max²)).
    """
    x = MU + (noise * sigma_max - MU) * ((S**2 + sigma_min**2) / (S**2 + sigma_max**2)).sqrt()
    return gaussian_denoiser(x, torch.tensor(sigma_min, dtype=torch.float64))


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_each_solver_converges_to_the_exact_ode_solution_at_its_order(solver: str) -> None:
    noise = torch.randn([16, 2, 2, 2], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_sample(noise, 80, 0.002)
    steps = [32, 64, 128, 256]
    errors = [
        (edm_sampler(gaussian_denoiser, noise, num_steps=n, dtype=torch.float64, solver=solver) - exact).abs().max()
        for n in steps
    ]
    slope = -np.polyfit(np.log(steps), np.log([e.item() for e in errors]), 1)[0]
    assert abs(slope - ORDERS[solver]) < 0.3, f'{solver}: measured order {slope:.2f}'


def test_multistep_solvers_beat_heun_at_equal_evaluations_on_the_toy() -> None:
    noise = torch.randn([16, 2, 2, 2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_sample(noise, 80, 0.002)

    def error(solver: str, nfe: int) -> float:
        n = (nfe + 1) // 2 if solver == 'heun' else nfe
        assert num_evaluations(solver, n) == nfe
        out = edm_sampler(gaussian_denoiser, noise, num_steps=n, dtype=torch.float64, solver=solver)
        return (out - exact).abs().max().item()

    assert error('dpm++2m', 63) < error('heun', 63) and error('dpm++3m', 63) < error('dpm++2m', 63)


def test_dpmpp_2m_matches_diffusers_edm_dpm_solver_step_for_step() -> None:
    # A second code path: diffusers' EDMDPMSolverMultistepScheduler on the same noise levels and denoiser.
    diffusers = pytest.importorskip('diffusers')
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(solver_order=2, prediction_type='epsilon')
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.to(torch.float64)
    noise = torch.randn([4, 2, 2, 2], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise * sigmas[0]
    for sigma, t in zip(
        sigmas, scheduler.timesteps
    ):  # The scheduler wants the raw net output F: D = c_skip x + c_out F.
        c_skip_x = scheduler.precondition_outputs(x, torch.zeros_like(x), sigma)
        c_out = scheduler.precondition_outputs(x, torch.ones_like(x), sigma) - c_skip_x
        x = scheduler.step((gaussian_denoiser(x, sigma) - c_skip_x) / c_out, t, x).prev_sample
    torch.testing.assert_close(dpmpp_2m(gaussian_denoiser, noise * sigmas[0], sigmas), x, rtol=0, atol=1e-5)


def test_logsnr_uniform_steps_are_evenly_spaced_in_log_sigma() -> None:
    t = logsnr_uniform_steps(7, 0.002, 80, 7, torch.float64, torch.device('cpu'))
    assert len(t) == 8 and t[-1] == 0
    steps = t[:-1].log().diff()
    torch.testing.assert_close(steps, torch.full_like(steps, (math.log(0.002) - math.log(80)) / 6))


@pytest.mark.parametrize(
    'solver, schedule, steps, churn, message',
    [
        ('rk4', 'karras', 8, 0, 'Unknown solver'),
        ('euler', 'cosine', 8, 0, 'Unknown schedule'),
        ('dpm++3m', 'karras', 2, 0, 'at least 3 steps'),
        ('dpm++2m', 'karras', 8, 10, 'heun solver only'),
    ],
)
def test_bad_solver_settings_are_one_line_errors(solver, schedule, steps, churn, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_solver(solver, schedule, steps, churn)


# ----------------------------------------------------------------------------
# Guidance interval.


class Recorder(torch.nn.Module):
    """An elementwise denoiser (so batches cannot mix images) that records the σ of each call."""

    def __init__(self, scale: float, label_dim: int = 0) -> None:
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 2, 4, label_dim
        self.scale = torch.nn.Parameter(torch.tensor(scale), requires_grad=False)
        self.sigmas = []

    def forward(self, x, sigma, labels=None, **kwargs):
        self.sigmas.append(float(sigma))
        out = torch.tanh(x * self.scale) / (1 + torch.as_tensor(sigma) ** 2)
        if isinstance(labels, torch.Tensor):
            out = out + labels.sum(dim=1).reshape(-1, 1, 1, 1) * 0.1
        if isinstance(labels, list):  # Captions: the empty caption is the unconditional net.
            out = out + torch.tensor([len(c) for c in labels], dtype=x.dtype).reshape(-1, 1, 1, 1) / 10
        return out


def _noise() -> torch.Tensor:
    return torch.randn([3, 2, 4, 4], generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_interval_covering_every_sigma_equals_plain_guidance_bit_exactly(solver: str) -> None:
    net, gnet = Recorder(0.9), Recorder(0.4)
    plain = edm_sampler(net, _noise(), gnet=gnet, guidance=2.2, num_steps=6, solver=solver)
    covered = edm_sampler(net, _noise(), gnet=gnet, guidance=2.2, num_steps=6, solver=solver, guidance_interval=(0, 80))
    assert torch.equal(plain, covered)


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_empty_interval_equals_no_guidance_and_never_evaluates_the_guide(solver: str) -> None:
    net, gnet = Recorder(0.9), Recorder(0.4)
    unguided = edm_sampler(net, _noise(), num_steps=6, solver=solver)
    empty = edm_sampler(net, _noise(), gnet=gnet, guidance=2.2, num_steps=6, solver=solver, guidance_interval=(3, 3))
    assert torch.equal(unguided, empty) and gnet.sigmas == []


@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_guide_is_evaluated_exactly_at_the_sigmas_inside_the_interval(solver: str) -> None:
    lo, hi, n = 0.3, 5.0, 9
    net, gnet = Recorder(0.9), Recorder(0.4)
    edm_sampler(net, _noise(), gnet=gnet, guidance=2.0, num_steps=n, solver=solver, guidance_interval=(lo, hi))
    levels = sigma_steps(n, 0.002, 80, 7, torch.float32, torch.device('cpu')).tolist()
    # Heun evaluates at σ_i and, except on the last step, at σ_{i+1}; the other solvers at σ_i only.
    evaluated = levels[:n] + (levels[1:n] if solver == 'heun' else [])
    inside = sorted(s for s in evaluated if lo < s <= hi)
    assert len(net.sigmas) == num_evaluations(solver, n)
    assert sorted(gnet.sigmas) == pytest.approx(inside) and 0 < len(inside) < len(evaluated)


def test_interval_switches_between_the_guided_and_the_plain_denoiser_at_its_ends() -> None:
    net, gnet, w = Recorder(0.9), Recorder(0.4), 1.8
    calls = []
    correction = lambda x, sigma: calls.append(float(sigma)) or 0.01 * x  # noqa: E731
    D = guided_denoiser(net, None, gnet, w, (1.0, 2.0), correction)
    x = _noise()
    for sigma in (0.5, 1.0, 1.5, 2.0, 3.0):
        s = torch.tensor(sigma)
        guided = gnet(x, s) + w * (net(x, s) - gnet(x, s)) + 0.01 * x
        want = guided if 1.0 < sigma <= 2.0 else net(x, s)
        torch.testing.assert_close(D(x, s), want, rtol=0, atol=1e-6)
    assert calls == [1.5, 2.0]  # (σ_lo, σ_hi]: open below, closed above; CLIP-style corrections alike.
    with pytest.raises(ValueError, match='sigma_lo <= sigma_hi'):
        guided_denoiser(net, None, gnet, w, (2.0, 1.0))


def test_text_net_guidance_by_the_empty_caption_respects_the_interval() -> None:
    net = Recorder(0.9)
    net.text_encoder, net.lowres = None, None
    captions = ['a red circle', 'a blue square']
    outside = sample(net, [1, 2], captions=captions, guidance=3.0, num_steps=5, guidance_interval=(100, 200))
    evaluations = len(net.sigmas)
    unguided = sample(net, [1, 2], captions=captions, num_steps=5)
    assert torch.equal(outside.latents, unguided.latents) and evaluations == 9


# ----------------------------------------------------------------------------
# Determinism and batch invariance through the sampling entry point.


@pytest.mark.parametrize('schedule', ['karras', 'logsnr-uniform'])
@pytest.mark.parametrize('solver', SOLVER_NAMES)
def test_an_image_depends_on_its_seed_alone_for_every_solver(solver: str, schedule: str) -> None:
    net, gnet = Recorder(0.9, label_dim=3), Recorder(0.4, label_dim=3)
    kwargs = dict(num_steps=5, solver=solver, schedule=schedule, gnet=gnet, guidance=1.5, guidance_interval=(0.1, 10))
    batch = sample(net, [3, 8, 13], **kwargs).latents
    alone = sample(net, [8], **kwargs).latents
    again = sample(net, [3, 8, 13], **kwargs).latents
    assert torch.equal(batch[1], alone[0]) and torch.equal(batch, again)
