"""The FID Inception-v3 (2015-12-05 TensorFlow graph, Heusel et al. 2017): its quirks against hand computations."""

import pytest
import torch
import torch.nn.functional as F
from conftest import input_of

from training.inception import InceptionV3, _avg_pool_tf, tf1_resize_bilinear


@pytest.fixture(scope='module')
def inception() -> InceptionV3:
    torch.manual_seed(0)
    return InceptionV3().eval().requires_grad_(False)


def _tf_average_3x3(x: torch.Tensor) -> torch.Tensor:
    # Sum over the 3x3 window, divided by how many of its pixels lie inside the image.
    c = x.shape[1]
    ones = torch.ones(c, 1, 3, 3, dtype=x.dtype)
    total = F.conv2d(x, ones, padding=1, groups=c)
    count = F.conv2d(torch.ones_like(x[:, :1]), ones[:1], padding=1)
    return total / count


def _max_3x3(x: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    padded = F.pad(x, [pad] * 4, value=float('-inf'))
    return padded.unfold(2, 3, stride).unfold(3, 3, stride).amax(dim=(-1, -2))


def test_input_is_mapped_by_x_minus_128_over_128(inception):
    images = torch.randint(0, 256, [2, 3, 299, 299], dtype=torch.uint8)
    seen = input_of(inception, inception.Conv2d_1a_3x3, images)
    torch.testing.assert_close(seen, (images.float() - 128) / 128, atol=0, rtol=0)


def test_other_sizes_are_resized_with_tensorflow1_bilinear_before_scaling(inception):
    images = torch.randint(0, 256, [1, 3, 40, 50], dtype=torch.uint8)
    seen = input_of(inception, inception.Conv2d_1a_3x3, images)
    torch.testing.assert_close(seen, (tf1_resize_bilinear(images.float(), 299) - 128) / 128)


# Pool branch of each mixed block, as in the 2015-12-05 graph: 'tf-avg' = 3x3 average over real pixels only,
# 'max' = 3x3 max (stride 1, same size), 'reduce' = 3x3 max with stride 2 (grid reductions 6a and 7a).
POOLS = {
    **{f'Mixed_{n}': 'tf-avg' for n in ('5b', '5c', '5d', '6b', '6c', '6d', '6e', '7b')},
    'Mixed_6a': 'reduce',
    'Mixed_7a': 'reduce',
    'Mixed_7c': 'max',
}


@pytest.mark.parametrize('name', sorted(POOLS))
def test_each_mixed_block_pools_as_the_2015_graph_does(inception, name):
    block = getattr(inception, name)
    in_channels = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    x = torch.randn(1, in_channels, 7, 7)
    out = block(x)
    if POOLS[name] == 'reduce':
        torch.testing.assert_close(out[:, -in_channels:], _max_3x3(x, stride=2, pad=0), atol=0, rtol=0)
        return
    pooled = _tf_average_3x3(x) if POOLS[name] == 'tf-avg' else _max_3x3(x, stride=1, pad=1)
    expected = block.branch_pool(pooled)
    torch.testing.assert_close(out[:, -expected.shape[1] :], expected, atol=1e-5, rtol=1e-5)


def test_tf1_resize_matches_asymmetric_grid_sample():
    # The TorchScript FID detector resizes with an affine grid shifted so that out[i] samples in[i * in/out].
    x = torch.rand(2, 3, 37, 53) * 255
    n, c, h, w = x.shape
    size = 71
    theta = torch.tensor([[1, 0, 1 / w - 1 / size], [0, 1, 1 / h - 1 / size]], dtype=torch.float32)
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    expected = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    torch.testing.assert_close(tf1_resize_bilinear(x, size), expected, atol=1e-3, rtol=1e-5)


def test_tf1_resize_hand_computed_pixel():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    y = tf1_resize_bilinear(x, 5)
    # out row 3 -> in row 3*3/5 = 1.8; out col 4 -> in col 4*4/5 = 3.2, clamped to the last column.
    expected = 0.2 * x[0, 0, 1, 3] + 0.8 * x[0, 0, 2, 3]
    assert y[0, 0, 3, 4].item() == pytest.approx(expected.item())


def test_tensorflow_average_pool_ignores_padding():
    x = torch.rand(1, 1, 4, 4)
    assert _avg_pool_tf(x)[0, 0, 0, 0].item() == pytest.approx(x[0, 0, :2, :2].mean().item())
