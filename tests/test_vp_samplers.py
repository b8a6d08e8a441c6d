import math

import numpy as np
import pytest
import torch

from training.sampling import StackedRandomGenerator, edm_sampler
from training.vp_diffusion import VPDenoiser, VPDiffusion, beta_schedule
from training.vp_samplers import ddim_sampler, ddpm_sampler, denoiser_as_eps_model, guided_model

MU = torch.tensor([0.4, -0.3], dtype=torch.float64).reshape(1, 2, 1, 1)  # Toy data N(MU, S²) per channel.
S = torch.tensor([0.5, 0.2], dtype=torch.float64).reshape(1, 2, 1, 1)


def toy_model(diffusion: VPDiffusion, learned: bool = False):
    """The exact ε-predictor of the toy at integer original timesteps, E[ε | x_t], from ᾱ in numpy."""
    a_full = torch.as_tensor(np.cumprod(1 - beta_schedule('linear')))

    def model(x_t, t):
        a = a_full[t].reshape(-1, 1, 1, 1).to(x_t.dtype)
        mu, s = MU.to(x_t.dtype), S.to(x_t.dtype)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learned else eps

    return model


def ode_solution(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The toy's probability-flow ODE solved in EDM's x = x_t/√ᾱ from σ_start to σ_end, then denoised at σ_end."""
    x_end = MU + (x_start - MU) * ((S**2 + sigma_end**2) / (S**2 + sigma_start**2)).sqrt()
    return MU + S**2 / (S**2 + sigma_end**2) * (x_end - MU)


def test_ddim_eta0_converges_to_the_probability_flow_ode_solution():
    noise = torch.randn([4, 2, 2, 2], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in ['10', '100', '1000']:
        d = VPDiffusion(beta_schedule('linear'), variance='learned_range').respace(steps)
        sigma_top, sigma_end = float(d.sigmas[-1]), float(d.sigmas[0])
        x = ddim_sampler(toy_model(d, learned=True), noise, d, dtype=torch.float64)
        expected = ode_solution(noise * math.sqrt(1 + sigma_top**2), sigma_top, sigma_end)
        errors.append((x - expected).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5e-3, errors
    assert errors[1] / errors[2] > 5  # First order in the step size.


def test_edm_heun_through_the_vp_denoiser_reaches_the_same_ode_solution():
    d = VPDiffusion(beta_schedule('linear'))
    sigma_top, sigma_end = float(d.sigmas[-1]), float(d.sigmas[0])
    den = VPDenoiser(lambda x, t, labels: toy_model_fractional(d)(x, t), d, img_resolution=2, img_channels=2)
    noise = torch.randn([4, 2, 2, 2], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = edm_sampler(den, noise, num_steps=256, sigma_min=sigma_end, sigma_max=sigma_top, dtype=torch.float64)
    expected = ode_solution(noise * sigma_top, sigma_top, sigma_end)
    assert (x - expected).abs().max() < 1e-3


def toy_model_fractional(d: VPDiffusion):
    """The exact ε-predictor at fractional timesteps, ᾱ from log σ interpolated between the schedule's steps."""
    log_sigmas = d.sigmas.log().numpy()

    def model(x_t, t):
        sigma = np.exp(np.interp(t.double().numpy(), np.arange(len(log_sigmas)), log_sigmas))
        a = torch.as_tensor(1 / (1 + sigma**2), dtype=x_t.dtype).reshape(-1, 1, 1, 1)
        mu, s = MU.to(x_t.dtype), S.to(x_t.dtype)
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return model


@pytest.mark.parametrize('variance, spacing', [('fixed_small', ''), ('fixed_large', ''), ('learned_range', '250')])
def test_ddpm_ancestral_samples_have_the_data_mean_and_std(variance, spacing):
    d = VPDiffusion(beta_schedule('linear'), variance=variance).respace(spacing)
    torch.manual_seed(0)
    x = ddpm_sampler(toy_model(d, learned=variance == 'learned_range'), torch.randn([256, 2, 4, 4]), d)
    n = 256 * 16
    samples = x.double().permute(1, 0, 2, 3).reshape(2, n)
    torch.testing.assert_close(samples.mean(1), MU.flatten(), atol=4 * S.max().item() / n**0.5, rtol=0)
    torch.testing.assert_close(samples.std(1), S.flatten(), rtol=0.04, atol=0)


def test_ddim_eta1_is_ddpm_with_the_posterior_variance():
    d = VPDiffusion(beta_schedule('linear'), variance='learned_range').respace('40')
    small = VPDiffusion(beta_schedule('linear'), variance='fixed_small').respace('40')
    noise = torch.randn([3, 2, 2, 2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    runs = []
    for sampler, diffusion, learned in [(ddim_sampler, d, True), (ddpm_sampler, small, False)]:
        gen = torch.Generator().manual_seed(2)
        randn_like = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
        kwargs = dict(eta=1.0) if sampler is ddim_sampler else {}
        model = toy_model(diffusion, learned)
        runs.append(sampler(model, noise, diffusion, randn_like=randn_like, dtype=torch.float64, **kwargs))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('prediction', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('variance', ['fixed_small', 'learned_range'])
def test_one_ddpm_step_equals_diffusers(prediction, variance):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=prediction, variance_type=variance, clip_sample=False)
    d = VPDiffusion(
        beta_schedule('linear'), prediction=dict(epsilon='eps', v_prediction='v')[prediction], variance=variance
    )
    g = torch.Generator().manual_seed(3)
    x, out = (
        torch.randn([2, 4, 3, 3], generator=g),
        torch.randn([2, 8 if variance == 'learned_range' else 4, 3, 3], generator=g),
    )
    for i in [999, 500, 1]:
        expected = scheduler.step(out, i, x, generator=torch.Generator().manual_seed(i)).prev_sample
        p = d.p_mean_variance(out, x, torch.full([2], i))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(p.mean + (0.5 * p.log_variance).exp() * z, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('eta', [0.0, 0.7])
def test_ddim_equals_diffusers_ddim_scheduler(eta):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    scheduler.set_timesteps(25)
    d = VPDiffusion(beta_schedule('linear')).respace('ddim25')
    model = lambda x, t: 0.8 * x + 0.001 * t.reshape(-1, 1, 1, 1)  # Any net will do: both take the same steps.
    noise = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    x = ddim_sampler(model, noise, d, eta=eta, randn_like=lambda x: torch.randn(x.shape, generator=gen))
    gen.manual_seed(5)
    expected = noise
    for t in scheduler.timesteps:
        out = model(expected, torch.full([2], int(t)))
        expected = scheduler.step(out, t, expected, eta=eta, generator=gen).prev_sample
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('sampler, kwargs', [(ddpm_sampler, {}), (ddim_sampler, dict(eta=1.0))])
def test_samples_depend_only_on_their_seed(sampler, kwargs):
    d = VPDiffusion(beta_schedule('linear'), variance='learned_range').respace('20')
    model = toy_model(d, learned=True)

    def run(seeds):
        rnd = StackedRandomGenerator('cpu', seeds)
        return sampler(model, rnd.randn([len(seeds), 2, 4, 4]), d, randn_like=rnd.randn_like, **kwargs)

    both = run([3, 4])
    assert torch.equal(both[0:1], run([3])) and torch.equal(both[1:2], run([4]))
    assert torch.equal(both, run([3, 4])) and not torch.equal(both[0], both[1])


def test_guided_model_mixes_guided_channels_only():
    cond = lambda x, t: x + 1
    uncond = lambda x, t: 2 * x
    x, t = torch.randn([2, 8, 3, 3]), torch.tensor([5, 5])
    guided = guided_model(cond, uncond, guidance=1.5, channels=3)(x, t)
    torch.testing.assert_close(guided[:, :3], 2 * x[:, :3] + 1.5 * (1 - x[:, :3]))
    torch.testing.assert_close(guided[:, 3:], x[:, 3:] + 1)
    torch.testing.assert_close(guided_model(cond, uncond, guidance=2.0)(x, t), 2 * x + 2 * (1 - x))
    never = lambda x, t: pytest.fail('the unconditional model runs without guidance')
    torch.testing.assert_close(guided_model(cond, never, guidance=1)(x, t), x + 1)


def test_reverse_adapter_turns_the_exact_edm_denoiser_into_the_exact_eps_predictor():
    # The toy's exact EDM denoiser D(x; σ) = MU + S²/(S² + σ²)·(x − MU) (x = x_t/√ᾱ) against E[ε | x_t] from ᾱ.
    d = VPDiffusion(beta_schedule('linear'))
    denoiser = lambda x, sigma: MU + S**2 / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - MU)
    model = denoiser_as_eps_model(denoiser, d)
    x_t = torch.randn([3, 2, 2, 2], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    t = torch.tensor([0, 417, 999])
    torch.testing.assert_close(model(x_t, t), toy_model(d)(x_t, t), rtol=1e-9, atol=1e-9)


def test_ddim_on_an_edm_denoiser_converges_to_the_probability_flow_ode_solution():
    d = VPDiffusion(beta_schedule('cosine'))
    denoiser = lambda x, sigma: MU + S**2 / (S**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - MU)
    noise = torch.randn([4, 2, 2, 2], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    steps = d.respace('500')
    x = ddim_sampler(denoiser_as_eps_model(denoiser, d), noise, steps, dtype=torch.float64)
    sigma_top, sigma_end = float(d.sigmas[-1]), float(d.sigmas[0])
    expected = ode_solution(noise * math.sqrt(1 + sigma_top**2), sigma_top, sigma_end)
    assert (x - expected).abs().max() < 5e-3
