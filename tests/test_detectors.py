"""Detector weights: published checkpoint layouts, loading and lookup (architectures: test_inception, test_dinov2)."""

import math
import pickle

import pytest
import torch

from training import detectors as detectors_mod
from training.detectors import DetectorError, DetectorWarning, load_detector, resolve_detector_sources
from training.dinov2 import DinoVisionTransformer, vit_kwargs_from_state_dict
from training.inception import InceptionV3


def _conv(name: str, cin: int, cout: int, kh: int, kw: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    # torchvision BasicConv2d as saved in pt_inception-2015-12-05-6726825d.pth (bias-free conv + batch norm).
    kw = kh if kw is None else kw
    return [(f'{name}.conv.weight', (cout, cin, kh, kw))] + [
        (f'{name}.bn.{k}', (cout,)) for k in ('weight', 'bias', 'running_mean', 'running_var')
    ]


def _mixed_a(n: str, cin: int, pool: int) -> list:
    return (
        _conv(f'{n}.branch1x1', cin, 64, 1)
        + _conv(f'{n}.branch5x5_1', cin, 48, 1)
        + _conv(f'{n}.branch5x5_2', 48, 64, 5)
        + _conv(f'{n}.branch3x3dbl_1', cin, 64, 1)
        + _conv(f'{n}.branch3x3dbl_2', 64, 96, 3)
        + _conv(f'{n}.branch3x3dbl_3', 96, 96, 3)
        + _conv(f'{n}.branch_pool', cin, pool, 1)
    )


def _mixed_c(n: str, c7: int) -> list:
    return (
        _conv(f'{n}.branch1x1', 768, 192, 1)
        + _conv(f'{n}.branch7x7_1', 768, c7, 1)
        + _conv(f'{n}.branch7x7_2', c7, c7, 1, 7)
        + _conv(f'{n}.branch7x7_3', c7, 192, 7, 1)
        + _conv(f'{n}.branch7x7dbl_1', 768, c7, 1)
        + _conv(f'{n}.branch7x7dbl_2', c7, c7, 7, 1)
        + _conv(f'{n}.branch7x7dbl_3', c7, c7, 1, 7)
        + _conv(f'{n}.branch7x7dbl_4', c7, c7, 7, 1)
        + _conv(f'{n}.branch7x7dbl_5', c7, 192, 1, 7)
        + _conv(f'{n}.branch_pool', 768, 192, 1)
    )


def _mixed_e(n: str, cin: int) -> list:
    return (
        _conv(f'{n}.branch1x1', cin, 320, 1)
        + _conv(f'{n}.branch3x3_1', cin, 384, 1)
        + _conv(f'{n}.branch3x3_2a', 384, 384, 1, 3)
        + _conv(f'{n}.branch3x3_2b', 384, 384, 3, 1)
        + _conv(f'{n}.branch3x3dbl_1', cin, 448, 1)
        + _conv(f'{n}.branch3x3dbl_2', 448, 384, 3)
        + _conv(f'{n}.branch3x3dbl_3a', 384, 384, 1, 3)
        + _conv(f'{n}.branch3x3dbl_3b', 384, 384, 3, 1)
        + _conv(f'{n}.branch_pool', cin, 192, 1)
    )


# Published layout of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3, no aux head, 1008 classes).
INCEPTION_LAYOUT = dict(
    _conv('Conv2d_1a_3x3', 3, 32, 3)
    + _conv('Conv2d_2a_3x3', 32, 32, 3)
    + _conv('Conv2d_2b_3x3', 32, 64, 3)
    + _conv('Conv2d_3b_1x1', 64, 80, 1)
    + _conv('Conv2d_4a_3x3', 80, 192, 3)
    + _mixed_a('Mixed_5b', 192, 32)
    + _mixed_a('Mixed_5c', 256, 64)
    + _mixed_a('Mixed_5d', 288, 64)
    + _conv('Mixed_6a.branch3x3', 288, 384, 3)
    + _conv('Mixed_6a.branch3x3dbl_1', 288, 64, 1)
    + _conv('Mixed_6a.branch3x3dbl_2', 64, 96, 3)
    + _conv('Mixed_6a.branch3x3dbl_3', 96, 96, 3)
    + _mixed_c('Mixed_6b', 128)
    + _mixed_c('Mixed_6c', 160)
    + _mixed_c('Mixed_6d', 160)
    + _mixed_c('Mixed_6e', 192)
    + _conv('Mixed_7a.branch3x3_1', 768, 192, 1)
    + _conv('Mixed_7a.branch3x3_2', 192, 320, 3)
    + _conv('Mixed_7a.branch7x7x3_1', 768, 192, 1)
    + _conv('Mixed_7a.branch7x7x3_2', 192, 192, 1, 7)
    + _conv('Mixed_7a.branch7x7x3_3', 192, 192, 7, 1)
    + _conv('Mixed_7a.branch7x7x3_4', 192, 192, 3)
    + _mixed_e('Mixed_7b', 1280)
    + _mixed_e('Mixed_7c', 2048)
    + [('fc.weight', (1008, 2048)), ('fc.bias', (1008,))]
)


def dinov2_layout(dim: int = 1024, depth: int = 24, grid: int = 37, patch: int = 14) -> dict[str, tuple[int, ...]]:
    """Published layout of dinov2_vitl14_pretrain.pth (defaults); smaller arguments give test-sized twins."""
    layout = {
        'cls_token': (1, 1, dim),
        'pos_embed': (1, grid * grid + 1, dim),
        'mask_token': (1, dim),
        'patch_embed.proj.weight': (dim, 3, patch, patch),
        'patch_embed.proj.bias': (dim,),
    }
    for i in range(depth):
        b = f'blocks.{i}'
        layout.update(
            {
                f'{b}.norm1.weight': (dim,),
                f'{b}.norm1.bias': (dim,),
                f'{b}.attn.qkv.weight': (3 * dim, dim),
                f'{b}.attn.qkv.bias': (3 * dim,),
                f'{b}.attn.proj.weight': (dim, dim),
                f'{b}.attn.proj.bias': (dim,),
                f'{b}.ls1.gamma': (dim,),
                f'{b}.norm2.weight': (dim,),
                f'{b}.norm2.bias': (dim,),
                f'{b}.mlp.fc1.weight': (4 * dim, dim),
                f'{b}.mlp.fc1.bias': (4 * dim,),
                f'{b}.mlp.fc2.weight': (dim, 4 * dim),
                f'{b}.mlp.fc2.bias': (dim,),
                f'{b}.ls2.gamma': (dim,),
            }
        )
    layout.update({'norm.weight': (dim,), 'norm.bias': (dim,)})
    return layout


def random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in layout.items()}
    for k in state:
        if k.endswith('running_var'):
            state[k] = state[k].abs() + 1
    return state


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_inception_matches_published_layout_except_unused_classifier():
    assert len(INCEPTION_LAYOUT) == 94 * 5 + 2
    with torch.device('meta'):
        module = InceptionV3()
    expected = {k: v for k, v in INCEPTION_LAYOUT.items() if not k.startswith('fc.')}
    assert _shapes(module) == expected


