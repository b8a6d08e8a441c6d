"""Tests for training/sampling.py: the EDM sampler against closed forms, guidance, per-seed noise."""

import math

import pytest
import torch

from training.sampling import StackedRandomGenerator, edm_sampler, sigma_steps

MU = torch.tensor([0.3, -0.5], dtype=torch.float64).reshape(1, 2, 1, 1)
S = torch.tensor([0.7, 0.2], dtype=torch.float64).reshape(1, 2, 1, 1)


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
    # E[y | y + n = x] for y ~ N(MU, S^2), n ~ N(0, sigma^2).
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


class CountingNet(torch.nn.Module):
    """A tiny conv denoiser that counts its evaluations and checks the labels it receives."""

    def __init__(self, seed: int, label_dim: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn([2, 3, 3, 3], generator=gen) * 0.3, requires_grad=False)
        self.label_weight = torch.nn.Parameter(torch.randn([label_dim, 2], generator=gen), requires_grad=False)
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        x = x.to(torch.float32)
        c_in = 1 / (sigma**2 + 0.25).sqrt()
        inp = torch.cat([c_in * x, torch.log(sigma).expand(x.shape[0], 1, *x.shape[2:]) / 4], dim=1)
        out = torch.nn.functional.conv2d(inp, self.weight, padding=1)
        if labels is not None:
            out = out + (labels.to(torch.float32) @ self.label_weight).reshape(-1, 2, 1, 1)
        return 0.25 / (sigma**2 + 0.25) * x + sigma * 0.5 / (sigma**2 + 0.25).sqrt() * out


def test_sigma_steps_are_linear_in_sigma_to_the_one_over_rho() -> None:
    t = sigma_steps(9, 0.002, 80, 7, torch.float64, torch.device('cpu'))
    assert len(t) == 10 and t[-1] == 0
    assert math.isclose(t[0].item(), 80, rel_tol=1e-12) and math.isclose(t[-2].item(), 0.002, rel_tol=1e-12)
    root = t[:-1] ** (1 / 7)
    steps = root[1:] - root[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 8))


def test_deterministic_sampler_converges_to_the_exact_ode_solution_at_second_order() -> None:
    # For Gaussian data the probability-flow ODE is linear: x(0) = MU + (x(sigma) - MU) * S / sqrt(S^2 + sigma^2).
    noise = torch.randn([64, 2, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = MU + (noise * 80 - MU) * S / (S**2 + 80**2).sqrt()
    errors = [
        (edm_sampler(gaussian_denoiser, noise, num_steps=n, dtype=torch.float64) - exact).abs().max().item()
        for n in (32, 128)
    ]
    assert errors[1] < 2e-3
    assert errors[0] / errors[1] > 10  # Heun: 4x the steps, ~16x less error; Euler would give ~4x


@pytest.mark.parametrize('S_churn', [0, 40])
def test_samples_of_gaussian_data_match_mean_and_std(S_churn: float) -> None:
    n = 4096
    rnd = StackedRandomGenerator('cpu', range(n))
    noise = rnd.randn([n, 2, 2, 2], dtype=torch.float64)
    out = edm_sampler(
        gaussian_denoiser,
        noise,
        num_steps=128,
        S_churn=S_churn,
        S_min=0.01,
        S_max=10,
        dtype=torch.float64,
        randn_like=rnd.randn_like,
    )
    samples = out.permute(1, 0, 2, 3).reshape(2, -1)  # per channel; all values are independent draws
    m = samples.shape[1]
    for c in range(2):
        mu, s = MU.flatten()[c].item(), S.flatten()[c].item()
        assert abs(samples[c].mean().item() - mu) < 4 * s / math.sqrt(m)
        assert abs(samples[c].std().item() - s) < 4 * s / math.sqrt(2 * m)


def test_heun_evaluates_the_net_twice_per_step_except_the_last() -> None:
    net = CountingNet(0)
    edm_sampler(net, torch.randn([2, 2, 8, 8]), num_steps=7)
    assert net.calls == 2 * 7 - 1


def test_guidance_one_never_evaluates_the_guiding_net() -> None:
    net, gnet = CountingNet(0), CountingNet(1)
    edm_sampler(net, torch.randn([2, 2, 8, 8]), gnet=gnet, num_steps=5, guidance=1)
    assert gnet.calls == 0 and net.calls == 9


def test_guidance_single_step_equals_formula() -> None:
    # One step from sigma to 0 is a single Euler step, which lands exactly on the denoised estimate.
    net, gnet, w, sigma = CountingNet(0, label_dim=3), CountingNet(1, label_dim=3), 1.7, 2.5
    noise = torch.randn([3, 2, 8, 8], generator=torch.Generator().manual_seed(1))
    labels = torch.eye(3)[[2, 0, 1]]
    out = edm_sampler(net, noise, labels=labels, gnet=gnet, num_steps=1, sigma_max=sigma, guidance=w)
    x = noise * sigma
    d, d_g = net(x, torch.tensor(sigma), labels), gnet(x, torch.tensor(sigma), labels)
    torch.testing.assert_close(out, d_g + w * (d - d_g), atol=1e-5, rtol=1e-5)


def test_guided_sampling_equals_sampling_a_combined_denoiser() -> None:
    net, gnet, w = CountingNet(0), CountingNet(1), 2.3
    noise = torch.randn([2, 2, 8, 8], generator=torch.Generator().manual_seed(2))
    combined = lambda x, sigma, labels: gnet(x, sigma) + w * (net(x, sigma) - gnet(x, sigma))
    out = edm_sampler(net, noise, gnet=gnet, num_steps=6, guidance=w)
    ref = edm_sampler(combined, noise, num_steps=6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match='guiding network'):
        edm_sampler(net, noise, num_steps=2, guidance=w)


def test_stacked_generator_draws_each_images_noise_then_class_from_its_own_seed() -> None:
    seeds = [7, 123, 5]
    rnd = StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([3, 2, 4, 4])
    classes = rnd.randint(10, size=[3])
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        torch.testing.assert_close(noise[i], torch.randn([2, 4, 4], generator=gen), rtol=0, atol=0)
        assert classes[i].item() == torch.randint(10, [], generator=gen).item()


def test_churned_image_does_not_depend_on_the_other_seeds_in_its_batch() -> None:
    def sample(seeds: list[int]) -> torch.Tensor:
        rnd = StackedRandomGenerator('cpu', seeds)
        return edm_sampler(
            gaussian_denoiser,
            rnd.randn([len(seeds), 2, 4, 4], dtype=torch.float64),
            num_steps=8,
            S_churn=20,
            dtype=torch.float64,
            randn_like=rnd.randn_like,
        )

    torch.testing.assert_close(sample([1, 42, 3])[1], sample([42])[0], rtol=0, atol=0)
