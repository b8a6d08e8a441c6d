import math

import numpy as np
import pytest
import torch

from training.training_loop import EDM2Loss, learning_rate_schedule


def test_learning_rate_is_flat_until_t_ref_then_inverse_sqrt():
    # batch 16, t_ref = 100 batches = 1600 images; no warm-up.
    lr = lambda nimg: learning_rate_schedule(nimg, 16, ref_lr=0.01, ref_batches=100, rampup_Mimg=0)
    assert lr(16) == pytest.approx(0.01)
    assert lr(1600) == pytest.approx(0.01)
    assert lr(6400) == pytest.approx(0.005)  # t = 4 t_ref -> alpha_ref / 2
    assert lr(160000) == pytest.approx(0.001)  # t = 100 t_ref -> alpha_ref / 10


def test_learning_rate_warms_up_linearly():
    # Warm-up over 0.0008 Mimg = 800 images, decay far away.
    lr = lambda nimg: learning_rate_schedule(nimg, 16, ref_lr=0.01, ref_batches=1e9, rampup_Mimg=0.0008)
    assert lr(0) == 0
    assert lr(200) == pytest.approx(0.0025)
    assert lr(400) == pytest.approx(0.005)
    assert lr(800) == pytest.approx(0.01)
    assert lr(8000) == pytest.approx(0.01)


class _RecordingNet(torch.nn.Module):
    """Returns D = 0 and logvar = ln(sigma), and records what the loss fed it."""

    def forward(self, x, sigma, labels, return_logvar=False):
        self.x, self.sigma = x, sigma
        return torch.zeros_like(x), sigma.log()


def test_edm2_loss_matches_formula_and_noise_distribution():
    torch.manual_seed(0)
    net, sigma_data = _RecordingNet(), 0.5
    images = torch.randn([4096, 1, 2, 2])
    loss = EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=sigma_data)(net, images)
    sigma = net.sigma
    assert sigma.shape == (4096, 1, 1, 1)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    expected = weight / sigma * images**2 + sigma.log()
    torch.testing.assert_close(loss, expected)

    # ln(sigma) ~ N(P_mean, P_std^2); the noise is N(0, sigma^2).
    ln_sigma = sigma.log().flatten().double()
    assert ln_sigma.mean().item() == pytest.approx(-0.4, abs=4 / math.sqrt(4096))
    assert ln_sigma.std().item() == pytest.approx(1.0, abs=0.05)
    unit_noise = ((net.x - images) / sigma).flatten().double()
    assert unit_noise.mean().item() == pytest.approx(0, abs=4 / math.sqrt(unit_noise.numel()))
    assert unit_noise.std().item() == pytest.approx(1, abs=0.03)


def test_edm2_loss_weight_gives_unit_loss_at_initialisation_for_unit_data():
    # At init c_out * F = 0, so D = c_skip * (y + n) and the weighted error has expectation 1 for any sigma.
    torch.manual_seed(1)
    sigma_data = 0.5

    class SkipOnly(torch.nn.Module):
        def forward(self, x, sigma, labels, return_logvar=False):
            return sigma_data**2 / (sigma**2 + sigma_data**2) * x, torch.zeros_like(sigma)

    images = torch.randn([8192, 1, 4, 4]) * sigma_data
    loss = EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=sigma_data)(SkipOnly(), images)
    assert loss.mean().item() == pytest.approx(1.0, rel=0.03)
    assert np.isfinite(loss.numpy()).all()


class NaNLoss(EDM2Loss):
    """The EDM2 loss with every value replaced by NaN, as a diverged run produces."""

    def __call__(self, net, images, labels=None):
        return super().__call__(net, images, labels) * float('nan')


def test_nan_loss_zeroes_gradients_and_stops_with_a_clear_error(tmp_path, monkeypatch):
    import json
    import os

    import train_edm2
    from training.training_loop import TrainingError, training_loop

    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    c = train_edm2.setup_training_config(
        'demo-tiny',
        None,
        cond=True,
        workers=0,
        fp16=False,
        bf16=False,
        ls=1,
        bench=False,
        snapshot_fp32=False,
        seed=0,
        vae='unused',
    )
    c.loss_kwargs.class_name = 'test_training_loop.NaNLoss'
    c.update(total_nimg=64, status_nimg=32, snapshot_nimg=None, checkpoint_nimg=None)
    run_dir = str(tmp_path / 'run')
    os.makedirs(run_dir)
    with pytest.raises(TrainingError, match='diverged: the loss is nan at kimg 0.0'):
        training_loop(run_dir=run_dir, device=torch.device('cpu'), **c)
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(stats) == 2 and np.isnan(stats[1]['Loss/loss'])  # The diverged interval is logged, then the run stops.
    assert stats[1]['Loss/nonfinite_grads'] > 0  # Every gradient element was NaN, counted and zeroed.