def test_dinov2_vitl14_matches_published_layout_except_mask_token():
    layout = dinov2_layout()
    assert sum(math.prod(s) for s in layout.values()) == 304_368_640  # ViT-L/14 as published
    kwargs = vit_kwargs_from_state_dict({k: torch.empty(s, device='meta') for k, s in layout.items()})
    assert kwargs == dict(embed_dim=1024, depth=24, num_heads=16, patch_size=14, pos_grid=37)
    assert detectors_mod.PUBLISHED_DINOV2.items() <= kwargs.items()  # No warning.
    with torch.device('meta'):
        module = DinoVisionTransformer()
    assert _shapes(module) == {k: v for k, v in layout.items() if k != 'mask_token'}


def test_inception_pth_loads_from_folder_with_batchnorm_counters(tmp_path, monkeypatch):
    state = random_state(INCEPTION_LAYOUT)
    state.update(
        {
            k.replace('running_var', 'num_batches_tracked'): torch.tensor(7)
            for k in INCEPTION_LAYOUT
            if k.endswith('running_var')
        }
    )
    torch.save(state, tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
    monkeypatch.setenv('EDM2X_DETECTORS', str(tmp_path))
    source = resolve_detector_sources(['fid'])['fid']
    assert source == str(tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
    module = load_detector('fid', source, verbose=False)
    loaded = module.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert not any(p.requires_grad for p in module.parameters())


def test_dinov2_checkpoint_architecture_is_read_from_its_shapes(tmp_path):
    layout = dinov2_layout(dim=128, depth=2, grid=5)
    torch.save(random_state(layout), tmp_path / 'dinov2_vits_tiny.pth')
    with pytest.warns(
        DetectorWarning, match=r'dinov2_vits_tiny\.pth is a DINOv2 ViT of width 128, depth 2 .* not ViT-L/14'
    ):
        module = load_detector('fd_dinov2', str(tmp_path / 'dinov2_vits_tiny.pth'), verbose=False)
    assert (module.feature_dim, len(module.blocks), module.blocks[0].attn.num_heads) == (128, 2, 2)
    features = module(torch.randint(0, 256, [2, 3, 20, 30], dtype=torch.uint8))
    assert features.shape == (2, 128) and torch.isfinite(features).all()


def test_wrong_checkpoint_names_the_file_and_keys(tmp_path):
    state = {k: torch.zeros(shape) for k, shape in INCEPTION_LAYOUT.items()}
    del state['Mixed_7c.branch_pool.conv.weight']
    torch.save(state, tmp_path / 'inception.pth')
    with pytest.raises(
        DetectorError, match=r'inception\.pth does not hold FID Inception-v3 weights \(missing Mixed_7c'
    ):
        load_detector('fid', str(tmp_path / 'inception.pth'), verbose=False)


def test_unreachable_download_tells_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    monkeypatch.setitem(
        detectors_mod.DETECTOR_FILES,
        'fd_dinov2',
        (('dinov2_vitl14_pretrain.pth',), 'http://127.0.0.1:9/dinov2_vitl14_pretrain.pth'),
    )
    monkeypatch.setattr(detectors_mod.dnnlib.util.time, 'sleep', lambda s: None)
    source = resolve_detector_sources(['fd_dinov2'], detectors='')['fd_dinov2']
    with pytest.raises(DetectorError) as info:
        load_detector('fd_dinov2', source, verbose=False)
    message = str(info.value)
    assert '\n' not in message and 'dinov2_vitl14_pretrain.pth' in message and '--detectors' in message


def test_detector_file_names_pick_the_metric(tmp_path):
    (tmp_path / 'my-dinov2.pth').write_bytes(b'')
    (tmp_path / 'weights.pth').write_bytes(b'')
    assert resolve_detector_sources(['fd_dinov2'], str(tmp_path / 'my-dinov2.pth')) == {
        'fd_dinov2': str(tmp_path / 'my-dinov2.pth')
    }
    with pytest.raises(DetectorError, match='neither "inception"'):
        resolve_detector_sources(['fid'], str(tmp_path / 'weights.pth'))
    with pytest.raises(DetectorError, match='does not exist'):
        resolve_detector_sources(['fid'], str(tmp_path / 'missing-inception.pth'))


@pytest.mark.filterwarnings('ignore:`torch.jit.:DeprecationWarning')
def test_torchscript_pickle_is_called_with_return_features(tmp_path):
    script = torch.jit.script(_FakeScriptInception())
    script.save(str(tmp_path / 'net.pt'))
    with open(tmp_path / 'inception-2015-12-05.pkl', 'wb') as f:
        pickle.dump(_ScriptPickle(str(tmp_path / 'net.pt')), f)
    module = load_detector('fid', resolve_detector_sources(['fid'], str(tmp_path))['fid'], verbose=False)
    images = torch.randint(0, 256, [3, 3, 8, 8], dtype=torch.uint8)
    torch.testing.assert_close(module(images), images.float().mean(dim=[2, 3]) + 1)


class _FakeScriptInception(torch.nn.Module):
    """Stands in for NVIDIA's TorchScript detector: only return_features=True gives features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = x.to(torch.float32).mean(dim=[2, 3])
        return features + 1 if return_features else features


class _ScriptPickle:
    """Pickles as a call to torch.jit.load, so unpickling yields a TorchScript module as NVIDIA's file does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return torch.jit.load, (self.path,)


def _vitg_layout(dim: int = 96, depth: int = 2, grid: int = 3) -> dict[str, tuple[int, ...]]:
    # dinov2_vitg14_pretrain.pth's layout at test size: SwiGLU feed-forward (mlp.w12, mlp.w3) instead of fc1/fc2.
    layout = dinov2_layout(dim, depth, grid)
    for i in range(depth):
        for k in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'):
            del layout[f'blocks.{i}.mlp.{k}']
        layout.update({f'blocks.{i}.mlp.w12.weight': (4 * dim, dim), f'blocks.{i}.mlp.w3.weight': (dim, 2 * dim)})
    return layout


@pytest.mark.parametrize(
    'name, layout',
    [
        ('dinov2_vitg14_pretrain.pth', _vitg_layout()),
        ('dinov2_vits14_reg4_pretrain.pth', {**dinov2_layout(64, 1, 3), 'register_tokens': (1, 4, 64)}),
    ],
)
def test_vitg_and_register_checkpoints_are_refused_naming_what_loads(tmp_path, name, layout):
    torch.save(random_state(layout), tmp_path / name)
    with pytest.raises(DetectorError) as info:
        load_detector('fd_dinov2', str(tmp_path / name), verbose=False)
    message = str(info.value)
    assert '\n' not in message and name in message and 'only ViT-S/14, ViT-B/14 and ViT-L/14' in message
