"""Tests for training/precision.py and mixed precision in training: option resolution, bf16 training that learns
like fp32, float32 master weights, EMA and checkpoints."""

import glob
import os

import numpy as np
import pytest
import torch
from conftest import training_config

import dnnlib
from training import networks_edm2 as nets
from training import precision
from training.loss import EDM2Loss
from training.run_config import RunConfigError
from training.training_loop import training_loop


@pytest.mark.parametrize(
    'args, expected',
    [
        (dict(precision='bf16'), 'bf16'),
        (dict(precision='fp32', fp16=False), 'fp32'),
        (dict(precision=None, fp16=True), 'fp16'),
        (dict(precision=None, fp16=False), 'fp32'),
        (dict(precision=None, fp16=False, bf16=True), 'bf16'),
        (dict(precision=None, fp16=None, bf16=False), 'auto'),
    ],
)
def test_precision_options_and_edm2_aliases_resolve(args, expected, monkeypatch):
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: False)
    want = 'fp32' if expected == 'auto' else expected
    assert precision.resolve_precision(**args, device='cpu') == want


def test_auto_precision_is_bf16_on_bf16_cpus_fp16_on_cuda_else_fp32(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: True)
    assert precision.resolve_precision(None, device='cpu') == 'bf16'
    assert precision.resolve_precision(None, device='cuda:0') == 'fp16'
    monkeypatch.setattr(precision, 'cpu_has_bf16', lambda: False)
    assert precision.resolve_precision(None, device='cpu') == 'fp32'


@pytest.mark.parametrize(
    'flags, bf16',
    [('fpu avx512f avx512_bf16 amx_bf16 amx_tile', True), ('fpu avx512f avx512_bf16', True), ('fpu avx512f', False)],
)
def test_bf16_instructions_are_read_from_the_cpu_flags(tmp_path, flags, bf16):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(f'processor\t: 0\nflags\t\t: {flags}\n')
    assert precision.cpu_has_bf16(str(cpuinfo)) is bf16
    assert precision.cpu_has_bf16(str(tmp_path / 'missing')) is False


@pytest.mark.parametrize(
    'args', [dict(precision='fp16', bf16=True), dict(precision='bf16', fp16=False), dict(fp16=True, bf16=True)]
)
def test_contradicting_precision_options_are_one_clear_error(args):
    with pytest.raises(precision.PrecisionError, match='--'):
        precision.resolve_precision(args.pop('precision', None), **args)


