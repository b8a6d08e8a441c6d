import copy
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from training.backbones import VPDiT
from training.vp_diffusion import (
    VPDenoiser,
    VPDiffusion,
    VPDiffusionError,
    VPLoss,
    beta_schedule,
    discretized_gaussian_log_likelihood,
    parse_respacing,
)


def alphas_cumprod(betas) -> np.ndarray:
    return np.cumprod(1 - np.asarray(betas, dtype=np.float64))


def random_batch(shape=(3, 2, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize(
    'name, T, diffusers_kwargs',
    [
        ('linear', 1000, dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02)),
        ('linear', 250, dict(beta_schedule='linear', beta_start=4e-4, beta_end=0.08)),
        ('scaled_linear', 1000, dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012)),
        ('cosine', 1000, dict(beta_schedule='squaredcos_cap_v2')),
        ('cosine', 50, dict(beta_schedule='squaredcos_cap_v2')),
    ],
)
def test_beta_schedules_equal_diffusers_up_to_its_float32(name, T, diffusers_kwargs):
    from diffusers import DDPMScheduler

    expected = DDPMScheduler(num_train_timesteps=T, **diffusers_kwargs).betas.double().numpy()
    betas = beta_schedule(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, expected, rtol=1e-6)


def test_cosine_schedule_follows_its_alpha_bar_and_clips_beta():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    betas = beta_schedule('cosine', T)
    np.testing.assert_allclose(alphas_cumprod(betas)[:900], [f(t + 1) / f(0) for t in range(900)], rtol=1e-9)
    assert betas.max() == 0.999


def test_unknown_schedule_and_options_raise_value_errors():
    with pytest.raises(ValueError, match="'quadratic'"):
        beta_schedule('quadratic')
    with pytest.raises(VPDiffusionError, match=r'in \(0, 1\), got 10 values in \[0.01, 2\]'):
        VPDiffusion(beta_schedule('linear', 10))  # The stretched linear schedule needs T > 20.
    with pytest.raises(VPDiffusionError, match="'x0'"):
        VPDiffusion(beta_schedule('linear', 10), prediction='x0')
    with pytest.raises(VPDiffusionError, match="'learned'"):
        VPDiffusion(beta_schedule('linear', 10), variance='learned')


@pytest.mark.parametrize('t', [1, 7, 500, 999])
def test_posterior_mean_and_variance_equal_bayes_by_numerical_integration(t):
    betas = beta_schedule('linear')
    a = alphas_cumprod(betas)
    x0, x_t = 0.3, -0.7
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), normalised on a fine grid.
    grid = np.linspace(-4, 4, 400_001)
    log_density = scipy.stats.norm.logpdf(
        x_t, math.sqrt(1 - betas[t]) * grid, math.sqrt(betas[t])
    ) + scipy.stats.norm.logpdf(grid, math.sqrt(a[t - 1]) * x0, math.sqrt(1 - a[t - 1]))
    density = np.exp(log_density - log_density.max())
    mass = scipy.integrate.trapezoid(density, grid)
    mean = scipy.integrate.trapezoid(grid * density, grid) / mass
    variance = scipy.integrate.trapezoid((grid - mean) ** 2 * density, grid) / mass

    d = VPDiffusion(betas)
    mu, var, log_var = d.q_posterior(
        torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[x_t]], dtype=torch.float64), torch.tensor([t])
    )
    assert mu.item() == pytest.approx(mean, rel=1e-7, abs=1e-9)
    assert var.item() == pytest.approx(variance, rel=1e-5)
    assert log_var.exp().item() == pytest.approx(variance, rel=1e-5)


