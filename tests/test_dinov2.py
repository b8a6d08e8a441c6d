"""The DINOv2 ViT (Oquab et al. 2023) of FD-DINOv2 (Stein et al. 2023), piece by piece against hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import input_of
from PIL import Image

from training.dinov2 import DinoVisionTransformer

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)  # ImageNet statistics, written out here on purpose
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


@pytest.fixture
def vit() -> DinoVisionTransformer:
    """A tiny ViT (2 heads of 64 channels, patch 14, 5x5 native grid) with every parameter random, gammas included."""
    torch.manual_seed(0)
    net = DinoVisionTransformer(embed_dim=128, depth=2, num_heads=2, patch_size=14, pos_grid=5).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.requires_grad_(False)


def _pil_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    # PIL's bicubic widens its kernel when shrinking (antialiasing); one float32 plane at a time.
    planes = [
        np.array(Image.fromarray(plane.numpy(), mode='F').resize((size, size), Image.Resampling.BICUBIC))
        for plane in images.float().reshape(-1, *images.shape[2:])
    ]
    return torch.from_numpy(np.stack(planes)).reshape(*images.shape[:2], size, size)


def test_images_are_antialias_resized_to_224_then_imagenet_normalised(vit):
    images = torch.randint(0, 256, [2, 3, 300, 260], dtype=torch.uint8)
    seen = input_of(vit, vit.patch_embed, images)
    expected = (_pil_bicubic(images, 224) / 255 - MEAN) / STD
    assert seen.shape == (2, 3, 224, 224)
    torch.testing.assert_close(seen, expected, atol=0.02 / 255 / 0.225, rtol=0)  # PIL, torch: < 0.01 grey level apart


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(dim=-1, keepdim=True) + 1e-6) * norm.weight + norm.bias


def _block(x: torch.Tensor, block: torch.nn.Module) -> torch.Tensor:
    """Pre-norm block with LayerScale on both branches, exact (erf) GELU, softmax attention over 64-channel heads."""
    n, t, c = x.shape
    h = _layer_norm(x, block.norm1)
    q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).reshape(n, t, 3, c // 64, 64).unbind(2)
    weights = torch.softmax(torch.einsum('bqhc,bkhc->bhqk', q, k) / 8, dim=-1)
    a = torch.einsum('bhqk,bkhc->bqhc', weights, v).reshape(n, t, c) @ block.attn.proj.weight.T + block.attn.proj.bias
    x = x + block.ls1.gamma * a
    h = _layer_norm(x, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + block.ls2.gamma * (h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)


def test_block_applies_layerscale_to_both_residual_branches(vit):
    block = vit.blocks[0]
    assert not torch.allclose(block.ls1.gamma, torch.ones(128))  # the check below would not see a dropped gamma
    for scale in (1.0, 1e-3):  # tokens as small as sqrt(eps) check LayerNorm's eps = 1e-6
        x = torch.randn(2, 10, 128) * scale
        torch.testing.assert_close(block(x), _block(x, block), atol=1e-4, rtol=1e-4)


def test_features_are_the_final_norm_class_token(vit):
    x = torch.randn(2, 3, 70, 70)  # the native 5x5 grid, so position embeddings are used as stored
    patches = F.unfold(x, kernel_size=14, stride=14)  # [n, 3*14*14, 25], row-major over the grid
    tokens = (vit.patch_embed.proj.weight.reshape(128, -1) @ patches).transpose(1, 2) + vit.patch_embed.proj.bias
    tokens = torch.cat([vit.cls_token.expand(2, -1, -1), tokens], dim=1) + vit.pos_embed
    for block in vit.blocks:
        tokens = _block(tokens, block)
    expected = _layer_norm(tokens[:, 0], vit.norm)
    torch.testing.assert_close(vit.forward_features(x), expected, atol=1e-4, rtol=1e-4)


def _keys_bicubic_matrix(in_size: int, out_size: int, scale: float) -> torch.Tensor:
    """PyTorch's bicubic resampling along one axis (Keys kernel a = -0.75, edge taps clamped, half-pixel
    centres) when called with scale_factor=`scale`: output i samples input (i + 0.5) / scale - 0.5."""

    def keys(d: float) -> float:
        d, a = abs(d), -0.75
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a if d < 2 else 0.0

    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), in_size - 1)] += keys(src - j)
    return m


@pytest.mark.parametrize('grid', [(3, 3), (4, 2), (7, 6)])
def test_position_embeddings_resample_with_the_plus_point_one_scale(vit, grid):
    gh, gw = grid
    stored = vit.pos_embed[0, 1:].reshape(5, 5, 128).double()
    # DINOv2 asks for scale (g + 0.1) / 5, not for size g: the sampling positions follow that scale.
    my, mx = _keys_bicubic_matrix(5, gh, (gh + 0.1) / 5), _keys_bicubic_matrix(5, gw, (gw + 0.1) / 5)
    expected = torch.einsum('yh,hwc,xw->yxc', my, stored, mx).reshape(gh * gw, 128).float()
    got = vit.interpolate_pos_embed(gh, gw)
    assert got.shape == (1, gh * gw + 1, 128)
    torch.testing.assert_close(got[0, 0], vit.pos_embed[0, 0], atol=0, rtol=0)
    torch.testing.assert_close(got[0, 1:], expected, atol=1e-5, rtol=1e-5)


def test_position_grid_kept_at_native_size():
    vit = DinoVisionTransformer(embed_dim=64, depth=1, num_heads=1, pos_grid=37)
    assert vit.interpolate_pos_embed(37, 37) is vit.pos_embed
    assert vit.interpolate_pos_embed(16, 16).shape == (1, 257, 64)
