"""Training-state checkpoints: atomic save with one-line write errors, newest-valid-first resume that steps
over torn files (and never deletes them), retention of the newest N, and exact RNG restore."""

import glob
import os
import pickletools
import re
import zipfile
from typing import Any, Callable

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from training import faults

_STATE_RE = re.compile(r'^training-state-(\d{7,})\.pt$')
_STATE_KEYS = ('net', 'optimizer', 'ema', 'cur_nimg', 'rng')


class CheckpointError(Exception):
    """A checkpoint that cannot be written or resumed from; the message is one sentence for the user."""


def checkpoint_name(kimg: int) -> str:
    return f'training-state-{int(kimg):07d}.pt'


def list_checkpoints(run_dir: str) -> list[str]:
    """Training-state files in run_dir, newest (most images seen) first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), 'training-state-*.pt')):
        m = _STATE_RE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return [path for _kimg, path in sorted(found, reverse=True)]


def find_latest_checkpoint(run_dir: str) -> str | None:
    """Newest training-state file in run_dir by images seen, or None."""
    paths = list_checkpoints(run_dir)
    return paths[0] if paths else None


def rng_state() -> dict:
    """This process's random state: torch (CPU and current CUDA device) and numpy."""
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


def gather_rng_states() -> list[dict]:
    """Every rank's random state, so that rank r resumes with exactly its own stream."""
    if dist.get_world_size() == 1:
        return [rng_state()]
    states = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save through a temp file and rename, so a killed run or a full disk never leaves a truncated
    checkpoint; a write error becomes a CheckpointError naming the file."""
    try:
        with faults.writing(path), dnnlib.util.atomic_write(path) as f:
            torch.save(state, f)
    except faults.WriteError as e:
        raise CheckpointError(f'{e}; the earlier checkpoints are intact: free space and re-run to resume') from None


def load_checkpoint(path: str) -> dict:
    """A training state, or CheckpointError when the file is torn, unreadable or not a training state."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:  # torch.load reports a torn zip as RuntimeError, a bad pickle as anything.
        raise CheckpointError(f'{path} is unreadable ({faults.first_line(e)})') from None
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        raise CheckpointError(f'{path} is not a training state (expected the keys {", ".join(_STATE_KEYS)})')
    return state


def is_training_state(path: str) -> bool:
    """Whether `path` is a torch.save archive whose pickle names every key of a training state; read without
    unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith('/data.pkl')), None)
            data = archive.read(name) if name else b''
        strings = {arg for _op, arg, _pos in pickletools.genops(data) if isinstance(arg, str)}
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return all(key in strings for key in _STATE_KEYS)


def _newest_valid(run_dir: str, say: Callable[[str], None]) -> tuple[str, dict] | None:
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            say(f'{e}; skipped and kept on disk: delete it once the resume from an older one has worked.')
    return None


def load_newest_valid(run_dir: str) -> tuple[str, dict] | None:
    """The newest checkpoint of run_dir that loads, as (path, state), or None when the folder has none; torn
    or foreign newer ones are reported in one line each and left on disk. Rank 0 chooses, so that every rank
    resumes from the same file; CheckpointError when none of several files loads."""
    choice, found = None, None
    if dist.get_rank() == 0:
        found = _newest_valid(run_dir, dist.print0)
        choice = found[0] if found else None
        if choice is None and find_latest_checkpoint(run_dir) is not None:
            choice = ''
    if dist.get_world_size() > 1:
        box = [choice]
        torch.distributed.broadcast_object_list(box, src=0)
        choice = box[0]
    if choice == '':
        raise CheckpointError(
            f'No training-state file in {run_dir} loads; move them away to start afresh, or use a new --outdir'
        )
    if choice is None:
        return None
    return choice, found[1] if found is not None else load_checkpoint(choice)


def prune_checkpoints(run_dir: str, keep: int | None) -> list[str]:
    """Delete all but the newest `keep` training states (None: keep all); the deleted paths."""
    if not keep:
        return []
    old = list_checkpoints(run_dir)[keep:]
    for path in old:
        os.remove(path)
    return old


def save_training_state(run_dir: str, state: dict[str, Any], keep: int | None = None) -> None:
    """Gather every rank's RNG into `state`, write it on rank 0 as training-state-KIMG.pt and apply the
    retention; a collective. A write error stops every rank with the same CheckpointError."""
    state = dict(state, rng=gather_rng_states())
    error = None
    if dist.get_rank() == 0:
        try:
            save_checkpoint(os.path.join(run_dir, checkpoint_name(state['cur_nimg'] // 1000)), state)
            dnnlib.util.fsync_folder(run_dir)  # The new name survives a crash of the machine before older go.
            prune_checkpoints(run_dir, keep)
        except CheckpointError as e:
            error = str(e)
        except OSError as e:
            error = f'Cannot delete old checkpoints in {run_dir} ({e.strerror}); check its permissions'
    error = faults.first_error(error)
    if error is not None:
        raise CheckpointError(error)
