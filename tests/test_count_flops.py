import re
import warnings

import pytest
import torch
from click.testing import CliRunner

import count_flops
from count_flops import count_ops
from training.networks_edm2 import Precond
from training.snapshots import PickleWarning, save_network_pickle

PUBLISHED_GFLOPS = {'xs': 46, 's': 102, 'm': 181, 'l': 282, 'xl': 406, 'xxl': 552}  # EDM2 Table 2


def test_count_ops_counts_multiply_adds_once_and_elementwise_work_per_element():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(5, 3, 3, 3)
    a, b = torch.randn(4, 6), torch.randn(6, 7)
    v = torch.randn(50)
    assert count_ops(lambda: torch.nn.functional.conv2d(x, w, padding=1)) == 2 * 5 * 3 * 9 * 8 * 8
    assert count_ops(lambda: a @ b) == 4 * 6 * 7
    assert count_ops(lambda: torch.nn.functional.silu(v) * 2) == 50 + 50
    assert count_ops(lambda: torch.linalg.vector_norm(v)) == 50
    assert count_ops(lambda: v.reshape(5, 10).t().clone()) == 0  # data movement is free


def test_xs_preset_matches_published_gflops():
    net = count_flops.build_train_preset_net('edm2-img512-xs')
    assert (net.img_resolution, net.img_channels, net.label_dim) == (64, 4, 1000)
    gflops = count_flops.count_flops(net) / 1e9
    assert abs(gflops / PUBLISHED_GFLOPS['xs'] - 1) < 0.02, gflops


@pytest.mark.slow
@pytest.mark.parametrize('size', ['s', 'm', 'l', 'xl', 'xxl'])
def test_larger_presets_match_published_gflops(size):
    gflops = count_flops.count_flops(count_flops.build_train_preset_net(f'edm2-img512-{size}')) / 1e9
    assert abs(gflops / PUBLISHED_GFLOPS[size] - 1) < 0.02, gflops


def test_generation_presets_count_net_and_guiding_net_from_their_names():
    nets = count_flops.resolve('edm2-img512-s-uncond-autog-fid')
    assert [role for role, _ in nets] == ['net', 'gnet']
    assert [(net.unet.enc['64x64_conv'].weight.shape[0], net.label_dim) for _, net in nets] == [(192, 0), (128, 0)]
    ((_, net),) = count_flops.resolve('edm2-img64-s-fid')
    assert (net.img_channels, net.label_dim) == (3, 1000)


def gflops_line(output: str) -> float:
    return float(re.search(r'net: ([\d.]+) Gflops', output).group(1))


