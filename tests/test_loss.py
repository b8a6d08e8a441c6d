"""Tests of training/loss.py: the EDM2 loss against its formula and noise distribution, sigma_data from the
net, the learning-rate schedule, and the default training-loop hooks."""

import math

import numpy as np
import pytest
import torch

from training.loss import P_MEAN, P_STD, EDM2Loss, TrainingLoss, learning_rate_schedule


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

    sigma_data = 0.5

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


def test_edm2_loss_reads_sigma_data_from_the_net_unless_given():
    class Net(_RecordingNet):
        sigma_data = 0.1

    images = torch.randn([64, 1, 2, 2])
    for loss_fn, sigma_data in ((EDM2Loss(), 0.1), (EDM2Loss(sigma_data=0.7), 0.7)):
        torch.manual_seed(2)
        net = Net()
        loss = loss_fn(net, images)
        sigma = net.sigma
        expected = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2 / sigma * images**2 + sigma.log()
        torch.testing.assert_close(loss, expected)


def test_ddp_wrapped_net_gives_its_sigma_data_through_module():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    inner = _RecordingNet()
    inner.sigma_data = 0.25
    torch.manual_seed(3)
    loss = EDM2Loss()(Wrapper(inner), torch.ones([8, 1, 1, 1]))
    sigma = inner.sigma
    torch.testing.assert_close(loss, (sigma**2 + 0.0625) / (sigma * 0.25) ** 2 / sigma + sigma.log())


def test_default_hooks_accumulate_the_scaled_sum_of_the_losses_of_all_rounds():
    class Quadratic(TrainingLoss):
        def __call__(self, net, images, labels=None):
            return (net * images) ** 2

    w = torch.tensor(2.0, requires_grad=True)
    batches = iter([(torch.tensor([1.0, 2.0]), None), (torch.tensor([3.0]), None), (torch.tensor([5.0]), None)])
    loss = Quadratic()
    loss.accumulate(w, batches, num_rounds=2, scale=0.5)
    # d/dw of 0.5 * w^2 (1 + 4 + 9) = 14 w; the third batch stays unread.
    assert w.grad.item() == pytest.approx(28.0)
    assert next(batches)[0].item() == 5.0
    assert loss.grid_conditioning(None, None, None, 16, 'cpu') == {} and loss.report(None, None, {}, 'cpu') is None
    assert (loss.P_mean, loss.P_std) == (P_MEAN, P_STD) == (EDM2Loss().P_mean, EDM2Loss().P_std)


def test_options_files_written_before_the_loss_module_still_name_valid_components():
    import dnnlib

    assert dnnlib.util.get_obj_by_name('training.training_loop.EDM2Loss') is EDM2Loss
    assert dnnlib.util.get_obj_by_name('training.training_loop.learning_rate_schedule') is learning_rate_schedule
    old_sr = dnnlib.util.construct_class_by_name(class_name='training.cascade.TextEDM2Loss', sigma_data=0.1)
    assert old_sr.sigma_data == 0.1 and EDM2Loss().sigma_data is None  # None: the net's own sigma_data.
