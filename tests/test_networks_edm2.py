"""Tests for training/networks_edm2.py: MP maths, state-dict layout, preconditioning, precision, training."""

import copy
import math

import numpy as np
import pytest
import torch

from training import networks_edm2 as nets

TINY = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=10,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=2,
    attn_resolutions=[8],
    channels_per_head=8,
    logvar_channels=8,
)


def tiny_precond(**overrides) -> nets.Precond:
    """A tiny Precond whose learned gains are non-zero, so the U-Net output actually matters."""
    net = nets.Precond(**{**TINY, **overrides})
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        for block in net.unet.modules():
            if isinstance(block, nets.Block):
                block.emb_gain.fill_(0.5)
    return net.eval()


def assert_unit_mean_square(ms: torch.Tensor, bias: float = 0.0) -> None:
    """ms holds mean squares of independent units, each with expectation 1 (up to `bias`).

    Their average must lie within 5 standard errors (estimated from the units themselves) of 1.
    """
    ms = ms.double().flatten()
    se = ms.std() / math.sqrt(ms.numel())
    assert abs(ms.mean().item() - 1) < 5 * se.item() + bias, (ms.mean().item(), se.item())


def record_input(module: torch.nn.Module, store: dict, key: str) -> None:
    """Keep the latest first positional input of module in store[key] (the hook returns None: no change)."""
    module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0]))


def record_output(module: torch.nn.Module, store: dict, key: str) -> None:
    """Keep the latest output of module in store[key]."""
    module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))


# ----------------------------------------------------------------------------
# Magnitude preservation of each MP op on unit-variance inputs.


def test_normalize_matches_closed_form_per_row_and_per_pixel():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 3, 4) * 3
    rms_row = x.pow(2).mean(dim=[1, 2, 3], keepdim=True).sqrt()
    torch.testing.assert_close(nets.normalize(x), x / (1e-4 + rms_row))
    rms_pix = x.pow(2).mean(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(nets.normalize(x, dim=1), x / (1e-4 + rms_pix))
    assert torch.allclose(nets.normalize(x, dim=1).pow(2).mean(dim=1), torch.ones(5, 3, 4), atol=1e-3)


def test_normalize_of_bf16_on_cpu_divides_in_float32_and_rounds_once():
    # The fast CPU path: the float32 result rounded to bf16 once (dividing by a bf16-rounded norm differs).
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 8, 8) * 3).bfloat16().to(memory_format=torch.channels_last).requires_grad_()
    y = nets.normalize(x, dim=1)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, nets.normalize(x.float(), dim=1).bfloat16())
    x32 = x.detach().float().requires_grad_()
    grad = torch.randn(4, 16, 8, 8)
    (y.float() * grad).sum().backward()
    (nets.normalize(x32, dim=1) * grad).sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=2e-2, atol=2e-2)


def test_normalize_gradient_is_finite_at_an_all_zero_slice():
    # Zero slices occur (text features at padding tokens); their gradient must not poison the batch with NaN.
    x = torch.randn(3, 8)
    x[1] = 0
    x.requires_grad_(True)
    (nets.normalize(x, dim=1) * torch.randn(3, 8)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_mp_silu_keeps_unit_rms():
    torch.manual_seed(0)
    y = nets.mp_silu(torch.randn(1 << 20))
    # 0.596 is E[silu(x)^2]^0.5 rounded to 3 digits: up to 2e-3 relative bias in the mean square.
    assert_unit_mean_square(y.pow(2), bias=2e-3)


@pytest.mark.parametrize('t', [0.3, 0.5, 0.8])
def test_mp_sum_keeps_unit_rms(t):
    torch.manual_seed(0)
    a, b = torch.randn(2, 1 << 20)
    y = nets.mp_sum(a, b, t=t)
    torch.testing.assert_close(y, ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2))
    assert_unit_mean_square(y.pow(2))


