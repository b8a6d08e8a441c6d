"""One process per GPU, launched by torchrun; a plain `python` run is a single process without a
process group, so the same code runs in both."""

import atexit
import contextlib
import gc
import importlib
import os
from typing import Any, Iterator

import torch

from . import training_stats

_TORCHRUN_VARS = ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def init(cpu: bool = False) -> None:
    """Join the process group described by torchrun's environment, or stay a single process without one.
    The group talks NCCL between GPUs; gloo where there are none or `cpu` asks for the CPU (--device=cpu)."""
    if _initialized():
        return
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if present:
        missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
        if missing:
            raise RuntimeError(
                f'Found {", ".join(present)} but not {", ".join(missing)} in the environment; '
                f'launch with torchrun or set all of {", ".join(_TORCHRUN_VARS)}.'
            )
        on_gpu = torch.cuda.is_available() and not cpu
        if on_gpu:
            torch.cuda.set_device(get_local_rank())
        backend = 'nccl' if on_gpu else 'gloo'
        # Workers restarted by torchrun --max-restarts may find the killed workers' addresses still in the
        # store and wait for them; keys of their own attempt avoid that. The restart count names the attempt
        # only when one torchrun agent counts for all (one node): a node joining later would count from 0.
        store, rank, world_size = next(torch.distributed.rendezvous('env://'))
        if os.environ.get('GROUP_WORLD_SIZE', '1') == '1':
            attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
            store = torch.distributed.PrefixStore(f'attempt_{attempt}', store)
        # torch.distributed.nn binds group.WORLD as its functions' default argument when first imported (DDP
        # imports it through torch._dynamo). Imported after the group exists, it keeps the group and its gloo
        # threads alive past destroy_process_group, to interpreter teardown; imported now, it binds None.
        importlib.import_module('torch.distributed.nn')
        torch.distributed.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        atexit.register(_shutdown)
    sync_device = device() if get_world_size() > 1 else None
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)


def finish() -> None:
    """End a run that every rank completed: wait for all ranks, then leave the group. Gloo's threads release
    a finished collective after the caller has moved on; when that release frees tensors that Python made
    (all_gather_object's) and the interpreter is already exiting, the thread cannot take the GIL and the
    process aborts ('terminate called without an active exception', about 1 torchrun run in 15 on 2 CPUs).
    Gloo's barrier first waits for every earlier collective, so their tensors go while Python still runs."""
    if _initialized():
        barrier()
        _shutdown()


def _shutdown() -> None:
    """Leave the process group: from finish(), or at exit where finish() was not reached (a rank stopped by an
    error). A DDP module outlives the function that made it in a reference cycle, its reducer holding the group
    and its last buckets; collecting the cycles first lets the group, its threads and those tensors go here,
    while Python still runs, not at interpreter teardown."""
    if _initialized():
        gc.collect()
        torch.distributed.destroy_process_group()


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if _initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return torch.distributed.get_world_size() if _initialized() else 1


def get_local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 when unset)."""
    return int(os.environ.get('LOCAL_RANK', '0'))


def device() -> torch.device:
    """The device this process computes on: cuda:LOCAL_RANK when CUDA is available (and the group is not gloo's,
    as init(cpu=True) makes it), else the CPU."""
    if not torch.cuda.is_available() or (_initialized() and torch.distributed.get_backend() == 'gloo'):
        return torch.device('cpu')
    return torch.device('cuda', get_local_rank())


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block (a download into the shared cache) before the other ranks, which then find it done."""
    if get_rank() != 0:
        barrier()
    yield
    if get_rank() == 0:
        barrier()


def device_from_name(name: str | None) -> torch.device:
    """The device a --device option names (None: this process's default device); ValueError with one sentence
    when torch cannot compute there, e.g. cuda on a CPU-only build."""
    if name is None:
        return device()
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f'{name!r} is not a torch device ({e}); use e.g. cpu, cuda or cuda:1') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            build = 'this torch was built without CUDA' if torch.version.cuda is None else 'no CUDA GPU is visible'
            raise ValueError(f'CUDA is not available here ({build}, torch {torch.__version__}); use --device=cpu')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f'there is no {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    return dev


def is_main() -> bool:
    """Whether this is rank 0, the process that prints and writes files."""
    return get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    """Wait for every rank; a no-op for a single process."""
    if not _initialized():
        return
    if torch.distributed.get_backend() == 'nccl':
        torch.distributed.barrier(device_ids=[get_local_rank()])
    else:
        torch.distributed.barrier()
