"""Tests for torch_utils.misc: cached constants, the resumable infinite sampler, parameter copying, DDP sync."""

import itertools

import numpy as np
import pytest
import torch

from torch_utils import misc


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_const_like_follows_ref_and_is_cached():
    ref = torch.zeros(3, dtype=torch.float64)
    c = misc.const_like(ref, [1.0, 2.0])
    assert c.dtype == torch.float64 and c.device == ref.device
    assert torch.equal(c, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert misc.const_like(ref, [1.0, 2.0]) is c
    assert misc.const_like(ref, [1.0, 3.0]) is not c
    assert misc.const_like(ref, [1.0, 2.0], dtype=torch.float16).dtype == torch.float16


def test_constant_broadcasts_to_shape_and_memory_format():
    c = misc.constant(0.5, shape=[2, 3, 4, 5], memory_format=torch.channels_last)
    assert torch.equal(c, torch.full([2, 3, 4, 5], 0.5))
    assert c.is_contiguous(memory_format=torch.channels_last)
    assert c.dtype == torch.get_default_dtype()
    assert misc.constant(0.5, shape=[2, 3, 4, 5]) is not c


@pytest.mark.parametrize('num_replicas', [1, 3])
def test_sampler_ranks_cover_each_epoch_exactly_once(num_replicas):
    n = 10
    streams = [
        _take(misc.InfiniteSampler(range(n), rank=r, num_replicas=num_replicas, seed=1), 2 * n)
        for r in range(num_replicas)
    ]
    # Rebuild the global stream: position p belongs to rank p % num_replicas.
    merged = [streams[p % num_replicas][p // num_replicas] for p in range(2 * n)]
    assert sorted(merged[:n]) == list(range(n)) and sorted(merged[n : 2 * n]) == list(range(n))
    assert merged[:n] != merged[n : 2 * n]  # A fresh permutation per epoch.


@pytest.mark.parametrize('num_replicas, start_idx', [(1, 7), (2, 7), (2, 8), (3, 23)])
def test_resumed_sampler_continues_the_uninterrupted_stream(num_replicas, start_idx):
    n = 9
    for rank in range(num_replicas):
        full = _take(misc.InfiniteSampler(range(n), rank=rank, num_replicas=num_replicas, seed=5), 40)
        resumed = _take(
            misc.InfiniteSampler(range(n), rank=rank, num_replicas=num_replicas, seed=5, start_idx=start_idx), 20
        )
        # Global positions of this rank's items in the uninterrupted run, and the first one not skipped.
        positions = [rank + k * num_replicas for k in range(40)]
        first = next(k for k, p in enumerate(positions) if p >= start_idx)
        assert resumed == full[first : first + 20]


def test_sampler_seed_and_shuffle_flag():
    a = _take(misc.InfiniteSampler(range(50), seed=0), 50)
    b = _take(misc.InfiniteSampler(range(50), seed=1), 50)
    assert a != b and a == _take(misc.InfiniteSampler(range(50), seed=0), 50)
    assert _take(misc.InfiniteSampler(range(4), shuffle=False), 6) == [0, 1, 2, 3, 0, 1]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError):
        misc.InfiniteSampler([], seed=0)
    with pytest.raises(ValueError):
        misc.InfiniteSampler(range(3), rank=2, num_replicas=2)


def test_copy_params_and_buffers_matches_state_dict():
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    src[1].running_mean.normal_()
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for name, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], value), name
    assert dst[0].weight.requires_grad


def test_copy_params_and_buffers_require_all_reports_missing():
    src = torch.nn.Linear(2, 2, bias=False)
    dst = torch.nn.Linear(2, 2)
    misc.copy_params_and_buffers(src, dst)
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(KeyError, match='bias'):
        misc.copy_params_and_buffers(src, dst, require_all=True)


@pytest.fixture
def one_process_group(tmp_path):
    """A real single-process gloo group, torn down afterwards so other tests see none."""
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _count_allreduces(ddp: torch.nn.parallel.DistributedDataParallel) -> list[int]:
    """Replace DDP's gradient all-reduce by a no-op that counts the buckets it is handed."""
    calls = [0]

    def hook(state: object, bucket: torch.distributed.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls[0] += 1
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    ddp.register_comm_hook(None, hook)
    return calls


def test_ddp_sync_false_skips_the_gradient_allreduce_and_true_restores_it(one_process_group):
    ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
    calls = _count_allreduces(ddp)
    x = torch.ones(1, 2)
    with misc.ddp_sync(ddp, sync=False):
        assert not ddp.require_backward_grad_sync
        ddp(x).sum().backward()
    assert calls[0] == 0 and ddp.require_backward_grad_sync  # accumulated locally, sync back on after the block
    with misc.ddp_sync(ddp, sync=True):
        assert ddp.require_backward_grad_sync
        ddp(x).sum().backward()
    assert calls[0] == 1
    assert torch.allclose(ddp.module.weight.grad, torch.full((1, 2), 2.0))  # both passes accumulated


def test_ddp_sync_leaves_plain_modules_alone():
    net = torch.nn.Linear(2, 1)
    with misc.ddp_sync(net, sync=False):
        net(torch.ones(1, 2)).sum().backward()
    assert np.allclose(net.weight.grad.numpy(), [[1.0, 1.0]])
