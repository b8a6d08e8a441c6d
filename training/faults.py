"""What a cluster does to a long run's writes: errors that name the file being written, the agreement of all
ranks on the first error so that they stop together, and the disk space the run's outputs will take."""

import contextlib
import errno
import fcntl
import glob
import os
import shutil
from typing import IO, Any, Iterator

import torch

from torch_utils import distributed as dist


class TrainingError(Exception):
    """Training cannot go on; the message is one sentence for the user."""


class WriteError(Exception):
    """Writing one output file failed; the message names the file and why, in one line."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (torch's C++ errors append a stack of frames)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn an OS error (disk full, quota, permissions) raised while writing `path` into a WriteError naming
    it. torch.save wraps a failed write in a RuntimeError whose context is the OSError; that counts too."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if not isinstance(cause, OSError):
            raise
        raise WriteError(f'Cannot write {path}: {cause.strerror or first_line(cause)}') from None


def lock_run(run_dir: str) -> IO:
    """Lock run_dir's log.txt for this process, so that a second run started on the same folder stops at once
    instead of deleting this one's half-written files and writing the same checkpoints. A POSIX lock: the kernel
    drops it when the process dies (SIGKILL too), forked data workers do not inherit it, and NFS honours it; on a
    file system without locks nothing is locked. It lasts until the returned file is closed or this process
    closes another descriptor of log.txt (POSIX's rule), as the Logger does at the end of the run.
    TrainingError when another process holds it."""
    path = os.path.join(run_dir, 'log.txt')
    f = open(path, 'a', encoding='utf-8')
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            f.close()
            raise TrainingError(
                f'{run_dir} is in use: another process trains there (it holds {path} locked); stop it first, '
                f'or choose another --outdir'
            ) from None
    return f


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Delete the temporary files (dnnlib.util.atomic_write's '.NAME.XXXX.tmp') of snapshots, grids and
    checkpoints that a killed run left half-written; call before this run writes any. The deleted paths."""
    stale = []
    for prefix in ('network-snapshot-', 'samples-', 'training-state-'):
        stale += glob.glob(os.path.join(glob.escape(run_dir), f'.{prefix}*.tmp'))
    for path in stale:
        os.remove(path)
    return stale


def first_error(message: str | None) -> str | None:
    """The first rank's error message among all ranks' (None: no error anywhere); a collective when
    distributed, so that every rank stops at the same point with the same sentence."""
    if dist.get_world_size() == 1:
        return message
    messages: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def _tensor_bytes(state: Any, bytes_per_float: int | None = None) -> int:
    """Bytes of the tensors in a (nested) state dict; floating tensors at `bytes_per_float` when given."""
    if isinstance(state, torch.Tensor):
        per = bytes_per_float if bytes_per_float and state.is_floating_point() else state.element_size()
        return state.numel() * per
    if isinstance(state, dict):
        return sum(_tensor_bytes(v, bytes_per_float) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v, bytes_per_float) for v in state)
    return 0


def _count(start_nimg: int, end_nimg: int, interval: int | None) -> int:
    """Files a run writes every `interval` images after start_nimg and at end_nimg, named by thousands of
    images (kimg), so that writes less than 1000 images apart can share one file."""
    if not interval or end_nimg <= start_nimg:
        return 0
    first = (start_nimg // interval + 1) * interval
    if first > end_nimg:
        return 1
    if interval < 1000:  # Every kimg from the first write's to the end's gets a file.
        return end_nimg // 1000 - first // 1000 + 1
    last = end_nimg - end_nimg % interval
    return (end_nimg - first) // interval + 1 + (end_nimg // 1000 != last // 1000)


def _size(num_bytes: float) -> str:
    for unit in ('B', 'kB', 'MB', 'GB'):
        if num_bytes < 1000:
            return f'{num_bytes:.3g} {unit}'
        num_bytes /= 1000
    return f'{num_bytes:.3g} TB'


def disk_plan(
    run_dir: str,
    net: torch.nn.Module,
    ema: Any,
    cur_nimg: int,
    end_nimg: int,
    snapshot_nimg: int | None,
    checkpoint_nimg: int | None,
    snapshot_fp32: bool,
    keep_checkpoints: int | None,
) -> list[str]:
    """A one-line summary of the space the rest of the run writes (snapshot size x count, checkpoints at the
    chosen retention), and a warning line when run_dir's file system has less free space. The
    sizes are the tensors' bytes; Adam's two moments are assumed for the optimiser of a fresh run."""
    stds = len(ema.get()) + len(ema.classic())
    snapshot = _tensor_bytes(net.state_dict(), 4 if snapshot_fp32 else 2) * stds
    checkpoint = _tensor_bytes(net.state_dict()) * 3 + _tensor_bytes(ema.state_dict())
    num_snapshots = _count(cur_nimg, end_nimg, snapshot_nimg)
    num_checkpoints = _count(cur_nimg, end_nimg, checkpoint_nimg)
    if keep_checkpoints:
        num_checkpoints = min(num_checkpoints, keep_checkpoints)
    need = snapshot * num_snapshots + checkpoint * num_checkpoints
    free = shutil.disk_usage(run_dir).free
    summary = (
        f'Disk: snapshots {num_snapshots} x {_size(snapshot)}, checkpoints {num_checkpoints} x {_size(checkpoint)}: '
        f'{_size(need)} to come, {_size(free)} free in {run_dir}'
    )
    if need <= free:
        return [summary]
    warning = (
        f'Warning: {run_dir} has {_size(free)} free but the run will write {_size(need)}; free space, raise '
        f'--snapshot or set --keep-checkpoints, or the run stops when the disk is full.'
    )
    return [summary, warning]
