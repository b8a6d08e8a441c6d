"""Training transformers and DDPM-formulation nets through train_edm2 and the training loop: every
architecture x formulation trains and its snapshot samples through the EDM tools; the adapters' maths."""

import glob
import json
import os
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import training_config

import dnnlib
import reconstruct_phema
import train_edm2
from tests.conftest import assert_one_line_error
from torch_utils import training_stats
from training import backbones
from training.generation import generate_images
from training.networks_dit import DiT, MPDiT
from training.networks_edm2 import Precond
from training.run_config import RunConfigError
from training.training_loop import training_loop
from training.vp_diffusion import VPDiffusion, VPLoss


@pytest.fixture(autouse=True)
def private_training_stats(monkeypatch):
    monkeypatch.setattr(training_stats, '_pending', {})
    monkeypatch.setattr(training_stats, '_cumulative', {})


def _run_dir(tmp_path, name='run'):
    os.makedirs(tmp_path / name)
    return str(tmp_path / name)


def _config(tmp_path, monkeypatch, arch, formulation, **opts):
    """demo-tiny (16x16 shapes, 5 classes) with a 2-block transformer of width 16, 4x4 patches."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path.parent / 'cache'))
    c = training_config('demo-tiny', arch=arch, formulation=formulation, patch=None if arch == 'unet' else 4, **opts)
    if arch != 'unet':
        c.network_kwargs.depth = 2
    c.update(total_nimg=32, batch_size=16, status_nimg=16, snapshot_nimg=32, checkpoint_nimg=16)
    return c


@pytest.mark.parametrize('formulation', backbones.FORMULATIONS)
@pytest.mark.parametrize('arch', backbones.ARCHS)
def test_every_arch_and_formulation_trains_and_its_snapshot_samples_with_the_edm_sampler(
    tmp_path, monkeypatch, one_thread, arch, formulation
):
    c = _config(tmp_path, monkeypatch, arch, formulation)
    run = _run_dir(tmp_path)
    training_loop(run_dir=run, device=torch.device('cpu'), **c)
    state = torch.load(glob.glob(os.path.join(run, 'training-state-0000000.pt'))[0], weights_only=False)
    assert state['cur_nimg'] == 32
    with open(os.path.join(run, 'network-snapshot-0000000-0.050.pkl'), 'rb') as f:
        data = pickle.load(f)
    net = data['ema']
    inner = net.net if formulation == 'ddpm' else net.unet  # unpickled classes come from the pickle's source
    backbone = {'unet': {'UNet'}, 'dit': {'DiT', 'VPDiT'}, 'mp-dit': {'MPDiT'}}[arch]
    assert type(net).__name__ == ('VPDenoiser' if formulation == 'ddpm' else 'Precond')
    assert backbone & {type(inner).__name__, type(getattr(inner, 'net', getattr(inner, 'dit', inner))).__name__}
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 3, 5)
    assert all(p.dtype == torch.float16 for p in net.parameters())
    batches = list(generate_images(net, data['encoder'], seeds=[0, 1, 2], num_steps=4, device='cpu'))
    images = torch.cat([b.images for b in batches])
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8 and images.float().std() > 0


@pytest.mark.parametrize('formulation', backbones.FORMULATIONS)
@pytest.mark.parametrize('arch', ['unet', 'mp-dit'])
def test_label_dropout_option_reaches_the_net_that_drops_labels(tmp_path, monkeypatch, arch, formulation):
    default = _config(tmp_path, monkeypatch, arch, formulation).network_kwargs.get('label_dropout', 0)
    assert default == (0.1 if formulation == 'ddpm' else 0)
    net = dnnlib.util.construct_class_by_name(
        **_config(tmp_path, monkeypatch, arch, formulation, label_dropout=0.3).network_kwargs,
        img_resolution=16,
        img_channels=3,
        label_dim=5,
    )
    assert net.label_dropout == 0.3
    with pytest.raises(RunConfigError, match='--label-dropout applies to class-conditional'):
        _config(tmp_path, monkeypatch, arch, formulation, label_dropout=0.3, cond=False)


def _null_label_share(net, n: int = 2000) -> float:
    """Share of training-mode calls in which DiT's label table sees the null label (index label_dim), for n
    images of real classes: every label dropout the net applies, Precond's or DiT's own."""
    seen = []
    table = next(m for m in net.modules() if isinstance(m, DiT)).y_embedder.embedding_table
    handle = table.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    x, labels = torch.randn(n, 3, 16, 16), torch.eye(5)[torch.arange(n) % 5]
    try:
        with torch.no_grad():
            net.train()(x, torch.full([n], 2.0 if isinstance(net, Precond) else 500), labels)
    finally:
        handle.remove()
    return (seen[0] == 5).float().mean().item()


@pytest.mark.parametrize('formulation', backbones.FORMULATIONS)
def test_label_dropout_option_is_the_share_of_null_labels_dit_sees_in_training(
    tmp_path, monkeypatch, one_thread, formulation
):
    for label_dropout, expected in ((None, 0.1 if formulation == 'ddpm' else 0.0), (0.0, 0.0), (0.4, 0.4)):
        torch.manual_seed(0)
        opts = {} if label_dropout is None else dict(label_dropout=label_dropout)
        kwargs = _config(tmp_path, monkeypatch, 'dit', formulation, **opts).network_kwargs
        net = dnnlib.util.construct_class_by_name(**kwargs, img_resolution=16, img_channels=3, label_dim=5)
        share = _null_label_share(net)
        assert abs(share - expected) < 0.04, (label_dropout, share)  # Binomial(2000, p): within 3.6 sigma.


@pytest.mark.parametrize('formulation', backbones.FORMULATIONS)
@pytest.mark.parametrize('arch', backbones.ARCHS)
def test_options_given_reach_the_run_or_are_refused_where_the_backbone_has_no_use_for_them(
    tmp_path, monkeypatch, arch, formulation
):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    reached = {  # Where each option lands when the run uses it.
        'P_mean': lambda c: c.loss_kwargs.get('P_mean'),
        'P_std': lambda c: c.loss_kwargs.get('P_std'),
        'dropout': lambda c: c.network_kwargs.get('dropout'),
        'patch': lambda c: c.network_kwargs.get('patch_size'),
    }
    used = dict(P_mean=formulation == 'edm', P_std=formulation == 'edm', dropout=arch != 'dit', patch=arch != 'unet')
    for option, value in dict(P_mean=-1.3, P_std=0.7, dropout=0.25, patch=8).items():
        if used[option]:
            assert (
                reached[option](training_config('demo-tiny', arch=arch, formulation=formulation, **{option: value}))
                == value
            )
            continue
        with pytest.raises(RunConfigError, match=f'--{option} (does not )?appl'):
            training_config('demo-tiny', arch=arch, formulation=formulation, **{option: value})
    # A preset's own values are no error: demo-tiny carries P_mean, P_std and dropout (the dit-* presets dropout,
    # test_dit_recipe_presets_resolve_to_adamw_at_a_constant_rate_and_a_learned_variance_dit).
    training_config('demo-tiny', arch=arch, formulation=formulation)
    args = ['--dry-run', '--preset=demo-tiny', f'--arch={arch}', f'--formulation={formulation}', '--workers=0']
    if not all(used.values()):
        bad = next(f'--{option}=0.5' if option != 'patch' else '--patch=2' for option in used if not used[option])
        assert_one_line_error(CliRunner().invoke(train_edm2.main, [*args, bad]), bad.split('=')[0])


@pytest.mark.parametrize('formulation', backbones.FORMULATIONS)
def test_conv_mlp_option_builds_token_convolutions_into_mp_dit_and_is_refused_elsewhere(
    tmp_path, monkeypatch, formulation
):
    for conv_mlp in (False, True):
        net = dnnlib.util.construct_class_by_name(
            **_config(tmp_path, monkeypatch, 'mp-dit', formulation, conv_mlp=conv_mlp).network_kwargs,
            img_resolution=16,
            img_channels=3,
            label_dim=5,
        )
        convs = [m for m in net.modules() if type(m).__name__ == 'MPTokenConv']
        assert len(convs) == (2 if conv_mlp else 0)  # one per block
    for arch in ('unet', 'dit'):
        with pytest.raises(RunConfigError, match='--conv-mlp applies to --arch=mp-dit'):
            _config(tmp_path, monkeypatch, arch, formulation, conv_mlp=True)


def test_posthoc_ema_of_ddpm_snapshots_is_a_vp_denoiser_in_the_span_of_the_snapshots(tmp_path, monkeypatch, one_thread):
    c = _config(tmp_path, monkeypatch, 'dit', 'ddpm')
    c.update(total_nimg=2048, snapshot_nimg=1024, checkpoint_nimg=None, status_nimg=None, snapshot_fp32=True)
    c.network_kwargs.depth = 1
    run = _run_dir(tmp_path)
    training_loop(run_dir=run, device=torch.device('cpu'), **c)
    inputs = sorted(glob.glob(os.path.join(run, 'network-snapshot-*.pkl')))
    assert len(inputs) == 4
    ((std, data),) = reconstruct_phema.reconstruct_phema(inputs, out_std=[0.07], out_kimg=2)
    result = data['ema']
    assert type(result).__name__ == 'VPDenoiser' and result.diffusion.variance == 'learned_range'
    # A reconstruction is a linear combination of the snapshots, so every parameter lies in their span.
    nets = [pickle.load(open(p, 'rb'))['ema'] for p in inputs]
    key = 'net.final_layer.linear.weight'
    stacked = torch.stack([dict(n.named_parameters())[key].flatten() for n in nets], dim=1).double()
    target = dict(result.named_parameters())[key].flatten().double()
    residual = target - stacked @ torch.linalg.lstsq(stacked, target[:, None]).solution.flatten()
    assert target.abs().max() > 0 and residual.abs().max() < 1e-5 * target.abs().max()
    images = next(iter(generate_images(result, data['encoder'], seeds=[0], num_steps=2, device='cpu'))).images
    assert images.shape == (1, 3, 16, 16)


def test_dit_run_resumed_from_a_checkpoint_continues_identically(tmp_path, monkeypatch, one_thread):
    c = _config(tmp_path, monkeypatch, 'dit', 'ddpm')
    c.update(total_nimg=48, snapshot_nimg=None)
    straight, resumed = _run_dir(tmp_path, 'straight'), _run_dir(tmp_path, 'resumed')
    training_loop(run_dir=straight, device=torch.device('cpu'), **c)
    training_loop(run_dir=resumed, device=torch.device('cpu'), **dict(c, stop_at_nimg=16))
    training_loop(run_dir=resumed, device=torch.device('cpu'), **c)
    a, b = (torch.load(os.path.join(d, 'training-state-0000000.pt'), weights_only=False) for d in (straight, resumed))
    assert a['cur_nimg'] == b['cur_nimg'] == 48
    for key in a['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key
    kimgs = [round(json.loads(line)['Progress/kimg'], 3) for line in open(os.path.join(resumed, 'stats.jsonl'))]
    assert kimgs == [0, 0.016, 0.032, 0.048]  # the second run took only the remaining steps


def test_dit_recipe_presets_resolve_to_adamw_at_a_constant_rate_and_a_learned_variance_dit(tmp_path, monkeypatch):
    _config(tmp_path, monkeypatch, 'dit', 'ddpm')  # makes the 16x16 shapes data
    (data,) = glob.glob(str(tmp_path.parent / 'cache' / 'datasets' / 'shapes-16px-*.zip'))
    c = training_config('dit-b-8', data, fp16=True, bench=True)
    assert c.optimizer_kwargs == dict(class_name='torch.optim.AdamW', betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    assert c.loss_kwargs.class_name == 'training.vp_diffusion.VPLoss' and c.loss_kwargs.variance == 'learned_range'
    net = c.network_kwargs
    assert (net.class_name, net.depth, net.hidden_size, net.num_heads, net.patch_size) == (
        'training.backbones.VPDiT',
        12,
        768,
        12,
        8,
    )
    assert c.batch_size == 256 and c.ema_kwargs.class_name == 'training.phema.PowerFunctionEMA'
    assert c.ema_kwargs.betas == [0.9999] and c.ema_kwargs.stds == [0.050, 0.100]  # DiT's EMA beside EDM2's
    lrs = [dnnlib.util.call_func_by_name(cur_nimg=n, batch_size=256, **c.lr_kwargs) for n in (0, 256, 10**9)]
    assert lrs == [1e-4] * 3


def test_patch_size_that_does_not_divide_the_resolution_is_one_clear_line_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    outdir = tmp_path / 'run'
    args = [f'--outdir={outdir}', '--preset=demo-tiny', '--arch=dit', '--patch=3', '--workers=0']
    assert_one_line_error(CliRunner().invoke(train_edm2.main, args), '--patch=3', 'resolution 16')
    assert not outdir.exists()


# ----------------------------------------------------------------------------
# The adapters' maths.


def test_ddpm_adapter_gives_the_backbone_ln_sigma_over_4_of_the_timestep():
    t = torch.tensor([0.0, 1.0, 499.0, 999.0, 250.5])
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    log_sigma = 0.5 * np.log((1 - alphas_cumprod) / alphas_cumprod)
    expected = np.array([log_sigma[0], log_sigma[1], log_sigma[499], log_sigma[999], log_sigma[250:252].mean()]) / 4
    net = backbones.VPBackbone(
        8, 3, 0, backbone='training.networks_dit.MPDiT', patch_size=4, hidden_size=16, depth=1, num_heads=2
    )
    np.testing.assert_allclose(net.noise_labels(t).double().numpy(), expected, rtol=1e-6)
    # VPDenoiser's c_noise (the fractional timestep of a σ) maps back to that σ.
    diffusion = VPDiffusion.from_schedule('linear', 1000)
    sigma = torch.tensor([0.02, 0.5, 3.0, 60.0])
    back = backbones.schedule_log_sigma(diffusion.timestep_of_sigma(sigma)).exp()
    torch.testing.assert_close(back, sigma.double(), rtol=1e-9, atol=0)


def test_ddpm_adapter_feeds_the_backbone_x_t_unscaled_with_one_hot_labels(one_thread):
    torch.manual_seed(0)
    net = backbones.VPBackbone(
        8, 3, 4, backbone='training.networks_dit.MPDiT', patch_size=4, hidden_size=16, depth=1, num_heads=2
    )
    net.net.out_gain.data.fill_(1)
    x, t, labels = torch.randn(2, 3, 8, 8), torch.tensor([10, 900]), torch.eye(4)[[1, 3]]
    direct = net.net(x, net.noise_labels(t), labels)
    torch.testing.assert_close(net(x, t, labels), direct)
    null = net.net(x, net.noise_labels(t), torch.zeros(2, 4))
    torch.testing.assert_close(net(x, t, None), null)


def test_ddpm_adapter_drops_labels_to_the_null_label_in_training_only(one_thread):
    torch.manual_seed(0)
    net = backbones.VPBackbone(
        8, 3, 4, backbone='training.networks_dit.MPDiT', patch_size=4, hidden_size=16, depth=1, num_heads=2
    )
    for name, gain in net.named_parameters():  # Trained gains: at 0 the labels would not reach the output.
        if name.endswith('gain'):
            gain.data.fill_(1)
    x, t, labels = torch.randn(64, 3, 8, 8), torch.full([64], 300), torch.eye(4)[torch.arange(64) % 4]
    with torch.no_grad():
        conditional, null = net(x, t, labels), net(x, t, None)
        assert (conditional - null).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        net.label_dropout = 0.5
        dropped = net(x, t, labels)
        per_image = [torch.allclose(dropped[i], null[i], atol=1e-5) for i in range(64)]
        assert all(per_image[i] or torch.allclose(dropped[i], conditional[i], atol=1e-5) for i in range(64))
        assert 16 <= sum(per_image) <= 48  # Binomial(64, 0.5): outside this range with probability < 1e-4.
        torch.testing.assert_close(net.eval()(x, t, labels), conditional)
    kwargs, _loss = backbones.build_kwargs('unet', 'ddpm', 16, dict(model_channels=8), {})
    assert kwargs.label_dropout == 0.1


@pytest.mark.parametrize('arch, formulation', [('dit', 'edm'), ('dit', 'ddpm'), ('mp-dit', 'ddpm'), ('unet', 'ddpm')])
def test_bf16_option_computes_every_backbone_in_bf16_close_to_fp32(arch, formulation, one_thread):
    from training.precision import prepare_for_sampling

    unet = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    transformer = dict(patch_size=2, hidden_size=32, depth=1, num_heads=2)
    kwargs, _ = backbones.build_kwargs(arch, formulation, 8, unet, transformer, use_fp16='bf16')
    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(img_resolution=8, img_channels=3, label_dim=4, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():  # away from the zero initialisations that silence DiT's and the U-Net's output
            p.normal_(0, 0.3)
    products = [
        m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or 'MPConv' in str(type(m))
    ]
    dtypes = set()
    for m in products:
        m.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    x, labels = torch.randn(2, 3, 8, 8), torch.eye(4)[[1, 3]]
    noise = torch.tensor([1.5, 0.3]) if formulation == 'edm' else torch.tensor([700, 100])
    with torch.no_grad():
        half = net(x, noise, labels)
        assert torch.bfloat16 in dtypes and half.dtype == torch.float32  # MP embeddings stay fp32, as in EDM2
        prepare_for_sampling(net, 'fp32')
        dtypes.clear()
        full = net(x, noise, labels)
    assert dtypes == {torch.float32}
    error = (half - full).norm() / full.norm()
    assert 0 < error < 0.05, error  # bf16 rounding, and not the float32 result


def test_dit_under_edm_gets_timestep_1000_c_noise_and_precond_keeps_the_unet_name():
    torch.manual_seed(0)
    dit_kwargs = dict(patch_size=4, hidden_size=16, depth=1, num_heads=2)
    net = Precond(8, 3, 5, use_fp16=False, backbone='training.backbones.DiTBackbone', **dit_kwargs).eval()
    for p in net.unet.dit.parameters():
        p.data.normal_(0, 0.3)
    assert all(k.startswith(('unet.dit.', 'logvar_')) for k in net.state_dict())
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 7.0]), torch.eye(5)[[0, 4]]
    c_in, c_noise = 1 / (sigma**2 + 0.25).sqrt(), sigma.log() / 4
    F = net.unet.dit(c_in.reshape(-1, 1, 1, 1) * x, 1000 * c_noise, labels)
    c_skip, c_out = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    expected = c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * F
    torch.testing.assert_close(net(x, sigma, labels), expected, rtol=1e-5, atol=1e-5)
    default = Precond(8, 3, 5, use_fp16=False, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    assert all(k.startswith(('unet.', 'logvar_')) for k in default.state_dict()) and default.backbone is None
    mp = Precond(8, 3, 5, use_fp16=False, backbone='training.networks_dit.MPDiT', **dit_kwargs)
    assert isinstance(mp.unet, MPDiT)


def test_vp_denoiser_pickles_and_moves_with_its_schedule_intact():
    torch.manual_seed(0)
    dit = backbones.VPDiT(8, 3, 0, patch_size=4, hidden_size=16, depth=1, num_heads=2).eval()
    for p in dit.parameters():
        p.data.normal_(0, 0.3)
    net = VPLoss(variance='learned_range').export(dit)
    assert isinstance(net.net, DiT) and (net.img_resolution, net.img_channels, net.label_dim) == (8, 3, 0)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 20.0])
    expected = net(x, sigma)
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone).__name__ == 'VPDenoiser' and clone.sigma_max == net.sigma_max
    torch.testing.assert_close(clone(x, sigma), expected)
    moved = clone.to('meta')  # tables stay float64 on the CPU; a call copies them to the input's device
    assert moved.diffusion.betas.device.type == 'cpu' and moved.diffusion.betas.dtype == torch.float64
    half = pickle.loads(pickle.dumps(net)).half()
    assert half.diffusion.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(half(x, sigma), expected, rtol=0.05, atol=0.05)
    # D(x; σ) = x − σ·ε̂(x/√(σ²+1), t(σ)) (EDM Table 1, VP column) with ε̂ the first 3 output channels.
    t = net.diffusion.timestep_of_sigma(sigma).float()
    eps = dit(x / (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1), t, None)[:, :3]
    torch.testing.assert_close(expected, x - sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-5, atol=1e-5)