@pytest.mark.parametrize('t', [0.3, 0.5])
def test_mp_cat_keeps_unit_rms_for_unequal_channel_counts(t):
    torch.manual_seed(0)
    a = torch.randn(512, 8, 4, 4)
    b = torch.randn(512, 24, 4, 4)
    y = nets.mp_cat(a, b, t=t)
    assert y.shape == (512, 32, 4, 4)
    # The two parts' share of the total energy follows the balance t.
    ea, eb = y[:, :8].pow(2).sum(), y[:, 8:].pow(2).sum()
    assert abs((ea / (ea + eb)).item() - (1 - t) ** 2 / ((1 - t) ** 2 + t**2)) < 0.02
    assert_unit_mean_square(y.pow(2).mean(dim=[1, 2, 3]))


def test_mp_linear_with_random_weights_keeps_unit_rms_and_scales_with_gain():
    torch.manual_seed(0)
    layer = nets.MPConv(64, 32, kernel=[]).eval()
    with torch.no_grad():
        layer.weight.mul_(3)  # an unnormalised stored weight must not change the output magnitude
    x = torch.randn(4096, 64)
    y = layer(x)
    assert_unit_mean_square(y.pow(2).mean(dim=1))
    torch.testing.assert_close(layer(x, gain=2.5), 2.5 * y)


def test_mp_conv_with_random_weights_keeps_unit_rms_away_from_border():
    torch.manual_seed(0)
    layer = nets.MPConv(16, 24, kernel=[3, 3]).eval()
    y = layer(torch.randn(512, 16, 10, 10))
    # Zero padding removes terms at the border, so only interior pixels have expectation 1.
    assert_unit_mean_square(y[:, :, 1:-1, 1:-1].pow(2).mean(dim=[1, 2, 3]))


def test_mp_fourier_keeps_unit_rms_and_matches_buffers():
    torch.manual_seed(0)
    layer = nets.MPFourier(4096)
    x = torch.randn(1024)
    y = layer(x)
    torch.testing.assert_close(y, math.sqrt(2) * torch.cos(x[:, None] * layer.freqs + layer.phases))
    # Channels draw f and φ independently; each has expectation 1 over φ ~ U[0, 1).
    assert_unit_mean_square(y.pow(2).mean(dim=0))


def test_resample_up_repeats_pixels_and_down_inverts_it():
    torch.manual_seed(0)
    x = torch.randn(256, 4, 8, 8)
    up = nets.resample(x, mode='up')
    torch.testing.assert_close(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert_unit_mean_square(up.pow(2).mean(dim=[1, 2, 3]))
    # Down on a signal constant over 2x2 tiles (the low-frequency content images carry) keeps it.
    down = nets.resample(up, mode='down')
    torch.testing.assert_close(down, x)
    assert_unit_mean_square(down.pow(2).mean(dim=[1, 2, 3]))
    assert nets.resample(x, mode='keep') is x


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('mode', ['down', 'up'])
def test_box_resample_by_pooling_equals_the_depthwise_convolution(dtype, channels_last, mode):
    # The 2x2 box runs as average pooling / nearest upsampling; the general path is the (transposed) depthwise
    # convolution by the filter. Same values and gradients, up to the order of the 4-term sums.
    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, 16).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fast, conv = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_conv = nets.resample(fast, [1, 1], mode), nets.resample_by_conv(conv, [1, 1], mode)
    grad = torch.randn_like(y_conv)
    (y_fast * grad).sum().backward()
    (y_conv * grad).sum().backward()
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 and mode == 'up' else {}
    torch.testing.assert_close(y_fast, y_conv, **tol)
    torch.testing.assert_close(fast.grad, conv.grad)
    assert y_fast.shape == y_conv.shape and y_fast.dtype == dtype


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_clip_has_the_values_and_gradients_of_tensor_clip_at_and_beside_the_limits(dtype):
    # clip's backward is hardtanh's (an open interval) with bounds one step of the dtype outside ±limit; x.clip's
    # gradient also passes at exactly ±limit. Checked there, one step either side, and on random values.
    torch.manual_seed(0)
    limits, inf = torch.tensor([-256.0, 256.0], dtype=dtype), torch.tensor(math.inf, dtype=dtype)
    edges = torch.cat([limits, torch.nextafter(limits, inf), torch.nextafter(limits, -inf)])
    x = torch.cat([edges, (torch.randn(1000) * 300).to(dtype)])
    fast, plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = (torch.rand(len(x)) + 0.5).to(dtype)
    y_fast, y_plain = nets.clip(fast, 256), plain.clip(-256, 256)
    y_fast.backward(grad)
    y_plain.backward(grad)
    assert torch.equal(y_fast, y_plain) and torch.equal(nets.clip(x, 256), y_plain)
    assert torch.equal(fast.grad, plain.grad)
    assert fast.grad[:2].tolist() == grad[:2].tolist() and (fast.grad[6:] == 0).sum() > 100


