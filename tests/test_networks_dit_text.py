"""Tests for training/networks_dit_text.py: the text-conditioned MP-DiT, as a network and end to end through
train_edm2.py and generate_images.py on the captioned demo data."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_one_line_error

import generate_images
import train_edm2
from training.dataset_io import write_synthetic_dataset
from training.networks_dit import MPDiT
from training.networks_dit_text import TextMPDiT
from training.networks_edm2 import mp_sum
from training.networks_text import TextPrecond
from training.text import mp_attention

pytestmark = pytest.mark.usefixtures('one_thread')

GEOMETRY = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2)


def tiny_text_dit(**kwargs) -> TextPrecond:
    torch.manual_seed(0)
    options = dict(text_length=16, text_channels=16, text_layers=1, channels_per_head=16, use_fp16=False)
    backbone = 'training.networks_dit_text.TextMPDiT'
    return TextPrecond(img_resolution=8, img_channels=3, backbone=backbone, **GEOMETRY, **options, **kwargs).eval()


def linear_of(layer: torch.nn.Module, channels: int) -> torch.Tensor:
    """The matrix W of a 1x1 MP convolution (y = W x per pixel), read off its responses to unit vectors."""
    return layer(torch.eye(channels).reshape(channels, channels, 1, 1)).reshape(channels, -1).T


@torch.no_grad()
def test_without_text_it_is_mpdit_exactly():
    torch.manual_seed(0)
    plain = MPDiT(8, 3, label_dim=4, **GEOMETRY)
    text = TextMPDiT(8, 3, label_dim=4, text_channels=0, **GEOMETRY)
    text.load_state_dict(plain.state_dict())  # Strict: no extra parameters without text.
    x, noise, labels = torch.randn(2, 3, 8, 8), torch.randn(2), torch.eye(4)[[1, 3]]
    assert torch.equal(text(x, noise, labels), plain(x, noise, labels))


@torch.no_grad()
def test_each_block_is_followed_by_cross_attention_from_its_tokens_to_the_caption():
    """After block i the tokens are MP-sum(tokens, W_proj · attention(W_q · tokens, caption keys and values)),
    computed here with plain matrices (EDM2 Eq. 88, cosine attention per head)."""
    net = tiny_text_dit().unet
    x, noise = torch.randn(2, 3, 8, 8), torch.randn(2)
    features, pooled, mask = torch.randn(2, 5, 16), torch.randn(2, 16), torch.tensor([[1, 1, 1, 0, 0]] * 2).bool()
    seen = {}
    net.blocks[1].register_forward_hook(lambda module, args, out: seen.setdefault('block', out))
    net.cross[1].register_forward_hook(lambda module, args, out: seen.setdefault('cross', out))
    net(x, noise, None, text=(features, pooled, mask))
    tokens, layer = seen['block'], net.cross[1]
    queries = tokens @ linear_of(layer.q, 32).T
    keys, values = layer.kv(features).chunk(2, dim=2)
    attended = mp_attention(queries, keys, values, layer.num_heads, mask)
    expected = mp_sum(tokens, attended @ linear_of(layer.proj, 32).T, t=layer.balance)
    torch.testing.assert_close(seen['cross'].squeeze(3).mT, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_pooled_caption_joins_the_embedding_by_mp_sum():
    net = tiny_text_dit().unet
    noise, pooled = torch.randn(2), torch.randn(2, 16)
    emb = net.emb_noise(net.emb_fourier(noise))
    expected = mp_sum(emb, net.emb_text(pooled), t=net.label_balance)
    expected = torch.nn.functional.silu(expected) / 0.596  # MP-SiLU (EDM2 Eq. 81)
    got = net.embedding(noise, None, text=(None, pooled, None))
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    assert math.isclose(float(got.square().mean().sqrt()), 1, abs_tol=0.3)


@torch.no_grad()
def test_captions_steer_the_denoiser_and_each_image_depends_on_its_own_caption_only():
    net = tiny_text_dit()
    for name, gain in net.unet.named_parameters():  # Trained gains: the output gain starts at 0 (F = 0).
        if name.endswith('gain'):
            gain.fill_(1.0)
    x, sigma = torch.randn(3, 3, 8, 8), torch.full([3], 1.5)
    captions = ['a red circle', 'a blue square at the top', '']
    together = net(x, sigma, captions)
    alone = torch.cat([net(x[i : i + 1], sigma[i : i + 1], [c]) for i, c in enumerate(captions)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net(x[:1], sigma[:1], ['a red circle']), net(x[:1], sigma[:1], ['a green cross']))


def test_super_resolution_stages_stay_unets():
    with pytest.raises(ValueError, match='super-resolution stages are U-Nets'):
        tiny_text_dit(lowres=4)


def test_demo_text_dit_trains_and_samples_from_prompts(tmp_path, monkeypatch):
    write_synthetic_dataset(str(tmp_path / 'data'), resolution=16, num_images=8, seed=0)
    args = ['--preset=demo-text-dit', f'--data={tmp_path / "data"}', '--duration=8', '--batch=4', '--workers=0']
    args += ['--channels=32', '--patch=4', '--status=8', '--snapshot=8', '--checkpoint=8']
    result = CliRunner().invoke(train_edm2.main, [f'--outdir={tmp_path / "run"}', *args])
    assert result.exit_code == 0, result.output
    options = (tmp_path / 'run' / 'training_options.json').read_text()
    assert 'training.networks_dit_text.TextMPDiT' in options
    result = CliRunner().invoke(
        generate_images.main,
        [f'--net={tmp_path / "run"}', '--prompt=a red circle', '--guidance=2', '--steps=2', '--seeds=0-1']
        + [f'--outdir={tmp_path / "out"}', '--device=cpu'],
    )
    assert result.exit_code == 0, result.output
    assert np.asarray(PIL.Image.open(tmp_path / 'out' / '000001.png')).shape == (16, 16, 3)


@pytest.mark.parametrize(
    'preset, args, message',
    [
        ('demo-text', ['--arch=dit'], '--arch=unet or --arch=mp-dit'),
        ('demo-text', ['--arch=mp-dit', '--formulation=ddpm'], '--arch=unet or --arch=mp-dit'),
        ('demo-sr', ['--arch=mp-dit'], 'do not apply to this preset'),
    ],
)
def test_text_presets_refuse_backbones_they_cannot_train(tmp_path, preset, args, message):
    write_synthetic_dataset(str(tmp_path / 'data'), resolution=16, num_images=4, seed=0)
    args = [f'--outdir={tmp_path / "run"}', f'--preset={preset}', f'--data={tmp_path / "data"}', *args]
    result = CliRunner().invoke(train_edm2.main, args)
    assert_one_line_error(result, message)
    assert not (tmp_path / 'run').exists()
