"""Torch helpers used by the training loop and by the network sources that persistence.py embeds in pickles:
cached constants, an endless resumable sampler, parameter copying and DDP gradient-sync control."""

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# Constants are built once per (value, shape, dtype, device, memory_format): a forward pass that asks
# for the same constant every step should not copy it to the device every step.
_constant_cache: dict[tuple, torch.Tensor] = {}


def constant(
    value: Any,
    shape: Any = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """A cached tensor holding `value` (broadcast to `shape` if given); treat it as read-only."""
    array = np.asarray(value)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    target = None if shape is None else tuple(shape)
    key = (array.tobytes(), array.shape, array.dtype, target, dtype, device, memory_format)
    cached = _constant_cache.get(key)
    if cached is None:
        cached = torch.tensor(array, dtype=dtype, device=device)
        cached = cached if target is None else cached.broadcast_to(target)
        cached = _constant_cache[key] = cached.contiguous(memory_format=memory_format)
    return cached


def const_like(
    ref: torch.Tensor,
    value: Any,
    shape: Any = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """A cached constant with `ref`'s dtype and device unless others are given."""
    return constant(
        value,
        shape=shape,
        dtype=dtype if dtype is not None else ref.dtype,
        device=device if device is not None else ref.device,
        memory_format=memory_format,
    )


class InfiniteSampler(torch.utils.data.Sampler[int]):
    """Yield dataset indices forever for one rank.

    The global stream visits the dataset in epochs, each a fresh permutation drawn from (seed, epoch);
    global position p goes to rank p % num_replicas. `start_idx` skips that many global positions, so a
    run resumed with start_idx = images consumed so far continues the uninterrupted stream exactly."""

    def __init__(
        self,
        dataset: Any,
        rank: int = 0,
        num_replicas: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        start_idx: int = 0,
    ):
        super().__init__()
        if len(dataset) == 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside 0..{num_replicas - 1}')
        if start_idx < 0:
            raise ValueError(f'start_idx must be >= 0, got {start_idx}')
        self.size = len(dataset)
        self.rank, self.num_replicas, self.start_idx = rank, num_replicas, start_idx
        self.shuffle, self.seed = shuffle, seed

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        # A seed sequence over (seed, epoch) keeps different (seed, epoch) pairs independent.
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        # First global position at or after start_idx that belongs to this rank.
        pos = self.start_idx + (self.rank - self.start_idx) % self.num_replicas
        epoch, order = -1, None
        while True:
            if pos // self.size != epoch:
                epoch = pos // self.size
                order = self._epoch_order(epoch)
            yield int(order[pos % self.size])
            pos += self.num_replicas


def copy_params_and_buffers(
    src_module: torch.nn.Module, dst_module: torch.nn.Module, require_all: bool = False
) -> None:
    """Copy parameters and buffers from `src_module` into same-named ones of `dst_module`, in place."""
    sources = {**dict(src_module.named_parameters()), **dict(src_module.named_buffers())}
    for name, dst in [*dst_module.named_parameters(), *dst_module.named_buffers()]:
        if name in sources:
            dst.detach().copy_(sources[name].detach())  # detached: an in-place write outside autograd
        elif require_all:
            raise KeyError(f'{name!r} is missing from the source module')


def ddp_sync(module: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce inside the block when `sync` is False (gradient accumulation)."""
    if not sync and isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()