def test_resample_with_a_longer_filter_keeps_a_constant_image_inside():
    x = torch.full([1, 2, 8, 8], 3.0)
    down = nets.resample(x, [1, 3, 3, 1], 'down')
    assert down.shape == (1, 2, 4, 4)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full([1, 2, 2, 2], 3.0))
    up = nets.resample(x, [1, 3, 3, 1], 'up')
    assert up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full([1, 2, 12, 12], 3.0))
    with pytest.raises(ValueError, match='resample mode'):
        nets.resample(x, [1, 1], 'sideways')


def test_resample_down_halves_rms_of_white_noise_and_encoder_pixel_norm_restores_it():
    torch.manual_seed(0)
    x = torch.randn(256, 32, 8, 8)
    down = nets.resample(x, mode='down')
    # A 2x2 mean of 4 independent unit values has variance 1/4.
    assert_unit_mean_square(4 * down.pow(2).mean(dim=[1, 2, 3]))
    # The encoder block pixel-normalises right after downsampling, restoring unit RMS per pixel.
    block = nets.Block(32, 32, 8, flavor='enc', resample_mode='down').eval()
    seen = {}
    record_input(block.conv_res0, seen, 'x')
    block(x, torch.randn(256, 8))
    rms = down.pow(2).mean(dim=1, keepdim=True).sqrt()
    torch.testing.assert_close(seen['x'], nets.mp_silu(down / (1e-4 + rms)))


# ----------------------------------------------------------------------------
# Forced weight normalisation.


def test_training_forward_normalises_stored_weight_rows_and_eval_leaves_them():
    torch.manual_seed(0)
    layer = nets.MPConv(6, 5, kernel=[3, 3])
    with torch.no_grad():
        layer.weight.mul_(torch.rand(5, 1, 1, 1) * 4 + 0.1)
    raw = layer.weight.detach().clone()
    layer.eval()(torch.randn(2, 6, 8, 8))
    assert torch.equal(layer.weight, raw)

    layer.train()(torch.randn(2, 6, 8, 8))
    fan_in = 6 * 3 * 3
    row_norm = torch.linalg.vector_norm(layer.weight.flatten(1), dim=1)
    # eps = 1e-4 against raw row RMS >= ~0.1 allows a relative shortfall of up to ~1e-3.
    torch.testing.assert_close(row_norm, torch.full((5,), math.sqrt(fan_in)), rtol=2e-3, atol=0)
    raw_rms = raw.flatten(1).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(layer.weight, raw / (1e-4 + raw_rms[:, None, None, None]))


def test_gradients_flow_and_are_orthogonal_to_normalised_weight_rows():
    torch.manual_seed(0)
    layer = nets.MPConv(12, 7, kernel=[]).train()
    x = torch.randn(32, 12, requires_grad=True)
    layer(x).pow(2).sum().backward()
    g, w = layer.weight.grad, layer.weight.detach()
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and x.grad.abs().sum() > 0
    # Normalisation removes the radial component: each row's gradient is perpendicular to the row.
    cos = (g * w).sum(dim=1) / (g.norm(dim=1) * w.norm(dim=1))
    assert cos.abs().max() < 1e-3


# ----------------------------------------------------------------------------
# State-dict layout (EDM2's released pickles) and parameter counts (EDM2's published model sizes).