def test_posterior_at_t0_is_x0():
    d = VPDiffusion(beta_schedule('linear'))
    x0, x_t, _ = random_batch()
    mu, var, _ = d.q_posterior(x0, x_t, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mu, x0, rtol=1e-12, atol=1e-12)
    assert (var == 0).all()


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_eps_v_and_x0_conversions_round_trip(prediction):
    d = VPDiffusion(beta_schedule('cosine'), prediction=prediction)
    x0, noise, _ = random_batch()
    t = torch.tensor([0, 400, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.as_tensor(alphas_cumprod(beta_schedule('cosine')))[t].reshape(-1, 1, 1, 1)
    v = d.v_target(x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(d.x0_from_v(x_t, t, v), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.x0_from_eps(x_t, t, noise), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.eps_from_x0(x_t, t, x0), noise, rtol=1e-9, atol=1e-9)
    p = d.p_mean_variance(noise if prediction == 'eps' else v, x_t, t)
    torch.testing.assert_close(p.x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(p.eps, noise, rtol=1e-9, atol=1e-9)


def test_clipped_x0_stays_in_range_and_eps_follows_it():
    d = VPDiffusion(beta_schedule('linear'))
    x0, noise, eps_hat = random_batch()
    t = torch.tensor([10, 500, 900])
    x_t = d.q_sample(3 * x0, t, noise)
    p = d.p_mean_variance(eps_hat, x_t, t, clip_x0=True)
    assert p.x0.abs().max() <= 1
    torch.testing.assert_close(d.x0_from_eps(x_t, t, p.eps), p.x0)


def test_learned_range_interpolates_log_variance_between_small_and_large():
    betas = beta_schedule('linear')
    d = VPDiffusion(betas, variance='learned_range')
    small, large = VPDiffusion(betas, variance='fixed_small'), VPDiffusion(betas, variance='fixed_large')
    x_t, eps, _ = random_batch()
    t = torch.tensor([1, 300, 999])
    logvar = lambda diffusion, out: diffusion.p_mean_variance(out, x_t, t).log_variance
    ones = torch.ones_like(eps)
    torch.testing.assert_close(logvar(d, torch.cat([eps, -ones], 1)), logvar(small, eps).expand_as(eps))
    torch.testing.assert_close(logvar(d, torch.cat([eps, ones], 1)), logvar(large, eps).expand_as(eps))
    a = alphas_cumprod(betas)
    tilde = betas[t] * (1 - a[t - 1]) / (1 - a[t])
    expected = 0.5 * np.log(betas[t]) + 0.5 * np.log(tilde)
    got = logvar(d, torch.cat([eps, 0 * ones], 1))[:, 0, 0, 0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_kl_term_equals_numerical_kl_of_the_two_gaussians():
    betas = beta_schedule('linear')
    a = alphas_cumprod(betas)
    d = VPDiffusion(betas, variance='learned_range')
    x0, x_t, eps_hat = random_batch((2, 1, 1, 2))
    var_value = torch.tensor([0.3, -0.6, 0.9, 0.1], dtype=torch.float64).reshape(2, 1, 1, 2)
    t = np.array([5, 600])
    got = d.vlb_terms(torch.cat([eps_hat, var_value], 1), x0, x_t, torch.as_tensor(t))

    for n, tn in enumerate(t):
        kls = []
        for k in range(2):
            x0k, xtk, ek, vk = (float(z[n, 0, 0, k]) for z in (x0, x_t, eps_hat, var_value))
            c_x0 = math.sqrt(a[tn - 1]) * betas[tn] / (1 - a[tn])
            c_xt = math.sqrt(1 - betas[tn]) * (1 - a[tn - 1]) / (1 - a[tn])
            tilde = betas[tn] * (1 - a[tn - 1]) / (1 - a[tn])
            q = scipy.stats.norm(c_x0 * x0k + c_xt * xtk, math.sqrt(tilde))
            x0_hat = (xtk - math.sqrt(1 - a[tn]) * ek) / math.sqrt(a[tn])
            u = (vk + 1) / 2
            p = scipy.stats.norm(
                c_x0 * x0_hat + c_xt * xtk, math.exp(0.5 * (u * math.log(betas[tn]) + (1 - u) * math.log(tilde)))
            )
            lo, hi = q.mean() - 12 * q.std(), q.mean() + 12 * q.std()
            integrand = lambda y: q.pdf(y) * (q.logpdf(y) - p.logpdf(y))
            kls.append(scipy.integrate.quad(integrand, lo, hi, points=[q.mean()], epsabs=1e-12, limit=200)[0])
        assert got[n].item() == pytest.approx(np.mean(kls) / math.log(2), rel=1e-6)


def test_decoder_likelihood_equals_cdf_differences_and_bins_sum_to_one():
    levels = np.linspace(-1, 1, 256)
    mean, scale = 0.1234, 0.05
    logp = discretized_gaussian_log_likelihood(
        torch.as_tensor(levels), torch.full([256], mean, dtype=torch.float64), torch.full([256], math.log(scale))
    ).numpy()
    edges = np.concatenate([[-np.inf], (levels[:-1] + levels[1:]) / 2, [np.inf]])
    lower, upper = edges[:-1], edges[1:]
    normal = scipy.stats.norm(mean, scale)
    # Subtract survival functions above the mean, where CDF differences near 1 lose the digits.
    expected = np.where(lower > mean, normal.sf(lower) - normal.sf(upper), normal.cdf(upper) - normal.cdf(lower))
    big = expected > 1e-200
    np.testing.assert_allclose(np.exp(logp[big]), expected[big], rtol=1e-8, atol=1e-300)
    assert np.exp(logp).sum() == pytest.approx(1, rel=1e-12)
    # Far in the upper tail the bins stay finite and accurate where Φ(hi) − Φ(lo) would round to 0.
    lo, hi = (0 - 1 / 255 + 1) / 0.02, (0 + 1 / 255 + 1) / 0.02
    exact = scipy.special.logsumexp([scipy.stats.norm.logsf(lo), scipy.stats.norm.logsf(hi)], b=[1, -1])
    for dtype, rel in [(torch.float64, 1e-9), (torch.float32, 1e-6)]:
        args = [torch.tensor([v], dtype=dtype) for v in (0.0, -1.0, math.log(0.02))]
        assert discretized_gaussian_log_likelihood(*args).item() == pytest.approx(exact, rel=rel)


def test_vlb_term_at_t0_is_decoder_nll_in_bits():
    d = VPDiffusion(beta_schedule('linear'), variance='learned_range')
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randint(0, 256, [2, 1, 2, 2], generator=g) / 127.5 - 1).double()
    x_t = d.q_sample(x0, torch.zeros(2, dtype=torch.long), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    out = torch.cat([torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.zeros_like(x0)], 1)
    got = d.vlb_terms(out, x0, x_t, torch.zeros(2, dtype=torch.long))
    p = d.p_mean_variance(out, x_t, torch.zeros(2, dtype=torch.long))
    std = p.variance.sqrt().numpy()
    xs, mu = x0.numpy(), p.mean.numpy()
    upper = np.where(xs > 0.999, 1.0, scipy.stats.norm.cdf(xs + 1 / 255, mu, std))
    lower = np.where(xs < -0.999, 0.0, scipy.stats.norm.cdf(xs - 1 / 255, mu, std))
    expected = -np.log(upper - lower).reshape(2, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-7)


def test_hybrid_loss_adds_scaled_vlb_with_the_mean_gradient_stopped():
    d = VPDiffusion(beta_schedule('linear'), variance='learned_range')
    x0, noise, eps_hat = random_batch()
    t = torch.tensor([0, 3, 700])
    x_t = d.q_sample(x0, t, noise)
    out = torch.cat([eps_hat, torch.full_like(eps_hat, 0.2)], 1).requires_grad_()
    loss = d.loss(out, x0, x_t, t, noise, vlb_weight=0.001)
    mse = ((eps_hat - noise) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(loss.detach(), mse + 1000 * 0.001 * d.vlb_terms(out.detach(), x0, x_t, t))
    (grad,) = torch.autograd.grad(loss.sum(), out)
    torch.testing.assert_close(grad[:, :2], 2 * (eps_hat - noise) / 8)  # Only L_simple reaches the ε half.
    assert grad[:, 2:].abs().min() > 0  # L_vlb trains the variance half.


def test_loss_targets_v_for_v_prediction_and_is_mse_alone_for_fixed_variance():
    d = VPDiffusion(beta_schedule('cosine'), prediction='v')
    x0, noise, out = random_batch()
    t = torch.tensor([1, 50, 999])
    x_t = d.q_sample(x0, t, noise)
    a = torch.as_tensor(alphas_cumprod(beta_schedule('cosine')))[t].reshape(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(d.loss(out, x0, x_t, t, noise), ((out - v) ** 2).mean((1, 2, 3)))


def test_vp_loss_draws_per_sample_timesteps_and_feeds_the_net_original_indices():
    seen = []

    def net(x, t, labels):
        seen.append(t)
        return torch.cat([x, torch.zeros_like(x)], 1)

    torch.manual_seed(0)
    loss = VPLoss(num_timesteps=100)(net, torch.randn([256, 1, 2, 2]), None)
    assert loss.shape == (256,) and torch.isfinite(loss).all()
    (t,) = seen
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < 100 and len(t.unique()) > 80


@pytest.mark.parametrize(
    'spacing, kept',
    [
        ('', list(range(1000))),
        ('ddim25', list(range(0, 1000, 40))),
        ('ddim7', list(range(0, 1000, 143))),
        ('1000', list(range(1000))),
        ('1', [0]),
    ],
)
def test_respacing_keeps_the_documented_steps(spacing, kept):
    assert parse_respacing(spacing, 1000) == kept


@pytest.mark.parametrize('spacing', ['250', '10,15,20', '3,1', '50,50,50,50'])
def test_respacing_sections_take_evenly_spaced_steps_with_ends(spacing):
    T, counts = 1000, [int(c) for c in spacing.split(',')]
    sizes = [T // len(counts) + (i < T % len(counts)) for i in range(len(counts))]
    expected, start = [], 0
    for size, count in zip(sizes, counts):
        positions = [Fraction(k * (size - 1), max(count - 1, 1)) for k in range(count)]
        expected += [start + round(p) for p in positions]
        start += size
    assert parse_respacing(spacing, T) == expected


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
@pytest.mark.parametrize('spacing', ['250', '10,15,20', 'ddim25', '1'])
def test_respaced_betas_reproduce_the_kept_alphas(schedule, spacing):
    full = VPDiffusion(beta_schedule(schedule), variance='learned_range', prediction='v')
    d = full.respace(spacing)
    kept = parse_respacing(spacing, 1000)
    a = alphas_cumprod(beta_schedule(schedule))[kept]
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), a, rtol=1e-10)  # ᾱ ~ 1e-9 at the end of cosine
    np.testing.assert_allclose(d.betas.numpy(), 1 - a / np.concatenate([[1.0], a[:-1]]), rtol=1e-12)
    assert d.timesteps.tolist() == kept and d.num_timesteps == len(kept)
    assert (d.variance, d.prediction) == ('learned_range', 'v')
    t = torch.arange(d.num_timesteps)
    assert d.model_timesteps(t).tolist() == kept


@pytest.mark.parametrize('spacing', ['abc', 'ddim', 'ddimx', 'ddim7', 'ddim11', '11', '0', '5,,5', '-3', '6,4', '2.5'])
def test_bad_respacing_raises_one_line_value_error_naming_the_string(spacing):
    with pytest.raises(ValueError) as info:
        VPDiffusion(beta_schedule('cosine', 10)).respace(spacing)
    assert isinstance(info.value, VPDiffusionError)
    message = str(info.value)
    assert repr(spacing) in message and '\n' not in message


def toy_eps_net(mu: float, s: float, log_sigmas: np.ndarray, prediction: str = 'eps'):
    """The exact ε (or v) predictor for data N(mu, s²), at fractional timesteps through log σ interpolation."""

    def net(x_t, t, labels=None):
        sigma = np.exp(np.interp(t.double().numpy(), np.arange(len(log_sigmas)), log_sigmas))
        a = torch.as_tensor(1 / (1 + sigma**2), dtype=x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        var_t = a * s**2 + 1 - a
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / var_t
        x0 = mu + a.sqrt() * s**2 * (x_t - a.sqrt() * mu) / var_t
        out = eps if prediction == 'eps' else a.sqrt() * eps - (1 - a).sqrt() * x0
        return torch.cat([out, torch.zeros_like(out)], 1)  # A learned-variance layout: only the first half counts.

    return net


def test_vp_denoiser_preconditioning_equals_edm_table_1():
    betas = beta_schedule('linear')
    sigmas = np.sqrt((1 - alphas_cumprod(betas)) / alphas_cumprod(betas))
    den = VPDenoiser(torch.nn.Identity(), VPDiffusion(betas), img_resolution=8, img_channels=3, label_dim=10)
    assert (den.sigma_min, den.sigma_max) == pytest.approx((sigmas[0], sigmas[-1]), rel=1e-12)
    sigma = torch.as_tensor(sigmas[[0, 1, 17, 500, 998, 999]])
    c_skip, c_out, c_in, c_noise = den.preconditioning(sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 1).sqrt())
    torch.testing.assert_close(c_noise, torch.tensor([0, 1, 17, 500, 998, 999], dtype=torch.float64))
    between = torch.as_tensor(np.sqrt(sigmas[[10, 600]] * sigmas[[11, 601]]))  # Midway in log σ.
    torch.testing.assert_close(den.preconditioning(between)[3], torch.tensor([10.5, 600.5], dtype=torch.float64))
    outside = den.preconditioning(torch.tensor([1e-4, 1e4], dtype=torch.float64))[3]
    assert outside.tolist() == [0, 999]


def test_vp_denoiser_of_a_respaced_schedule_gives_original_timesteps():
    d = VPDiffusion(beta_schedule('cosine')).respace('ddim25')
    den = VPDenoiser(torch.nn.Identity(), d, 8, 3)
    assert den.preconditioning(d.sigmas[[0, 1, 24]])[3].tolist() == pytest.approx([0, 40, 960], abs=1e-9)


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_vp_denoiser_of_the_exact_toy_net_is_the_exact_edm_denoiser(prediction):
    mu, s = 0.3, 0.6
    diffusion = VPDiffusion(beta_schedule('linear'), prediction=prediction)
    log_sigmas = diffusion.sigmas.log().numpy()
    den = VPDenoiser(toy_eps_net(mu, s, log_sigmas, prediction), diffusion, img_resolution=2, img_channels=1)
    x = torch.randn([5, 1, 2, 2], generator=torch.Generator().manual_seed(0)) * 3
    for sigma in [0.02, 0.37, 1.0, 14.2, 150.0]:
        expected = mu + s**2 / (s**2 + sigma**2) * (x - mu)
        torch.testing.assert_close(den(x, sigma), expected, rtol=1e-4, atol=1e-5)
    sigma = torch.tensor([0.1, 1.0, 3.0, 10.0, 60.0])
    expected = mu + s**2 / (s**2 + sigma**2).reshape(-1, 1, 1, 1) * (x - mu)
    torch.testing.assert_close(den(x, sigma.reshape(-1, 1, 1, 1)), expected, rtol=1e-4, atol=1e-5)


def test_exported_denoiser_holds_one_copy_of_the_net():
    net = VPDiT(img_resolution=8, img_channels=4, label_dim=10, patch_size=2, hidden_size=192, depth=2, num_heads=3)
    den = VPLoss().export(copy.deepcopy(net)).to(torch.float16)  # as a snapshot stores it
    weight_bytes = 2 * sum(p.numel() for p in net.parameters())  # 3.2 MB; sources and schedule add ~0.2 MB
    assert den.init_args[0].x_embedder.proj.weight.dtype == torch.float16
    assert weight_bytes < len(pickle.dumps(den)) < 1.2 * weight_bytes
