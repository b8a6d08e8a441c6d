import pickle

import numpy as np
import torch

from torch_utils import persistence
from training.encoders import StandardRGBEncoder


def all_levels() -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)


def test_decode_inverts_encode_for_every_uint8_level():
    encoder = StandardRGBEncoder()
    encoder.init('cpu')
    x = all_levels()
    y = encoder.decode(encoder.encode(x))
    assert y.dtype == torch.uint8 and torch.equal(y, x)


def test_encode_is_affine_map_to_unit_range():
    encoder = StandardRGBEncoder()
    x = all_levels()
    assert torch.equal(encoder.encode_pixels(x), x)
    y = encoder.encode(x)
    assert y.dtype == torch.float32
    expected = x.numpy().astype(np.float64) * (2 / 255) - 1
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-6)
    assert y.min() == -1 and y.max() == 1


def test_decode_rounds_to_nearest_and_clamps():
    rng = np.random.default_rng(0)
    levels = rng.uniform(-40, 300, size=4000)
    levels = levels[np.abs(levels - np.floor(levels) - 0.5) > 1e-3]  # no ties
    x = torch.from_numpy(levels / 127.5 - 1).to(torch.float32).reshape(-1, 1, 1, 1)
    expected = np.clip(np.rint(levels), 0, 255).astype(np.uint8)
    assert np.array_equal(StandardRGBEncoder().decode(x).numpy().reshape(-1), expected)


def test_encoder_pickles_as_persistent_object():
    encoder = StandardRGBEncoder()
    assert persistence.is_persistent(encoder)
    restored = pickle.loads(pickle.dumps(encoder))
    assert persistence.is_persistent(restored)
    x = all_levels()
    assert torch.equal(restored.encode(x), encoder.encode(x))
    assert torch.equal(restored.decode(restored.encode(x)), x)