def expected_tiny_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """TINY's state dict written out by hand: channels 16 at 16x16 and 32 at 8x8, embedding 32."""

    def block(prefix, cin, cout, flavor, attn):
        d = {
            f'{prefix}.emb_gain': (),
            f'{prefix}.conv_res0.weight': (cout, cout if flavor == 'enc' else cin, 3, 3),
            f'{prefix}.emb_linear.weight': (cout, 32),
            f'{prefix}.conv_res1.weight': (cout, cout, 3, 3),
        }
        if cin != cout:
            d[f'{prefix}.conv_skip.weight'] = (cout, cin, 1, 1)
        if attn:
            d[f'{prefix}.attn_qkv.weight'] = (3 * cout, cout, 1, 1)
            d[f'{prefix}.attn_proj.weight'] = (cout, cout, 1, 1)
        return d

    e, d = 'unet.enc', 'unet.dec'
    return {
        'logvar_fourier.freqs': (8,),
        'logvar_fourier.phases': (8,),
        'logvar_linear.weight': (1, 8),
        'unet.out_gain': (),
        'unet.emb_fourier.freqs': (16,),
        'unet.emb_fourier.phases': (16,),
        'unet.emb_noise.weight': (32, 16),
        'unet.emb_label.weight': (32, 10),
        f'{e}.16x16_conv.weight': (16, 4, 3, 3),
        **block(f'{e}.16x16_block0', 16, 16, 'enc', False),
        **block(f'{e}.16x16_block1', 16, 16, 'enc', False),
        **block(f'{e}.8x8_down', 16, 16, 'enc', False),
        **block(f'{e}.8x8_block0', 16, 32, 'enc', True),
        **block(f'{e}.8x8_block1', 32, 32, 'enc', True),
        **block(f'{d}.8x8_in0', 32, 32, 'dec', True),
        **block(f'{d}.8x8_in1', 32, 32, 'dec', False),
        **block(f'{d}.8x8_block0', 64, 32, 'dec', True),
        **block(f'{d}.8x8_block1', 64, 32, 'dec', True),
        **block(f'{d}.8x8_block2', 48, 32, 'dec', True),
        **block(f'{d}.16x16_up', 32, 32, 'dec', False),
        **block(f'{d}.16x16_block0', 48, 16, 'dec', False),
        **block(f'{d}.16x16_block1', 32, 16, 'dec', False),
        **block(f'{d}.16x16_block2', 32, 16, 'dec', False),
        'unet.out_conv.weight': (3, 16, 3, 3),
    }


def test_state_dict_names_and_shapes_match_spec():
    net = nets.Precond(**TINY)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == expected_tiny_state_dict_shapes()
    assert list(net.unet.enc) == [
        "16x16_conv", "16x16_block0", "16x16_block1", "8x8_down", "8x8_block0", "8x8_block1",
    ]  # fmt: skip
    assert list(net.unet.dec) == [
        "8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "8x8_block2",
        "16x16_up", "16x16_block0", "16x16_block1", "16x16_block2",
    ]  # fmt: skip
    assert {k for k, _ in net.named_buffers()} == {k for k in got if k.endswith(('freqs', 'phases'))}


def test_unconditional_net_has_no_label_embedding():
    net = nets.Precond(**{**TINY, 'label_dim': 0})
    expected = {k for k in expected_tiny_state_dict_shapes() if k != 'unet.emb_label.weight'}
    assert set(net.state_dict()) == expected


@pytest.mark.parametrize(
    'model_channels, published_millions',
    [(128, 125), (192, 280), (256, 498), (320, 777), (384, 1119), (448, 1523)],
)
def test_img512_parameter_counts_match_published_table(model_channels, published_millions):
    with torch.device('meta'):
        net = nets.Precond(img_resolution=64, img_channels=4, label_dim=1000, model_channels=model_channels)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / 1e6 - published_millions) <= 0.005 * published_millions, count


