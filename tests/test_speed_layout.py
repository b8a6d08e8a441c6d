"""Tests for the U-Net activation layout (training/networks_edm2.py UNet.channels_last, set_channels_last): the
layout the convolutions see follows the setting, and the results do not change beyond float rounding."""

import pytest
import torch

from training import networks_edm2 as nets
from training.throughput import ThroughputError, time_training_steps

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1, 2], num_blocks=1)


def layouts_and_output(net: nets.Precond, channels_last: bool | None) -> tuple[set[bool], torch.Tensor]:
    """(whether each convolution's input was channels-last, the denoiser's output) of one forward pass."""
    assert nets.set_channels_last(net, channels_last) == 1
    seen = set()
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args: seen.add(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        for m in net.unet.modules()
        if isinstance(m, nets.MPConv) and m.weight.ndim == 4 and m.weight.shape[-1] > 1
    ]
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn([2, 3, 8, 8], generator=g), torch.eye(4)[[0, 2]]
    with torch.no_grad():
        out = net(x, torch.tensor([0.5, 3.0]), labels)
    for hook in hooks:
        hook.remove()
    return seen, out


def test_layout_follows_the_setting_and_leaves_the_output_unchanged():
    torch.manual_seed(0)
    net = nets.Precond(**TINY, use_fp16=False).eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(1)
    nchw, out_nchw = layouts_and_output(net, False)
    nhwc, out_nhwc = layouts_and_output(net, True)
    default, out_default = layouts_and_output(net, None)
    assert nchw == {False} and nhwc == {True} and default == {True}  # the default on CPU is channels-last
    assert out_nchw.abs().max() > 0
    torch.testing.assert_close(out_nhwc, out_nchw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_default, out_nhwc, rtol=0, atol=0)


def test_benchmark_times_either_layout_of_u_nets_only(one_thread):
    for channels_last in (True, False):
        assert time_training_steps('demo-tiny', batch=2, label_dim=5, steps=1, channels_last=channels_last).img_s > 0
    with pytest.raises(ThroughputError, match='U-Net'):
        time_training_steps('demo-dit', batch=2, label_dim=5, steps=1, channels_last=True)
