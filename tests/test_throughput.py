"""training/throughput.py: the timing shared by bench/train_speed.py and bench/data_speed.py."""

import pytest
import torch

import count_flops
from training.throughput import ThroughputError, time_sampling, time_training_steps


def test_times_the_network_train_edm2_builds_for_the_preset(one_thread):
    for preset in ('demo-tiny', 'demo-dit'):
        r = time_training_steps(preset, batch=2, label_dim=5, steps=1)
        built = count_flops.build_train_preset_net(preset, label_dim=5)
        assert r.params == sum(p.numel() for p in built.parameters())
        assert r.img_s == pytest.approx(2 / (r.ms_step / 1e3)) and r.mfu is None


def test_presets_it_cannot_time_are_one_clear_error():
    with pytest.raises(ThroughputError, match='text, super-resolution or CLIP'):
        time_training_steps('demo-text', batch=2)
    with pytest.raises(ThroughputError, match='demo-dit: --patch=2 does not divide the resolution 15'):
        time_sampling('demo-dit', batch=2, resolution=15)
    with pytest.raises(ThroughputError, match='Unknown preset'):
        time_training_steps('no-such-preset', batch=2)


def test_unconditional_nets_time_and_cpu_fp16_is_refused(one_thread):
    assert time_training_steps('demo-tiny', batch=2, label_dim=0, steps=1).img_s > 0
    assert time_sampling('demo-tiny', batch=2, label_dim=0, steps=1).img_s > 0
    with pytest.raises(ThroughputError, match='CUDA only'):
        time_training_steps('demo-tiny', batch=2, precision='fp16', device='cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='needs a machine without CUDA')
def test_a_cuda_device_without_cuda_is_one_clear_error():
    with pytest.raises(ThroughputError, match='--device=cuda'):
        time_sampling('demo-tiny', batch=2, device='cuda')
