"""Tests for training/clip_guidance.py: the CLIP correction and its use in edm_sampler."""

import pytest
import torch
from test_clip_guide import tiny_guide

from training.clip_guidance import clip_correction
from training.networks_edm2 import Precond
from training.sampling import edm_sampler

CAPTIONS = ['a red circle on a blue background, at the top', 'a white cross on a black background, at the left']


def tiny_denoiser(seed: int, img_resolution: int = 8) -> Precond:
    torch.manual_seed(seed)
    net = Precond(
        img_resolution=img_resolution,
        img_channels=3,
        label_dim=0,
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=8,
        logvar_channels=8,
    )
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
    return net.eval().requires_grad_(False)


def test_scale_zero_leaves_sampling_bit_identical():
    net, gnet, clip = tiny_denoiser(0), tiny_denoiser(1), tiny_guide().eval()
    noise = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(5))
    for kwargs in (dict(), dict(gnet=gnet, guidance=1.7)):
        with torch.no_grad():
            plain = edm_sampler(net, noise, num_steps=4, **kwargs)
            zero = edm_sampler(net, noise, num_steps=4, correction=clip_correction(clip, CAPTIONS, 0), **kwargs)
            guided = edm_sampler(net, noise, num_steps=4, correction=clip_correction(clip, CAPTIONS, 2.0), **kwargs)
        assert torch.equal(plain, zero)
        assert not torch.allclose(plain, guided)


def test_correction_is_scaled_sigma_squared_similarity_gradient():
    clip = tiny_guide().eval().requires_grad_(False)
    x = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(2))
    v = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(3))
    sigma, scale, eps = torch.tensor(1.5), 0.7, 1e-2
    txt = clip.encode_text(CAPTIONS)
    sim = lambda y: (clip.encode_image(y, sigma) * txt).sum(dim=1)
    with torch.no_grad():
        c = clip_correction(clip, CAPTIONS, scale)(x, sigma)
        for i in range(2):  # Directional derivative of image i's similarity, by central differences.
            e = torch.zeros_like(v)
            e[i] = v[i]
            fd = (sim(x + eps * e)[i] - sim(x - eps * e)[i]) / (2 * eps)
            assert (c[i] * v[i]).sum().item() == pytest.approx(scale * 1.5**2 * fd.item(), rel=2e-2, abs=1e-6)


def test_correction_adds_to_the_cfg_estimate_and_denoiser_has_no_graph():
    grad_modes = []

    def net(x, sigma, labels):
        grad_modes.append(torch.is_grad_enabled())
        return 0.5 * x

    def gnet(x, sigma, labels):
        grad_modes.append(torch.is_grad_enabled())
        return 0.2 * x

    clip = tiny_guide().eval().requires_grad_(False)
    noise = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(4))
    correction = clip_correction(clip, CAPTIONS, 0.3)
    with torch.no_grad():
        # One step ends at sigma = 0, so the result is the denoised estimate at (sigma_max * noise, sigma_max).
        out = edm_sampler(net, noise, gnet=gnet, guidance=2.0, num_steps=1, sigma_max=3.0, correction=correction)
        x0 = noise * 3.0
        expected = 0.2 * x0 + 2.0 * (0.5 * x0 - 0.2 * x0) + correction(x0, torch.tensor(3.0))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert grad_modes and not any(grad_modes)
    assert correction(x0, torch.tensor(3.0)).abs().sum() > 0


def _generate(net, **kwargs) -> torch.Tensor:
    from generate_images import generate_images

    batches = generate_images(net, seeds=range(3), max_batch_size=2, device='cpu', num_steps=3, **kwargs)
    return torch.cat([b.images for b in batches])


def test_generate_images_with_clip_scale_zero_is_bit_identical_and_nonzero_scale_steers():
    net, clip = tiny_denoiser(0), tiny_guide().eval()
    plain = _generate(net)
    assert torch.equal(_generate(net, prompts=CAPTIONS, clip=clip, clip_scale=0.0), plain)
    assert not torch.equal(_generate(net, prompts=CAPTIONS, clip=clip, clip_scale=50.0), plain)


def test_generate_images_clip_errors_are_one_sentence():
    from generate_images import GenerationError, generate_images
    from training.snapshots import NetworkPickleError

    net, clip = tiny_denoiser(0), tiny_guide().eval()
    with pytest.raises(GenerationError, match='needs prompts'):
        next(generate_images(net, seeds=[0], device='cpu', clip=clip, clip_scale=1.0))
    wide = tiny_denoiser(0, img_resolution=16)
    with pytest.raises(NetworkPickleError, match='reads 3x8x8 images but the network makes 3x16x16'):
        next(generate_images(wide, seeds=[0], device='cpu', prompts=['x'], clip=clip, clip_scale=1.0))