def test_decoder_blocks_read_mp_cat_of_previous_output_and_matching_encoder_skip():
    torch.manual_seed(0)
    net = tiny_precond(concat_balance=0.3)
    unet, outputs, inputs = net.unet, {}, {}
    for prefix, modules in [('enc', unet.enc), ('dec', unet.dec)]:
        for name, module in modules.items():
            record_output(module, outputs, f'{prefix}.{name}')
            record_input(module, inputs, f'{prefix}.{name}')
    net(torch.randn(2, 3, 16, 16), 1.0, torch.eye(10)[[2, 3]])
    # (decoder block, decoder module before it, encoder output it pairs with): skips pair in reverse order.
    pairs = [
        ("8x8_block0", "8x8_in1", "8x8_block1"), ("8x8_block1", "8x8_block0", "8x8_block0"),
        ("8x8_block2", "8x8_block1", "8x8_down"), ("16x16_block0", "16x16_up", "16x16_block1"),
        ("16x16_block1", "16x16_block0", "16x16_block0"), ("16x16_block2", "16x16_block1", "16x16_conv"),
    ]  # fmt: skip
    t = 0.3
    for block, prev, skip in pairs:
        a, b = outputs[f'dec.{prev}'], outputs[f'enc.{skip}']
        Na, Nb = a.shape[1], b.shape[1]
        C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
        expected = torch.cat([C * (1 - t) / math.sqrt(Na) * a, C * t / math.sqrt(Nb) * b], dim=1)
        torch.testing.assert_close(inputs[f'dec.{block}'], expected)


# ----------------------------------------------------------------------------
# Preconditioning (EDM Table 1, EDM2 Eq. 21).


class RecordingUNet(torch.nn.Module):
    """Stands in for the U-Net: F(x; c_noise) = 2·x + c_noise, recording what it was given."""

    def forward(self, x, noise_labels, class_labels):
        self.seen = (x, noise_labels, class_labels)
        return 2 * x + noise_labels.reshape(-1, 1, 1, 1)


def test_preconditioning_matches_closed_forms():
    torch.manual_seed(0)
    net = nets.Precond(**TINY, sigma_data=0.7)
    net.unet = RecordingUNet()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.7, 30.0], dtype=torch.float64)
    D, logvar = net(x, sigma, return_logvar=True)

    s, sd = sigma.reshape(-1, 1, 1, 1), 0.7
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    c_noise = sigma.log() / 4
    expected = c_skip * x + c_out * (2 * c_in * x + c_noise.reshape(-1, 1, 1, 1))
    assert D.dtype == torch.float32 and D.shape == x.shape
    torch.testing.assert_close(D.double(), expected, rtol=1e-5, atol=1e-5)
    x_in, noise_labels, labels = net.unet.seen
    torch.testing.assert_close(x_in.double(), c_in * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(noise_labels.double(), c_noise, rtol=1e-6, atol=1e-6)
    assert torch.equal(labels, torch.zeros(3, 10))

    fourier = math.sqrt(2) * torch.cos(c_noise.float()[:, None] * net.logvar_fourier.freqs + net.logvar_fourier.phases)
    w = net.logvar_linear.weight
    expected_logvar = fourier @ (w / w.norm(dim=1, keepdim=True)).t()
    torch.testing.assert_close(logvar, expected_logvar.reshape(-1, 1, 1, 1), rtol=1e-4, atol=1e-4)


def test_scalar_and_per_sample_sigma_give_the_same_output():
    torch.manual_seed(0)
    net = tiny_precond()
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[3, 7]]
    ref = net(x, 1.3, labels)
    for sigma in [torch.tensor(1.3), torch.full([2], 1.3), torch.full([2, 1, 1, 1], 1.3)]:
        torch.testing.assert_close(net(x, sigma, labels), ref)
    assert not torch.allclose(net(x, torch.tensor([1.3, 0.2]), labels)[1], ref[1])


