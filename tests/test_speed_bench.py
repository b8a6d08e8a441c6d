"""Tests for the figures of training/throughput.py: flops against a per-layer count, Tflop/s and MFU arithmetic."""

import pytest
import torch

import dnnlib
from training import networks_edm2 as nets
from training.throughput import ThroughputError, describe, forward_flops_per_image, time_sampling, time_training_steps

TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8)


def layer_by_layer_flops(net: nets.Precond, x: torch.Tensor, labels: torch.Tensor) -> float:
    """2 flops per multiply-add of every MP layer (from its output size and fan-in) and of attention's two products
    (pixels² · channels each), summed over one forward pass by hooks. The 2x2 resampling (average pooling and
    pixel copies) is elementwise work and not counted, like the rest of it."""
    total = []

    def conv_hook(module, args, out):
        total.append(2 * out.numel() * module.weight[0].numel())

    def attn_hook(module, args, out):
        n, c, h, w = out.shape
        total.append(2 * 2 * n * (h * w) ** 2 * c)

    for m in net.modules():
        if isinstance(m, nets.MPConv):
            m.register_forward_hook(conv_hook)
        if isinstance(m, nets.Block) and m.num_heads:
            m.attn_proj.register_forward_pre_hook(lambda module, args: attn_hook(module, args, args[0]))
    with torch.no_grad():
        net(x, torch.ones(len(x)), labels)
    return sum(total) / len(x)


def test_forward_flops_match_a_layer_by_layer_count():
    net = nets.Precond(8, 3, 4, use_fp16=False, logvar_channels=8, **TINY)
    x, labels = torch.randn([3, 3, 8, 8]), torch.eye(4)[[0, 1, 2]]
    assert forward_flops_per_image(net, 3, 8, 4) == pytest.approx(layer_by_layer_flops(net, x, labels), rel=1e-6)


def test_training_and_sampling_figures_are_consistent(one_thread):
    r = time_training_steps('demo-tiny', batch=2, label_dim=5, steps=1, peak_tflops=1.0, clock='process')
    assert r.tflops == pytest.approx(r.gflops_per_img * r.img_s / 1e3) and r.mfu == pytest.approx(r.tflops / 1.0)
    s = time_sampling('demo-tiny', batch=2, label_dim=5, steps=1, sampler_steps=4)
    assert s.img_s == pytest.approx(s.evals_s / 7) and s.mfu is None
    assert r.gflops_per_img == pytest.approx(3 * s.gflops_per_img / 7)  # 3 passes per trained image, 7 per sampled


def test_checkpointing_times_u_nets_only_and_process_clock_only_on_cpu(one_thread):
    assert time_training_steps('demo-tiny', batch=2, label_dim=5, steps=1, checkpointing=True).img_s > 0
    with pytest.raises(ThroughputError, match='U-Net'):
        time_training_steps('demo-dit', batch=2, label_dim=5, steps=1, checkpointing=True)
    with pytest.raises(ThroughputError, match='clock'):
        time_training_steps('demo-tiny', batch=2, label_dim=5, steps=1, clock='sundial')


def test_the_bench_line_shows_a_tiny_net_s_gflops_to_three_significant_figures():
    r = dnnlib.EasyDict(
        img_s=100.0, ms=5.0, gflops_per_img=0.0574, tflops=0.0057, mfu=None, first_s=1.0, peak_mem_gb=0.1
    )
    assert '0.0574 Gflop/img' in describe(r)
