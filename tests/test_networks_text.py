"""Tests for training/networks_text.py: MP cross-attention, text-conditioned and super-resolution Precond."""

import pickle

import numpy as np
import pytest
import torch

from training.networks_edm2 import Precond
from training.networks_text import CrossAttention, TextPrecond, position_features
from training.text import ByteTokenizer

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_text_net(**kwargs) -> TextPrecond:
    torch.manual_seed(0)
    options = dict(
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=8,
        text_length=16,
        text_channels=16,
        text_layers=1,
        use_fp16=False,
    )
    return TextPrecond(img_resolution=8, img_channels=3, **{**options, **kwargs}).eval()


@torch.no_grad()
def test_cross_attention_preserves_unit_magnitude():
    torch.manual_seed(0)
    layer = CrossAttention(channels=64, text_channels=32, channels_per_head=16)
    x = torch.randn(8, 64, 6, 6)
    features = torch.randn(8, 10, 32)
    # One attended token: the attention output is that token's value, so MP-sum of two unit signals.
    one = torch.zeros(8, 10, dtype=torch.bool)
    one[:, 0] = True
    y = layer(x, features, one)
    assert abs(float(y.square().mean()) - 1) < 0.05
    # The residual branch is exactly proj(value of token 0), recovered by inverting the MP-sum (Eq. 88).
    t = layer.balance
    branch = (y * np.sqrt((1 - t) ** 2 + t**2) - (1 - t) * x) / t
    v = layer.kv(features)[:, :1, 64:]
    v = v.reshape(8, 1, 4, 16)
    v = (v / (1e-4 + v.norm(dim=3, keepdim=True) / 4)).reshape(8, 64, 1, 1).expand(8, 64, 6, 6)
    torch.testing.assert_close(branch, layer.proj(v), atol=1e-4, rtol=1e-4)
    # All tokens attended: magnitude stays near 1 (MP-sum of x and a smaller, averaged branch).
    y = layer(x, features, torch.ones(8, 10, dtype=torch.bool))
    assert 0.8 < float(y.square().mean()) < 1.05


def test_cross_attention_ignores_masked_tokens():
    torch.manual_seed(0)
    layer = CrossAttention(channels=16, text_channels=8, channels_per_head=8)
    x, features = torch.randn(2, 16, 4, 4), torch.randn(2, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]] * 2)
    changed = features.clone()
    changed[:, 3:] = torch.randn(2, 3, 8) * 5
    torch.testing.assert_close(layer(x, changed, mask), layer(x, features, mask))
    assert not torch.allclose(layer(x, changed, torch.ones_like(mask)), layer(x, features, torch.ones_like(mask)))


def test_captions_as_strings_or_tokens_give_the_same_prediction_and_none_is_empty():
    net = tiny_text_net()
    with torch.no_grad():
        for p in net.unet.parameters():  # Open the zero-initialised gains so that the text matters.
            if p.ndim == 0:
                p.fill_(1)
        for layer in net.text_encoder.layers:
            layer.attn_gain.fill_(1)
    x = torch.randn(2, 3, 8, 8)
    captions = ['a red circle', 'ünïcode 猫']
    d = net(x, 0.7, captions)
    torch.testing.assert_close(net(x, 0.7, ByteTokenizer(16)(captions)), d)
    torch.testing.assert_close(net(x, 0.7, None), net(x, 0.7, ['', '']))
    assert not torch.allclose(net(x, 0.7, ['', '']), d)
    assert not torch.allclose(d[0], net(x[:1], 0.7, ['a blue square'])[0])


def test_text_net_has_cross_attention_at_each_attention_block_and_pickles():
    net = tiny_text_net()
    assert sorted(net.unet.cross) == ['dec_4x4_block0', 'dec_4x4_block1', 'dec_4x4_in0', 'enc_4x4_block0']
    assert net.label_dim == 0
    clone = pickle.loads(pickle.dumps(net))
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone(x, 1.0, ['x']), net(x, 1.0, ['x']))
    assert len(tiny_text_net(text_channels=0).unet.cross) == 0


def test_super_resolution_net_reads_the_low_resolution_image_and_its_augmentation():
    net = tiny_text_net(text_channels=0, lowres=4)
    with torch.no_grad():
        net.unet.out_gain.fill_(1)
        for block in list(net.unet.enc.values())[1:] + list(net.unet.dec.values()):
            block.emb_gain.fill_(1)
    x, lowres = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    d = net(x, 1.0, lowres=lowres)
    assert d.shape == x.shape
    assert not torch.allclose(net(x, 1.0, lowres=lowres * 0), d)
    assert not torch.allclose(net(x, 1.0, lowres=lowres, aug_sigma=0.3), d)
    with pytest.raises(ValueError, match='4x4 lowres'):
        net(x, 1.0)


