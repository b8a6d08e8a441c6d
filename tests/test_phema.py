import numpy as np
import pytest
import scipy.integrate
import torch

from training import phema


class Trajectory(torch.nn.Module):
    """A toy net whose parameters are chosen by the test at each step; the buffer counts steps."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros([2], dtype=torch.float64))
        self.register_buffer('step', torch.zeros([], dtype=torch.int64))


def unit_profile(t: float, std: float):
    """Unit-mass power profile p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t], evaluated independently."""
    g = phema.std_to_exp(std)
    return lambda tau: (g + 1) * tau**g / t ** (g + 1) if 0 <= tau <= t else 0.0


@pytest.mark.parametrize('exp', [-0.2, 0.0, 1.5, 6.94, 16.97, 100.0])
def test_std_to_exp_inverts_exp_to_std(exp):
    assert phema.std_to_exp(phema.exp_to_std(exp)) == pytest.approx(exp, rel=1e-9, abs=1e-9)


def test_std_to_exp_matches_paper_values_and_broadcasts():
    # EDM2 §3.1: σ_rel 0.05 ↔ γ 16.97 and σ_rel 0.10 ↔ γ 6.94.
    np.testing.assert_allclose(phema.std_to_exp(np.array([0.05, 0.10])), [16.97, 6.94], atol=5e-3)
    assert phema.std_to_exp(np.full([2, 3], 0.1)).shape == (2, 3)


@pytest.mark.parametrize('std', [0.01, 0.05, 0.1, 0.2, 0.28])
def test_exp_to_std_is_relative_std_of_profile(std):
    p = unit_profile(1.0, std)
    mass = scipy.integrate.quad(p, 0, 1)[0]
    mean = scipy.integrate.quad(lambda x: x * p(x), 0, 1)[0]
    var = scipy.integrate.quad(lambda x: (x - mean) ** 2 * p(x), 0, 1)[0]
    assert mass == pytest.approx(1, rel=1e-7)
    assert np.sqrt(var) == pytest.approx(std, rel=1e-6)


@pytest.mark.parametrize('std', [0.0, -0.1, 0.31])
def test_std_to_exp_rejects_stds_without_profile(std):
    with pytest.raises(ValueError):
        phema.std_to_exp(std)


@pytest.mark.parametrize(
    'a_ofs, a_std, b_ofs, b_std',
    [
        (10, 0.05, 10, 0.05),
        (3, 0.10, 10, 0.05),
        (10, 0.05, 3, 0.10),
        (7, 0.2, 8, 0.01),
        (1, 0.15, 4, 0.15),
    ],
)
def test_correlation_matches_numerical_integration(a_ofs, a_std, b_ofs, b_std):
    pa, pb = unit_profile(a_ofs, a_std), unit_profile(b_ofs, b_std)
    end = min(a_ofs, b_ofs)
    expected = scipy.integrate.quad(lambda x: pa(x) * pb(x), 0, end, limit=200, epsabs=0, epsrel=1e-10)[0]
    assert phema.power_function_correlation(a_ofs, a_std, b_ofs, b_std) == pytest.approx(expected, rel=1e-7)


def test_correlation_broadcasts_and_is_symmetric():
    ofs, std = np.array([1.0, 2.0, 5.0])[:, None], np.array([0.05, 0.1, 0.2])[:, None]
    A = phema.power_function_correlation(ofs, std, ofs.T, std.T)
    assert A.shape == (3, 3)
    np.testing.assert_allclose(A, A.T, rtol=1e-12)
    assert np.all(np.linalg.eigvalsh(A) > 0)  # a Gram matrix of independent profiles


def test_beta_telescopes_to_profile_weight():
    # Π β over steps from t0 to T = (t0/T)^(γ+1): the weight the profile leaves on [0, t0].
    std, dt, t0, steps = 0.1, 3.0, 30.0, 500
    betas = [phema.power_function_beta(std, t0 + k * dt, dt) for k in range(1, steps + 1)]
    expected = (t0 / (t0 + steps * dt)) ** (phema.std_to_exp(std) + 1)
    assert np.prod(betas) == pytest.approx(expected, rel=1e-10)
    assert phema.power_function_beta(std, dt, dt) == 0  # the first step replaces the average


@pytest.mark.parametrize('std', [0.05, 0.10, 0.2])
def test_ema_tracks_power_function_average(std):
    # θ(t) = (t/T, (t/T)²); continuous average ∫τ^γ f dτ / ∫τ^γ dτ = ((γ+1)/(γ+2), (γ+1)/(γ+3)).
    net, batch, steps = Trajectory(), 4, 1000
    ema = phema.PowerFunctionEMA(net, stds=[std])
    T = batch * steps
    for k in range(1, steps + 1):
        with torch.no_grad():
            net.theta.copy_(torch.tensor([k / steps, (k / steps) ** 2]))
            net.step.fill_(k)
        ema.update(cur_nimg=k * batch, batch_size=batch)
    ((ema_net, ema_std),) = ema.get()
    g = phema.std_to_exp(std)
    analytic = np.array([(g + 1) / (g + 2), (g + 1) / (g + 3)])
    # Each step holds f at its right end, so the average exceeds the integral by at most Δt·max f'.
    excess = ema_net.theta.detach().numpy() - analytic
    assert ema_std == std and int(ema_net.step) == steps
    assert np.all(excess >= -1e-12)
    assert np.all(excess <= np.array([1, 2]) * batch / T)


def test_ema_copies_are_frozen_deep_copies():
    net = Trajectory()
    ema = phema.PowerFunctionEMA(net)
    assert [s for _, s in ema.get()] == [0.050, 0.100]
    for ema_net, _ in ema.get():
        assert ema_net is not net and not ema_net.training
        assert not any(p.requires_grad for p in ema_net.parameters())
    with torch.no_grad():
        net.theta.fill_(5)
    assert all(float(e.theta.sum()) == 0 for e, _ in ema.get())
    ema.reset()
    assert all(float(e.theta.sum()) == 10 for e, _ in ema.get())


def test_ema_state_dict_round_trips():
    net = Trajectory()
    ema = phema.PowerFunctionEMA(net)
    with torch.no_grad():
        net.theta.copy_(torch.tensor([1.0, 2.0]))
    ema.update(cur_nimg=8, batch_size=8)
    other = phema.PowerFunctionEMA(Trajectory())
    other.load_state_dict(ema.state_dict())
    for (a, _), (b, _) in zip(ema.get(), other.get()):
        assert torch.equal(a.theta, b.theta)
    with pytest.raises(ValueError, match='stds'):
        phema.PowerFunctionEMA(Trajectory(), stds=[0.2]).load_state_dict(ema.state_dict())


def test_posthoc_coefficients_rebuild_target_profile():
    in_ofs = np.repeat(np.arange(1, 17), 2) * 10.0
    in_std = np.tile([0.05, 0.10], 16)
    out_ofs, out_std = np.array([160.0, 160.0, 90.0]), np.array([0.07, 0.15, 0.07])
    coefs = phema.solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std)
    assert coefs.shape == (32, 3) and coefs.dtype == np.float64
    assert np.all(coefs[in_ofs > 90, 2] == 0)  # snapshots after the target take no part
    for j in range(3):
        target = unit_profile(out_ofs[j], out_std[j])
        parts = [unit_profile(t, s) for t, s in zip(in_ofs, in_std)]
        err = lambda x: (sum(c * p(x) for c, p in zip(coefs[:, j], parts)) - target(x)) ** 2
        sq = sum(scipy.integrate.quad(err, a, a + 10, limit=100)[0] for a in range(0, int(out_ofs[j]), 10))
        norm = scipy.integrate.quad(lambda x: target(x) ** 2, 0, out_ofs[j], limit=200)[0]
        assert np.sqrt(sq / norm) < 0.02


def test_posthoc_coefficients_select_matching_snapshot():
    in_ofs, in_std = [0, 5, 10, 10, 20], [0.05, 0.05, 0.05, 0.10, 0.05]
    coefs = phema.solve_posthoc_coefficients(in_ofs, in_std, [10, 10], [0.10, 0.05])
    np.testing.assert_allclose(coefs, [[0, 0], [0, 0], [0, 1], [1, 0], [0, 0]], atol=1e-8)


@torch.no_grad()
def test_classic_ema_beside_power_function_emas_follows_its_recurrence():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = phema.PowerFunctionEMA(net, stds=[0.1], betas=[0.9, 0.5])
    expected = {beta: [p.clone() for p in net.parameters()] for beta in (0.9, 0.5)}
    for step in range(1, 6):
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        ema.update(cur_nimg=8 * step, batch_size=8)
        for beta, tensors in expected.items():
            for e, p in zip(tensors, net.parameters()):
                e.mul_(beta).add_((1 - beta) * p)  # ema <- beta ema + (1 - beta) net
    assert len(ema.get()) == 1 and [b for _, b in ema.classic()] == [0.9, 0.5]
    for (module, beta), tensors in zip(ema.classic(), expected.values()):
        for got, want in zip(module.parameters(), tensors):
            torch.testing.assert_close(got, want)
    state = ema.state_dict()
    other = phema.PowerFunctionEMA(torch.nn.Linear(3, 2), stds=[0.1], betas=[0.9, 0.5])
    other.load_state_dict(state)
    assert torch.equal(other.classic()[1][0].weight, ema.classic()[1][0].weight)
    with pytest.raises(ValueError, match='decays'):
        phema.PowerFunctionEMA(torch.nn.Linear(3, 2), stds=[0.1]).load_state_dict(state)
    old = dict(stds=[0.1], emas=state['emas'][:1])  # written before classic EMAs existed
    phema.PowerFunctionEMA(torch.nn.Linear(3, 2), stds=[0.1]).load_state_dict(old)