def test_run_config_passes_the_precision_to_the_network_and_rejects_contradictions(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    assert training_config('demo-tiny', fp16=None, bf16=None, precision='bf16').network_kwargs.use_fp16 == 'bf16'
    assert training_config('demo-tiny', fp16=True, bf16=None).network_kwargs.use_fp16 is True
    with pytest.raises(RunConfigError, match='contradicts'):
        training_config('demo-tiny', fp16=True, bf16=None, precision='fp32')


def fixed_batch_losses(use_fp16, steps: int = 30) -> list[float]:
    """EDM2 loss on one fixed batch with fixed noise, Adam steps of a tiny net: a learning curve free of noise."""
    torch.manual_seed(0)
    kwargs = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    net = nets.Precond(8, 3, 4, use_fp16=use_fp16, **kwargs).train()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn([8, 3, 8, 8], generator=g) * 0.5, torch.eye(4)[torch.arange(8) % 4]
    sigma, noise = torch.exp(torch.randn([8, 1, 1, 1], generator=g) - 0.8), torch.randn([8, 3, 8, 8], generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        denoised, logvar = net(images + noise * sigma, sigma, labels, return_logvar=True)
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        loss = (weight / logvar.exp() * (denoised - images) ** 2 + logvar).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(p.dtype == torch.float32 for p in net.parameters())
    return losses


def test_bf16_training_lowers_the_loss_like_fp32():
    fp32, bf16 = fixed_batch_losses(False), fixed_batch_losses('bf16')
    assert fp32[-1] < 0.5 * fp32[0]
    assert bf16[-1] < 0.5 * bf16[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.15 * abs(fp32[0] - fp32[-1])  # the same curve, up to bf16 rounding
    assert bf16 != fp32  # bf16 did compute in bf16


def test_bf16_run_keeps_float32_weights_ema_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    c = training_config('demo-tiny', fp16=None, bf16=None, precision='bf16')
    c.update(total_nimg=32, status_nimg=None, snapshot_nimg=None, checkpoint_nimg=32)
    seen = []
    original = EDM2Loss.__call__

    def spy(self, net, images, labels=None):
        inner = net.module if hasattr(net, 'module') else net
        inner.unet.out_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        return original(self, net, images, labels)

    monkeypatch.setattr(EDM2Loss, '__call__', spy)
    training_loop(run_dir=str(tmp_path), device=torch.device('cpu'), **c)
    assert torch.bfloat16 in seen
    state = torch.load(glob.glob(os.path.join(tmp_path, 'training-state-*.pt'))[0], weights_only=False)
    assert all(v.dtype == torch.float32 for v in state['net'].values() if v.is_floating_point())
    ema_tensors = [v for v in torch.utils._pytree.tree_leaves(state['ema']) if torch.is_tensor(v)]
    assert ema_tensors and all(v.dtype == torch.float32 for v in ema_tensors if v.is_floating_point())


def test_prepare_for_sampling_sets_every_precond_and_refuses_mixed_precision_for_fp32_only_nets():
    net = nets.Precond(8, 3, 4, use_fp16=False, model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    precision.prepare_for_sampling(net, 'bf16')
    assert net.use_fp16 == 'bf16'
    precision.prepare_for_sampling(net, None)
    assert net.use_fp16 == 'bf16'  # None keeps what the pickle says
    with pytest.raises(precision.PrecisionError, match='fp32 only'):
        precision.prepare_for_sampling(torch.nn.Linear(2, 2), 'fp16')
    precision.prepare_for_sampling(torch.nn.Linear(2, 2), 'fp32')


def test_generate_images_precision_option_computes_in_bf16_close_to_fp32_and_rejects_unknown(tmp_path):
    from click.testing import CliRunner

    import generate_images
    from training.encoders import StandardRGBEncoder
    from training.snapshots import save_network_pickle

    torch.manual_seed(0)
    net = nets.Precond(8, 3, 3, use_fp16=False, model_channels=8, channel_mult=[1, 2], num_blocks=1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.5)
    path = str(tmp_path / 'net.pkl')
    save_network_pickle({'ema': net.eval(), 'encoder': StandardRGBEncoder()}, path)
    images = {}
    for p in ('fp32', 'bf16'):
        args = [f'--net={path}', '--seeds=0-3', '--steps=4', f'--npz={tmp_path / p}.npz', f'--precision={p}']
        result = CliRunner().invoke(generate_images.main, ['--device=cpu', *args])
        assert result.exit_code == 0, result.output
        images[p] = np.load(f'{tmp_path / p}.npz')['arr_0'].astype(int)
    difference = np.abs(images['bf16'] - images['fp32'])
    assert 0 < difference.max() and difference.mean() < 8  # bf16 rounding, not another image
    bad = ['--device=cpu', f'--net={path}', f'--npz={tmp_path / "x.npz"}', '--precision=fp8']
    result = CliRunner().invoke(generate_images.main, bad)
    assert result.exit_code == 1 and '--precision=fp8' in result.output and 'Traceback' not in result.output
    assert sorted(os.listdir(tmp_path)) == ['bf16.npz', 'fp32.npz', 'net.pkl']  # no rows file left by the error


@pytest.fixture
def attention_calls(monkeypatch) -> list[tuple]:
    """(q, k, v dtypes, CPU autocast on, a mask given) of every attention call the test makes."""
    seen = []

    def recording_attention(q, k, v, attn_mask=None):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled('cpu'), attn_mask is not None))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(nets, 'scaled_dot_product_attention', recording_attention)
    return seen


@pytest.mark.parametrize('arch', ['unet', 'mp-dit', 'dit'])
def test_bf16_on_cpu_computes_attention_in_float32_and_returns_to_bf16(arch, attention_calls):
    from training import backbones

    unet = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[8], channels_per_head=8)
    transformer = dict(patch_size=2, hidden_size=32, depth=1, num_heads=2)
    kwargs, _ = backbones.build_kwargs(arch, 'edm', 8, unet, transformer, use_fp16='bf16')
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(img_resolution=8, img_channels=3, label_dim=4, **kwargs).train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = net(x, torch.tensor([1.5, 0.3]), torch.eye(4)[[1, 3]])
    out.square().sum().backward()
    assert attention_calls and set(attention_calls) == {(torch.float32, torch.float32, torch.float32, False, False)}
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bf16_text_net_on_cpu_attends_in_float32_with_the_caption_mask(attention_calls):
    # Self-attention of the text encoder and the U-Net's cross-attention to the caption: fp32 on CPU under bf16,
    # the padding mask passed on; the prediction stays bf16-close to the fp32 net's.
    from training.networks_text import TextPrecond

    options = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)
    options.update(text_length=16, text_channels=16, text_layers=1)
    torch.manual_seed(0)
    net = TextPrecond(img_resolution=8, img_channels=3, use_fp16='bf16', **options).train()
    with torch.no_grad():
        for p in net.parameters():  # open the zero-initialised gains so that the text matters
            if p.ndim == 0:
                p.fill_(1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = net(x, torch.tensor([1.5, 0.3]), ['a red circle', 'a blue square on the left'])
    out.square().sum().backward()
    assert {c[:3] for c in attention_calls} == {(torch.float32,) * 3} and any(c[4] for c in attention_calls)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    net.use_fp16 = False
    reference = net(x, torch.tensor([1.5, 0.3]), ['a red circle', 'a blue square on the left'])
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)