def test_pickle_counts_the_same_as_the_preset_that_built_it(tmp_path):
    # demo-tiny trains this net on the 16x16 shapes data (5 classes); here it is built on the CPU and pickled.
    net = Precond(16, 3, 5, use_fp16=False, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    path = str(tmp_path / 'network-snapshot-0000001-0.050.pkl')
    save_network_pickle({'ema': net.eval()}, path)
    runner = CliRunner()
    from_pickle, from_preset, from_folder = (
        runner.invoke(count_flops.main, [arg]) for arg in (path, 'demo-tiny', str(tmp_path))
    )
    assert from_pickle.exit_code == 0, from_pickle.output
    assert gflops_line(from_pickle.output) == gflops_line(from_preset.output) == gflops_line(from_folder.output) > 0
    # About 0.019 Gflops: printed to three significant figures, not as 0.02.
    assert gflops_line(from_pickle.output) == pytest.approx(count_flops.count_flops(net) / 1e9, rel=5e-3)


def test_trust_pickles_flag_silences_the_notice(tmp_path):
    # README: --trust-pickles on every script that loads networks; the notice itself names the flag.
    net = Precond(16, 3, 5, use_fp16=False, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    path = str(tmp_path / 'network-snapshot-0000001-0.050.pkl')
    save_network_pickle({'ema': net.eval()}, path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        result = CliRunner().invoke(count_flops.main, ['--trust-pickles', path])
    assert result.exit_code == 0, result.output
    assert gflops_line(result.output) > 0
    assert not [w for w in seen if issubclass(w.category, PickleWarning)]


def test_unknown_name_is_a_one_line_error(tmp_path):
    for arg in ['edm2-img512-huge', str(tmp_path / 'missing.pkl')]:
        result = CliRunner().invoke(count_flops.main, [arg])
        assert result.exit_code == 1 and 'Traceback' not in result.output
        assert len(result.output.strip().splitlines()) == 1 and arg in result.output


def test_a_clip_guide_pickle_is_a_one_line_refusal(tmp_path):
    from test_clip_guide import tiny_guide

    path = str(tmp_path / 'guide.pkl')
    save_network_pickle(dict(ema=tiny_guide().eval()), path)
    result = CliRunner().invoke(count_flops.main, [path])
    assert result.exit_code == 1 and 'this is a CLIP guide' in result.output and 'Traceback' not in result.output


def test_a_training_state_is_refused_without_naming_an_option_count_flops_lacks(tmp_path):
    from training.checkpoint import rng_state, save_checkpoint

    state = str(tmp_path / 'training-state-0000002.pt')
    save_checkpoint(state, dict(net={}, optimizer={}, ema={}, cur_nimg=0, loss_fn=None, rng=rng_state()))
    result = CliRunner().invoke(count_flops.main, [state])
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert 'is an edm2x training state' in result.output and '--net' not in result.output


DIT_TABLE_4 = {'DiT-S/2': (33.0, 6.06), 'DiT-B/2': (130.5, 23.01), 'DiT-XL/2': (675.1, 118.64)}  # M params, Gflops


@pytest.mark.parametrize('size', sorted(DIT_TABLE_4))
def test_dit_sizes_match_dits_parameters_and_multiply_add_gflops(size):
    result = CliRunner().invoke(count_flops.main, [size])
    assert result.exit_code == 0, result.output
    match = re.fullmatch(
        r'net: ([\d.]+) Gflops per image, ([\d.]+) in multiply-adds alone \(4x32x32, 1000 classes, ([\d.]+)M parameters\)',
        result.output.strip(),
    )
    total, macs, params = (float(g) for g in match.groups())
    assert params == DIT_TABLE_4[size][0]
    assert abs(macs / DIT_TABLE_4[size][1] - 1) < 0.002 and macs < total < 1.01 * macs


def test_dit_checkpoint_and_preset_count_the_net_their_names_and_weights_give(tmp_path):
    from training.networks_dit import DiT

    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=1, num_classes=5)
    torch.save(dit.state_dict(), tmp_path / 'tiny.pt')
    ((_, net),) = count_flops.resolve(str(tmp_path / 'tiny.pt'))
    assert count_flops.count_parameters(net) == sum(v.numel() for v in dit.state_dict().values())
    # Multiply-adds by hand: patch embedding, per block qkv/proj/MLP and attention, adaLN, t-MLP, final linear.
    tokens, hidden, depth = 16, 64, 2
    per_block = (
        tokens * (4 * hidden * hidden + 8 * hidden * hidden) + 2 * tokens * tokens * hidden + 6 * hidden * hidden
    )
    expected = tokens * 16 * hidden + depth * per_block + 256 * hidden + hidden * hidden + 2 * hidden * hidden
    expected += tokens * hidden * 2 * 2 * 8
    assert count_flops.count_flops(net, elementwise=False) == expected
    ((_, net512),) = count_flops.resolve('dit-xl2-512')
    assert (net512.img_resolution, net512.label_dim) == (64, 1000)
    assert abs(count_flops.count_flops(net512, elementwise=False) / 1e9 / 524.6 - 1) < 0.002  # DiT Table 4


def test_training_presets_count_the_network_train_edm2_builds():
    # dit-s-2 trains DiT-S/2 on 32x32x4 latents (DiT Table 4: 33.0M parameters, 6.06 Gflops in multiply-adds).
    dit = count_flops.build_train_preset_net('dit-s-2')
    assert type(dit).__name__ == 'VPDiT' and (dit.img_resolution, dit.img_channels) == (32, 4)
    assert abs(count_flops.count_flops(dit, elementwise=False) / 1e9 - 6.06) < 0.02
    assert type(count_flops.build_train_preset_net('demo-dit').unet).__name__ == 'MPDiT'
    sr = count_flops.build_train_preset_net('demo-sr')  # reads a low-res image besides x
    assert count_flops.count_flops(sr) > count_flops.count_flops(count_flops.build_train_preset_net('demo-tiny'))
    result = CliRunner().invoke(count_flops.main, ['demo-clip'])
    assert result.exit_code == 1 and 'trains a CLIP guide' in result.output
