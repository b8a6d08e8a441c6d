"""Tests for training/safetensors_io.py and the .safetensors route of training/snapshots.py: nets rebuilt from
the stored configuration compute bitwise what the pickled ones compute, and loading runs no code from the file."""

import json
import os
import pickle
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torch_utils import persistence
from training import networks_edm2, safetensors_io
from training.clip_guide import CLIPGuide
from training.encoders import StabilityVAEEncoder, StandardRGBEncoder
from training.loss import EDM2Loss
from training.network_loading import resolve_network_path
from training.networks_dit import DiT, MPDiT
from training.networks_edm2 import Precond
from training.networks_text import TextPrecond
from training.safetensors_io import SafetensorsError, load_safetensors, save_safetensors
from training.snapshots import (
    NetworkPickleError,
    PickleWarning,
    load_network_pickle,
    parse_snapshot_name,
    save_network,
    save_network_pickle,
)
from training.vp_diffusion import VPLoss

pytestmark = pytest.mark.usefixtures('one_thread')


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (fresh nets have zero gains, which would hide a weight that was not restored)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net.eval().requires_grad_(False)


def tiny_precond(**kwargs) -> Precond:
    options = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    return _randomised(Precond(img_resolution=8, img_channels=3, label_dim=2, use_fp16=False, **options, **kwargs))


def _eval_edm(net: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution])
    labels = torch.eye(net.label_dim)[[0, 1]] if net.label_dim else None
    return net(x, torch.tensor([0.5, 3.0]), labels)


def _eval_text(net: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return net(torch.randn([2, 3, 8, 8]), torch.tensor([0.5, 3.0]), ['a red circle', ''])


def _eval_clip(net: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    return net.encode_image(torch.randn([2, 3, 8, 8]), torch.tensor([0.5, 3.0]))


def _text_net() -> TextPrecond:
    options = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    return _randomised(TextPrecond(img_resolution=8, img_channels=3, text_length=16, text_channels=16, text_layers=1,
                                   use_fp16=False, **options))  # fmt: skip


def _text_mp_dit() -> TextPrecond:
    backbone = 'training.networks_dit_text.TextMPDiT'
    return _randomised(TextPrecond(img_resolution=8, img_channels=3, text_length=16, text_channels=16, text_layers=1,
                                   backbone=backbone, patch_size=2, hidden_size=32, depth=1, num_heads=2,
                                   channels_per_head=16, use_fp16=False))  # fmt: skip


def _vp_dit() -> torch.nn.Module:
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=1, num_classes=3)
    return _randomised(VPLoss().export(dit))


NETS = {
    'precond': (tiny_precond, _eval_edm),
    'precond-fp16': (lambda: tiny_precond().to(torch.float16), lambda net: _eval_edm(net.float())),
    'text': (_text_net, _eval_text),
    'text-mp-dit': (_text_mp_dit, _eval_text),
    'clip-guide': (
        lambda: _randomised(
            CLIPGuide(
                img_resolution=8,
                img_channels=3,
                embed_dim=16,
                text_length=16,
                text_channels=16,
                text_layers=1,
                model_channels=8,
            )
        ),
        _eval_clip,
    ),  # fmt: skip
    'vp-dit': (_vp_dit, _eval_edm),
    'mp-dit': (
        lambda: _randomised(MPDiT(img_resolution=8, img_channels=3, label_dim=2, hidden_size=32, depth=1, num_heads=2)),
        lambda net: net(torch.ones([2, 3, 8, 8]), torch.tensor([0.1, 0.9]), torch.eye(2)),
    ),  # fmt: skip
}


@pytest.mark.parametrize('on_meta', [False, True])
@pytest.mark.parametrize('kind', list(NETS))
def test_rebuilt_net_computes_bitwise_what_the_original_computes(tmp_path, monkeypatch, kind, on_meta):
    if on_meta:  # Build even tiny nets on the meta device first, as large ones are.
        monkeypatch.setattr(safetensors_io, '_META_MIN_WEIGHTS', 0)
    make, run = NETS[kind]
    net = make()
    data = dict(ema=net, encoder=StandardRGBEncoder(), loss_fn=EDM2Loss(P_mean=-0.3), dataset_kwargs=dict(path='x'))
    save_safetensors(data, str(tmp_path / 'net.safetensors'))
    loaded = load_safetensors(str(tmp_path / 'net.safetensors'))
    assert type(loaded['ema']) is type(net) and type(loaded['encoder']) is StandardRGBEncoder
    assert loaded['loss_fn'].P_mean == -0.3 and loaded['dataset_kwargs'] == dict(path='x')
    before, after = net.state_dict(), loaded['ema'].state_dict()
    assert list(before) == list(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        expected, got = run(net), run(loaded['ema'])
    assert torch.equal(expected, got)


@pytest.mark.parametrize('threshold', [0, 1 << 40])
def test_nets_are_constructed_once_on_either_device(tmp_path, monkeypatch, threshold):
    save_safetensors(dict(ema=tiny_precond()), str(tmp_path / 'net.safetensors'))
    monkeypatch.setattr(safetensors_io, '_META_MIN_WEIGHTS', threshold)
    devices, init = [], Precond.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        devices.append(self.logvar_linear.weight.device.type)

    monkeypatch.setattr(Precond, '__init__', counting_init)
    net = load_safetensors(str(tmp_path / 'net.safetensors'))['ema']
    assert devices == (['meta'] if threshold == 0 else ['cpu']) and net.logvar_linear.weight.device.type == 'cpu'


def test_loading_restores_the_callers_random_state(tmp_path):
    save_safetensors(dict(ema=tiny_precond()), str(tmp_path / 'net.safetensors'))
    torch.manual_seed(5)
    load_safetensors(str(tmp_path / 'net.safetensors'))
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_attributes_changed_after_construction_are_kept(tmp_path):
    encoder = StabilityVAEEncoder(vae_name='org/first', final_std=0.25)
    encoder.vae_name = 'org/second'  # as load_network(vae=...) does
    save_safetensors(dict(ema=tiny_precond(), encoder=encoder), str(tmp_path / 'net.safetensors'))
    loaded = load_safetensors(str(tmp_path / 'net.safetensors'))['encoder']
    assert loaded.vae_name == 'org/second' and loaded.final_std == encoder.final_std


FOREIGN_NOTE = '\n# A copy of the network code, as an NVIDIA pickle carries it.\n'


def test_nvidia_format_pickle_converts_to_edm2x_classes(tmp_path):
    # A pickle whose classes come from source text it carries (not edm2x's modules), as NVIDIA's pickles do.
    foreign = persistence._src_to_module(persistence._module_to_src(networks_edm2) + FOREIGN_NOTE)
    torch.manual_seed(0)
    net = foreign.Precond(img_resolution=8, img_channels=3, label_dim=2, use_fp16=False, model_channels=8,
                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)  # fmt: skip
    _randomised(net)
    save_network_pickle(dict(ema=net, loss_fn=EDM2Loss()), str(tmp_path / 'nvidia.pkl'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', PickleWarning)
        data = load_network_pickle(str(tmp_path / 'nvidia.pkl'))
    assert type(data['ema']).__module__ == foreign.__name__
    save_safetensors(data, str(tmp_path / 'net.safetensors'))
    loaded = load_network_pickle(str(tmp_path / 'net.safetensors'))['ema']
    assert type(loaded) is Precond and type(loaded.unet) is networks_edm2.UNet
    with torch.no_grad():
        assert torch.equal(_eval_edm(data['ema']), _eval_edm(loaded))


def _tampered(tmp_path, edit) -> str:
    path = str(tmp_path / 'net.safetensors')
    save_safetensors(dict(ema=tiny_precond()), path)
    with safe_open(path, framework='pt') as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta['edm2x'])
    edit(header['entries']['ema']['config'])
    save_file(tensors, path, metadata={'edm2x': json.dumps(header)})
    return path


def _set_class(config):
    config['__object__'] = 'os.system'
    config['args'] = [{'__tuple__': ['touch MARKER']}]


def _set_backbone(config):
    config['kwargs']['__dict__']['backbone'] = 'subprocess.getoutput'


def _drop_kwargs(config):
    del config['kwargs']['__dict__']['img_resolution']


@pytest.mark.parametrize(
    'edit, message',
    [
        (_set_class, "class 'os.system' is not one of the edm2x classes"),
        (_set_backbone, "backbone='subprocess.getoutput' is not an allowed edm2x class"),
        (_drop_kwargs, 'training.networks_edm2.Precond cannot be built from the stored arguments'),
    ],
)
def test_tampered_configuration_is_one_error_and_runs_nothing(tmp_path, monkeypatch, edit, message):
    path = _tampered(tmp_path, edit)
    monkeypatch.chdir(tmp_path)

    def no_unpickling(*args, **kwargs):
        raise AssertionError('a .safetensors load unpickled something')

    monkeypatch.setattr(pickle, 'load', no_unpickling)
    monkeypatch.setattr(pickle, 'loads', no_unpickling)
    monkeypatch.setattr(torch, 'load', no_unpickling)
    with pytest.raises(NetworkPickleError) as info:
        load_network_pickle(path)
    assert message in str(info.value) and path in str(info.value) and '\n' not in str(info.value)
    assert not os.path.exists(tmp_path / 'MARKER')


def test_file_without_edm2x_configuration_is_refused(tmp_path):
    path = str(tmp_path / 'plain.safetensors')
    save_file({'w': torch.zeros(2)}, path)
    with pytest.raises(NetworkPickleError, match='holds no edm2x network configuration'):
        load_network_pickle(path)


def test_unsupported_object_is_refused_before_writing(tmp_path):
    with pytest.raises(SafetensorsError, match='a object cannot be stored'):
        save_safetensors(dict(ema=tiny_precond(), extra=object()), str(tmp_path / 'net.safetensors'))
    assert not os.path.exists(tmp_path / 'net.safetensors')


def test_pickle_warns_once_and_trusting_silences_it(tmp_path, monkeypatch):
    path = str(tmp_path / 'net.pkl')
    save_network_pickle(dict(ema=tiny_precond()), path)
    monkeypatch.delenv('EDM2X_TRUST_PICKLES', raising=False)
    with pytest.warns(PickleWarning, match='export_network.py safetensors'):
        load_network_pickle(path)
    monkeypatch.setenv('EDM2X_TRUST_PICKLES', '1')
    with warnings.catch_warnings():
        warnings.simplefilter('error', PickleWarning)
        load_network_pickle(path)
    save_safetensors(dict(ema=tiny_precond()), str(tmp_path / 'net.safetensors'))
    monkeypatch.delenv('EDM2X_TRUST_PICKLES')
    with warnings.catch_warnings():
        warnings.simplefilter('error', PickleWarning)
        load_network_pickle(str(tmp_path / 'net.safetensors'))


def test_snapshot_formats_and_run_folders_prefer_safetensors(tmp_path):
    save_network(dict(ema=tiny_precond()), str(tmp_path / 'network-snapshot-0000001-0.050.pkl'), 'both')
    assert sorted(os.listdir(tmp_path)) == [
        'network-snapshot-0000001-0.050.pkl',
        'network-snapshot-0000001-0.050.safetensors',
    ]
    assert parse_snapshot_name('network-snapshot-0000001-0.050.safetensors') == ('network-snapshot', 1, 0.05)
    assert resolve_network_path(str(tmp_path)).endswith('.safetensors')