def test_class_labels_matter_and_are_ignored_when_label_dim_is_zero():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    cond = tiny_precond()
    assert not torch.allclose(cond(x, 1.0, torch.eye(10)[[1, 2]]), cond(x, 1.0, torch.eye(10)[[5, 6]]))
    uncond = tiny_precond(label_dim=0)
    torch.testing.assert_close(uncond(x, 1.0, torch.eye(10)[[1, 2]]), uncond(x, 1.0))


def test_one_hot_label_embedding_is_a_column_of_the_normalised_weight():
    torch.manual_seed(0)
    net = nets.Precond(**{**TINY, 'label_dim': 1000}).eval()
    seen = {}
    record_output(net.unet.emb_label, seen, 'emb')
    labels = torch.tensor([0, 17, 500, 999])
    net(torch.randn(4, 3, 16, 16), 1.0, torch.eye(1000)[labels])
    # The one-hot is scaled by sqrt(label_dim), so it picks column j of the row-normalised weight.
    w = net.unet.emb_label.weight
    w_hat = w / (1e-4 + w.pow(2).mean(dim=1, keepdim=True).sqrt())
    torch.testing.assert_close(seen['emb'], w_hat[:, labels].t(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Attention and dropout.


def test_attention_equals_plain_softmax_einsum_with_per_head_qkv_split():
    torch.manual_seed(0)
    block = nets.Block(32, 32, 8, flavor='enc', attention=True, channels_per_head=8).eval()
    seen = {}
    record_output(block.attn_qkv, seen, 'qkv')
    record_input(block.attn_proj, seen, 'attn')
    block(torch.randn(2, 32, 4, 4), torch.randn(2, 8))

    qkv = seen['qkv'].double().reshape(2, 4, 8, 3, 16)  # (N, heads, head_channels, q/k/v, pixels)
    q, k, v = (t / (1e-4 + t.pow(2).mean(dim=2, keepdim=True).sqrt()) for t in qkv.unbind(3))
    w = torch.softmax(torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(8), dim=3)
    expected = torch.einsum('nhqk,nhck->nhcq', w, v).reshape(2, 32, 4, 4)
    torch.testing.assert_close(seen['attn'].double(), expected, rtol=1e-5, atol=1e-5)


def ref_weight(conv) -> torch.Tensor:
    """An MP conv/linear weight as used: rows normalised to unit RMS, divided by sqrt(fan_in), float64."""
    w = conv.weight.double()
    rms = w.flatten(1).pow(2).mean(dim=1).sqrt().reshape(-1, *[1] * (w.ndim - 1))
    return w / (1e-4 + rms) / math.sqrt(w[0].numel())


def ref_silu(v: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(v) / 0.596


def ref_blend(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def reference_block(
    block: nets.Block, x: torch.Tensor, emb: torch.Tensor, res_t: float, attn_t: float, heads: int, clip: float
) -> torch.Tensor:
    """The block of EDM2 Fig. 21 in plain float64 ops, reading only the block's weights."""
    F = torch.nn.functional

    def pixel_norm(v, dim=1):
        return v / (1e-4 + v.pow(2).mean(dim=dim, keepdim=True).sqrt())

    x, emb = x.double(), emb.double()
    if block.resample_mode == 'down':  # 2x2 mean
        x = F.avg_pool2d(x, 2)
    elif block.resample_mode == 'up':  # each pixel repeated over 2x2
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    if block.flavor == 'enc':
        x = pixel_norm(F.conv2d(x, ref_weight(block.conv_skip)) if block.conv_skip is not None else x)
    y = F.conv2d(ref_silu(x), ref_weight(block.conv_res0), padding=1)
    scale = 1 + block.emb_gain.double() * emb @ ref_weight(block.emb_linear).t()
    y = F.conv2d(ref_silu(y * scale[:, :, None, None]), ref_weight(block.conv_res1), padding=1)
    if block.flavor == 'dec' and block.conv_skip is not None:
        x = F.conv2d(x, ref_weight(block.conv_skip))
    x = ref_blend(x, y, res_t)
    if heads:
        n, c, h, w = x.shape
        qkv = F.conv2d(x, ref_weight(block.attn_qkv)).reshape(n, heads, c // heads, 3, h * w)
        q, k, v = (pixel_norm(t, dim=2) for t in qkv.unbind(3))
        a = torch.softmax(torch.einsum('nhcq,nhck->nhqk', q, k) / math.sqrt(c // heads), dim=3)
        y = F.conv2d(torch.einsum('nhqk,nhck->nhcq', a, v).reshape(n, c, h, w), ref_weight(block.attn_proj))
        x = ref_blend(x, y, attn_t)
    return x.clip(-clip, clip)


def reference_precond(net: nets.Precond, x: torch.Tensor, sigma: float, labels: torch.Tensor | None) -> torch.Tensor:
    """EDM preconditioning (Table 1) of EDM2's U-Net (Fig. 21, default balances) in float64, from the weights
    and the ModuleDict keys alone."""
    F, unet, sd = torch.nn.functional, net.unet, net.sigma_data
    x = x.double()
    c_in, c_noise = 1 / math.sqrt(sigma**2 + sd**2), torch.full([len(x)], math.log(sigma) / 4, dtype=torch.float64)
    fourier = math.sqrt(2) * torch.cos(c_noise[:, None] * unet.emb_fourier.freqs.double() + unet.emb_fourier.phases)
    emb = fourier @ ref_weight(unet.emb_noise).t()
    if labels is not None:
        emb = ref_blend(emb, labels.double() * math.sqrt(labels.shape[1]) @ ref_weight(unet.emb_label).t(), 0.5)
    emb = ref_silu(emb)

    def block(b, h):
        return reference_block(b, h, emb, res_t=0.3, attn_t=0.3, heads=b.num_heads, clip=256)

    h = torch.cat([c_in * x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name, module in unet.enc.items():
        h = F.conv2d(h, ref_weight(module), padding=1) if name.endswith('_conv') else block(module, h)
        skips.append(h)
    for name, module in unet.dec.items():
        if '_block' in name:  # MP-cat, EDM2 Eq. 103, t = 0.5: both parts weighted sqrt(Na + Nb) / sqrt(2 N)
            skip = skips.pop()
            na, nb = h.shape[1], skip.shape[1]
            h = torch.cat([h / math.sqrt(2 * na), skip / math.sqrt(2 * nb)], dim=1) * math.sqrt(na + nb)
        h = block(module, h)
    out = F.conv2d(h, ref_weight(unet.out_conv), padding=1) * unet.out_gain.double()
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2)
    return c_skip * x + c_out * out


@pytest.mark.parametrize('flavor', ['enc', 'dec'])
def test_block_matches_plain_reference(flavor):
    torch.manual_seed(0)
    block = nets.Block(16, 32, 8, flavor=flavor, attention=True, channels_per_head=8, res_balance=0.2,
                       attn_balance=0.4, clip_act=1.5).eval()  # fmt: skip
    with torch.no_grad():
        block.emb_gain.fill_(0.7)
    x, emb = torch.randn(2, 16, 6, 6), torch.randn(2, 8)
    expected = reference_block(block, x, emb, res_t=0.2, attn_t=0.4, heads=4, clip=1.5)
    assert (expected.abs() == 1.5).any()
    torch.testing.assert_close(block(x, emb).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('label_dim', [0, 10])
def test_precond_matches_plain_reference_unet(label_dim):
    torch.manual_seed(0)
    net = tiny_precond(label_dim=label_dim, sigma_data=0.6)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(10)[[2, 7]] if label_dim else None
    for sigma in (0.05, 1.0, 20.0):
        expected = reference_precond(net, x, sigma, labels)
        torch.testing.assert_close(net(x, sigma, labels).double(), expected, rtol=1e-4, atol=1e-4)


def test_dropout_acts_only_in_training():
    torch.manual_seed(0)
    block = nets.Block(16, 16, 8, dropout=0.5)
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    a, b = block.train()(x, emb), block(x, emb)
    assert not torch.allclose(a, b)
    block.eval()
    torch.testing.assert_close(block(x, emb), block(x, emb))
    no_dropout = copy.deepcopy(block)
    no_dropout.dropout = 0
    torch.testing.assert_close(no_dropout.train()(x, emb), block(x, emb))


def test_label_dropout_gives_the_null_label_to_that_fraction_of_training_images_only():
    torch.manual_seed(0)
    net, n, p = tiny_precond(label_dropout=0.25), 800, 0.25
    x, labels = torch.randn(1, 3, 16, 16).expand(n, -1, -1, -1), torch.eye(10)[[3] * n]
    net.train()
    net(x[:1], 1.0, labels[:1])  # The first training call normalises the stored weights; later ones leave them.
    with torch.no_grad():
        out = net(x, 1.0, labels)
        kept, null = net.eval()(x[:1], 1.0, labels[:1]), net(x[:1], 1.0, torch.zeros(1, 10))
    is_null = (out - null).flatten(1).abs().amax(1) < 1e-5
    is_kept = (out - kept).flatten(1).abs().amax(1) < 1e-5
    assert bool((is_null ^ is_kept).all())  # Every image saw either its label or the null label.
    assert abs(is_null.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    torch.testing.assert_close(net(x[:4], 1.0, labels[:4]), kept.expand(4, -1, -1, -1))  # Eval: no dropout.
    with pytest.raises(ValueError, match='label_dropout'):
        tiny_precond(label_dropout=1.0)


# ----------------------------------------------------------------------------
# Precision.


def test_fp16_stored_weights_run_on_cpu_in_float32():
    torch.manual_seed(0)
    net = tiny_precond()
    half = copy.deepcopy(net)
    for p in half.parameters():
        p.data = p.data.half()
    rounded = copy.deepcopy(half).float()
    x, labels = torch.randn(2, 3, 16, 16), torch.eye(10)[[0, 1]]
    ref, out = net(x, 0.8, labels), half(x, 0.8, labels)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2
    # Weights are cast to float32 before normalising: same result as float32 copies of the fp16 values.
    torch.testing.assert_close(out, rounded(x, 0.8, labels), rtol=1e-6, atol=1e-6)


def test_bf16_mode_computes_in_bfloat16_on_cpu_close_to_fp32_and_force_fp32_overrides():
    torch.manual_seed(0)
    net = tiny_precond()
    bf16 = copy.deepcopy(net)
    bf16.use_fp16 = 'bf16'
    seen = []
    bf16.unet.out_conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(2, 3, 16, 16)
    ref, out = net(x, 0.8), bf16(x, 0.8)
    assert out.dtype == torch.float32 and seen == [torch.bfloat16]
    assert ((out - ref).norm() / ref.norm()).item() < 5e-2
    torch.testing.assert_close(bf16(x, 0.8, force_fp32=True), ref)
    assert seen[-1] == torch.float32
    with pytest.raises(ValueError):
        nets.Precond(**TINY, use_fp16='fp8')


# ----------------------------------------------------------------------------
# Pickling.


def test_precond_pickles_as_persistent_class_and_reloads_identically():
    import pickle

    from torch_utils import persistence

    torch.manual_seed(0)
    net = tiny_precond()
    assert persistence.is_persistent(net) and persistence.is_persistent(net.unet.enc['8x8_block0'])
    loaded = pickle.loads(pickle.dumps(net))
    assert loaded.init_kwargs['model_channels'] == 16
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x, 0.5, torch.eye(10)[[4, 9]]), net(x, 0.5, torch.eye(10)[[4, 9]]))


# ----------------------------------------------------------------------------
# Training.


def test_tiny_net_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    net = nets.Precond(8, 3, 0, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                       channels_per_head=16, logvar_channels=8).train()  # fmt: skip
    y = torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.3, 0.8, 1.5, 3.0]).reshape(-1, 1, 1, 1)
    n = torch.randn_like(y) * sigma
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    losses = []
    for _ in range(12):
        D, logvar = net(y + n, sigma, return_logvar=True)
        loss = (weight / logvar.exp() * (D - y) ** 2 + logvar).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses
