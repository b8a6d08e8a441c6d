"""Tests for training/cascade.py: caption dropout, low-res degradation, guided stage sampling, and
that class-conditional and unconditional EDM2 nets are unchanged by the text additions."""

import numpy as np
import pytest
import torch
from test_networks_edm2 import TINY, reference_precond, tiny_precond
from test_networks_text import tiny_text_net

from training import generation
from training.cascade import TextEDM2Loss, downsample, gaussian_blur
from training.networks_text import TextPrecond

pytestmark = pytest.mark.usefixtures('one_thread')


class RecordingNet:
    """Stands in for a net: records the labels and kwargs of each call, predicts zeros."""

    sigma_data = 0.5

    def __init__(self, lowres: int | None = None):
        self.lowres, self.calls = lowres, []

    def __call__(self, x, sigma, labels=None, return_logvar=False, **kwargs):
        self.calls.append((labels, kwargs))
        return torch.zeros_like(x), torch.zeros([x.shape[0], 1, 1, 1])


def test_caption_dropout_replaces_the_given_fraction_by_the_empty_caption():
    torch.manual_seed(0)
    captions = [f'caption {i}' for i in range(4000)]
    dropped = TextEDM2Loss(caption_dropout=0.25).drop_captions(captions)
    empty = np.array([c == '' for c in dropped])
    assert abs(empty.mean() - 0.25) < 0.03  # binomial std 0.007
    assert all(d in ('', c) for d, c in zip(dropped, captions))
    assert TextEDM2Loss(caption_dropout=0).drop_captions(captions) == captions
    assert set(TextEDM2Loss(caption_dropout=1).drop_captions(captions)) == {''}
    onehot = torch.eye(3)
    assert TextEDM2Loss(caption_dropout=1).drop_captions(onehot) is onehot


def test_loss_passes_dropped_captions_and_degraded_lowres_to_the_net():
    torch.manual_seed(0)
    images = torch.randn(64, 3, 8, 8)
    net = RecordingNet(lowres=4)
    loss = TextEDM2Loss(caption_dropout=0.5, blur_prob=0, aug_max=0)(net, images, ['a'] * 64)
    assert loss.shape == images.shape
    labels, kwargs = net.calls[0]
    assert 10 < labels.count('') < 54 and set(labels) == {'', 'a'}
    box = images.reshape(64, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 box filter, computed independently
    torch.testing.assert_close(kwargs['lowres'], box)
    torch.testing.assert_close(kwargs['aug_sigma'], torch.zeros(64))
    TextEDM2Loss(aug_max=0.3)(net, images, ['a'] * 64)
    aug = net.calls[-1][1]['aug_sigma']
    assert 0 <= float(aug.min()) and float(aug.max()) <= 0.3 and float(aug.std()) > 0.05


def test_gaussian_blur_kernel_has_unit_mass_and_the_requested_variance():
    delta = torch.zeros(3, 1, 21, 21)
    delta[:, :, 10, 10] = 1
    sigma = torch.tensor([0.0, 0.6, 1.2])
    blurred = gaussian_blur(delta, sigma)
    torch.testing.assert_close(blurred.sum(dim=(1, 2, 3)), torch.ones(3))
    torch.testing.assert_close(blurred[0], delta[0])
    offsets = torch.arange(21.0) - 10
    variance = (blurred[:, 0].sum(dim=1) * offsets**2).sum(dim=1)
    torch.testing.assert_close(variance[1:], sigma[1:] ** 2, atol=0.02, rtol=0.02)  # discretised Gaussian
    torch.testing.assert_close(downsample(delta, 7).sum(dim=(2, 3)) * 9, torch.ones(3, 1))


def test_guided_stage_equals_the_classifier_free_guidance_formula():
    net = tiny_text_net()
    with torch.no_grad():
        net.unet.out_gain.fill_(1)
        for p in net.unet.emb_text.parameters():
            p.mul_(3)
    seeds, captions, w, sigma = [4, 9], ['red', 'blue square'], 2.5, 1.3
    noise = torch.stack([torch.randn([3, 8, 8], generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        out = generation.sample(net, seeds, captions=captions, guidance=w, num_steps=1, sigma_max=sigma).latents
        x = noise * sigma
        d, d_u = net(x, sigma, captions), net(x, sigma, ['', ''])
    assert not torch.allclose(d, d_u)
    torch.testing.assert_close(out, d_u + w * (d - d_u), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# The text additions leave EDM2's nets alone: class-conditional and unconditional Precond equal the plain
# float64 reference of EDM2 Fig. 21 and EDM Table 1 (tests/test_networks_edm2.py), and a TextPrecond
# without text and low-resolution input is that same function.


@pytest.mark.parametrize('label_dim', [0, 10])
def test_class_conditional_and_unconditional_nets_are_unchanged_by_the_text_additions(label_dim):
    torch.manual_seed(0)
    net = tiny_precond(label_dim=label_dim)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[1, 8]] if label_dim else None
    for sigma in (0.05, 1.0, 20.0):
        expected = reference_precond(net, x, sigma, labels)
        torch.testing.assert_close(net(x, sigma, labels).double(), expected, rtol=1e-4, atol=1e-4)
    if not label_dim:
        text_net = TextPrecond(**{**TINY, 'label_dim': 0, 'text_channels': 0}).eval()
        text_net.load_state_dict(net.state_dict(), strict=True)
        for sigma in (0.05, 1.0, 20.0):
            torch.testing.assert_close(text_net(x, sigma), net(x, sigma), rtol=0, atol=0)