@torch.no_grad()
def test_residual_super_resolution_denoises_the_detail_over_the_bicubic_image():
    plain = tiny_text_net(text_channels=0, lowres=4, sigma_data=0.1)
    plain.unet.out_gain.fill_(1)
    residual = tiny_text_net(text_channels=0, lowres=4, sigma_data=0.1, residual=True)
    residual.load_state_dict(plain.state_dict())
    x, lowres = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    up = torch.nn.functional.interpolate(lowres, size=8, mode='bicubic', align_corners=False)
    for sigma in (0.01, 0.3, 20.0):
        torch.testing.assert_close(residual(x, sigma, lowres=lowres), up + plain(x - up, sigma, lowres=lowres))
    # Untrained (zero output gain), the denoiser of the bicubic image is the bicubic image at every noise level.
    untrained = tiny_text_net(text_channels=0, lowres=4, sigma_data=0.1, residual=True)
    for sigma in (0.01, 0.3, 20.0):
        torch.testing.assert_close(untrained(up, sigma, lowres=lowres), up)
    with pytest.raises(ValueError, match='super-resolution'):
        tiny_text_net(residual=True)


@torch.no_grad()
def test_text_precond_without_text_or_lowres_is_the_edm2_precond():
    text_net = tiny_text_net(text_channels=0, sigma_data=0.7, logvar_channels=8)
    for p in text_net.parameters():
        if p.ndim == 0:
            p.fill_(0.8)  # open the learned gains so that every block matters
    options = {
        k: v for k, v in text_net.init_kwargs.items() if k not in ('text_length', 'text_channels', 'text_layers')
    }
    net = Precond(label_dim=0, **options).eval()
    net.load_state_dict(text_net.state_dict(), strict=True)
    assert list(net.state_dict()) == list(text_net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for sigma in (0.05, 1.0, 30.0):
        d, logvar = text_net(x, sigma, ['a red circle', ''], return_logvar=True)
        d_ref, logvar_ref = net(x, sigma, return_logvar=True)
        torch.testing.assert_close(d, d_ref, rtol=0, atol=0)
        torch.testing.assert_close(logvar, logvar_ref, rtol=0, atol=0)


@torch.no_grad()
def test_embedding_joins_pooled_text_then_augmentation_level_by_mp_sum():
    net = tiny_text_net(lowres=4)
    unet, seen = net.unet, {}
    block = unet.enc['8x8_block0']
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__('emb', args[1]))
    x, lowres, captions = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), ['a red circle', 'a blue square']
    sigma, aug_sigma = torch.tensor([0.3, 2.0]), torch.tensor([0.1, 0.0])
    net(x, sigma, captions, lowres=lowres, aug_sigma=aug_sigma)

    def blend(a, b, t=0.5):  # MP-sum, EDM2 Eq. 88
        return ((1 - t) * a + t * b) / np.sqrt((1 - t) ** 2 + t**2)

    noise = unet.emb_noise(unet.emb_fourier(sigma.log() / 4))
    text = unet.emb_text(net.text_encoder(ByteTokenizer(16)(captions))[1])
    aug = unet.emb_aug(unet.emb_aug_fourier((aug_sigma + 0.002).log() / 4))
    expected = torch.nn.functional.silu(blend(blend(noise, text), aug)) / 0.596  # MP-SiLU, EDM2 Eq. 81
    torch.testing.assert_close(seen['emb'], expected)


def test_position_features_are_unit_rms_fourier_coordinates_that_tell_every_pixel_apart():
    features = position_features(16, 16, torch.device('cpu'))[0]
    assert features.shape == (16, 16, 16)
    torch.testing.assert_close(features.square().mean(dim=(1, 2)), torch.ones(16), atol=1e-5, rtol=0)
    u = (torch.arange(16) + 0.5) / 16
    torch.testing.assert_close(features[0, 3, 5], np.sqrt(2) * torch.sin(np.pi * u[5]))  # x of column 5
    torch.testing.assert_close(features[3, 3, 5], np.sqrt(2) * torch.cos(np.pi * u[3]))  # y of row 3
    pixels = features.flatten(1).T
    assert torch.cdist(pixels, pixels).add(torch.eye(256) * 10).min() > 0.1


@torch.no_grad()
def test_position_channels_reach_the_unet_as_extra_inputs_in_text_and_super_resolution_nets():
    net = tiny_text_net(position_channels=8)
    assert net.unet.enc['8x8_conv'].weight.shape[1] == 3 + 8 + 1
    x = torch.randn(2, 3, 8, 8)
    _, inputs = net.conditioning(x, ['a', 'b'], torch.float32)
    torch.testing.assert_close(inputs['cond'], position_features(8, 8, x.device).expand(2, -1, -1, -1))
    sr = tiny_text_net(position_channels=4, lowres=4)
    _, inputs = sr.conditioning(x, ['a', 'b'], torch.float32, lowres=torch.zeros(2, 3, 4, 4))
    assert inputs['cond'].shape == (2, 3 + 4, 8, 8)
    torch.testing.assert_close(inputs['cond'][:, 3:], position_features(4, 8, x.device).expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match='multiple of 4'):
        tiny_text_net(position_channels=6)
