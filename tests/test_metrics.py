"""Fréchet distance, feature statistics and statistics files, checked against independent computations."""

import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

from training.metrics import (
    FeatureStats,
    MetricsError,
    calculate_metrics_from_stats,
    calculate_stats_for_iterable,
    frechet_distance,
    load_stats,
    parse_metrics,
    save_stats,
)


def _random_stats(dim: int, num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=[num, dim]) @ rng.normal(size=[dim, dim]) + rng.normal(size=dim)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _fd_by_eigenvalues(mu1, sigma1, mu2, sigma2) -> float:
    # Tr((Σ₁Σ₂)^½) = Σ √λ(√Σ₁ Σ₂ √Σ₁), with √Σ₁ from a symmetric eigendecomposition.
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(np.clip(lam, 0, None)))
    )


@pytest.mark.parametrize('dim', [8, 64])
def test_frechet_distance_matches_eigenvalue_formula(dim):
    a, b = _random_stats(dim, 500, 1), _random_stats(dim, 500, 2)
    expected = _fd_by_eigenvalues(*a, *b)
    assert frechet_distance(*a, *b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_scipy_sqrtm_of_product():
    (mu1, s1), (mu2, s2) = _random_stats(16, 100, 3), _random_stats(16, 100, 4)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_stats_is_zero_even_when_singular():
    mu, sigma = _random_stats(64, 500, 5)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    mu, sigma = _random_stats(64, 20, 6)  # 20 samples in 64 dimensions: rank 19
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Near-constant features: Σxxᵀ − nμμᵀ leaves only round-off, an indefinite matrix of size ~1e-15.
    stats = FeatureStats(8, 'cpu')
    stats.append(3 + torch.from_numpy(np.random.default_rng(7).normal(size=[10, 8]) * 1e-9))
    mu, sigma = stats.mu_sigma().values()
    assert np.linalg.eigvalsh(sigma)[0] < 0
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_rejects_non_covariances():
    sigma = np.diag([1.0, 1.0, -4.0])  # its square root would be imaginary
    with pytest.raises(MetricsError, match='first covariance is not positive semi-definite'):
        frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3))
    with pytest.raises(MetricsError, match='different sizes'):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy_mean_and_cov():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=[37, 5]) * 10 + 3).float()
    stats = FeatureStats(5, 'cpu')
    for chunk in x.split(8):
        stats.append(chunk)
    result = stats.mu_sigma()
    np.testing.assert_allclose(result['mu'], x.double().numpy().mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(result['sigma'], np.cov(x.double().numpy(), rowvar=False), rtol=1e-10)
    assert result['mu'].dtype == result['sigma'].dtype == np.float64


class _ChannelMeans(torch.nn.Module):
    """A stand-in detector: per-channel means and mean squares, 6 features."""

    feature_dim = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean(dim=[2, 3]), (x**2).mean(dim=[2, 3])], dim=1)


def test_stats_for_iterable_equal_direct_computation():
    images = torch.randint(0, 256, [10, 3, 4, 4], dtype=torch.uint8)
    stats = calculate_stats_for_iterable(
        images.split(3), ['fid'], detectors={'fid': _ChannelMeans()}, device='cpu', verbose=False
    )
    features = _ChannelMeans()(images).double().numpy()
    np.testing.assert_allclose(stats['fid']['mu'], features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats['fid']['sigma'], np.cov(features, rowvar=False), rtol=1e-9)


def test_stats_for_iterable_rejects_non_rgb_batches():
    with pytest.raises(MetricsError, match='3 channels, got 1'):
        calculate_stats_for_iterable(
            [torch.zeros([2, 1, 4, 4], dtype=torch.uint8)],
            ['fid'],
            detectors={'fid': _ChannelMeans()},
            device='cpu',
            verbose=False,
        )


def test_stats_files_round_trip_as_pkl_and_npz(tmp_path):
    stats = {m: dict(zip(('mu', 'sigma'), _random_stats(4, 50, i))) for i, m in enumerate(['fid', 'fd_dinov2'])}
    for name in ('ref.pkl', 'ref.npz'):
        save_stats(stats, str(tmp_path / name))
        loaded = load_stats(str(tmp_path / name))
        assert loaded.keys() == stats.keys()
        for m in stats:
            np.testing.assert_array_equal(loaded[m]['mu'], stats[m]['mu'])
            np.testing.assert_array_equal(loaded[m]['sigma'], stats[m]['sigma'])
    with open(tmp_path / 'ref.pkl', 'rb') as f:  # EDM2's layout: a plain pickle of {metric: {'mu', 'sigma'}}
        assert set(pickle.load(f)['fid']) == {'mu', 'sigma'}


def test_single_metric_npz_is_named_by_feature_count(tmp_path):
    np.savez(tmp_path / 'fid.npz', mu=np.zeros(2048), sigma=np.eye(2048))
    assert list(load_stats(str(tmp_path / 'fid.npz'))) == ['fid']
    np.savez(tmp_path / 'odd.npz', mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(MetricsError, match='7 features'):
        load_stats(str(tmp_path / 'odd.npz'))


def test_bad_statistics_files_give_one_line(tmp_path):
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle')
    for path in (tmp_path / 'junk.pkl', tmp_path / 'missing.pkl'):
        with pytest.raises(MetricsError) as info:
            load_stats(str(path))
        assert '\n' not in str(info.value)


def test_reference_without_requested_metric_says_how_to_make_it():
    stats = {'fid': dict(zip(('mu', 'sigma'), _random_stats(4, 50, 0)))}
    with pytest.raises(MetricsError, match='ref.pkl holds no "fd_dinov2" statistics .*--metrics=fid,fd_dinov2'):
        calculate_metrics_from_stats({**stats, 'fd_dinov2': stats['fid']}, stats, ref_name='ref.pkl')


def test_parse_metrics():
    assert parse_metrics('fid, fd_dinov2,fid') == ['fid', 'fd_dinov2']
    with pytest.raises(MetricsError, match='Unknown metric "is"'):
        parse_metrics('fid,is')
