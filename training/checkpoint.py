"""Training-state checkpoints: atomic save, newest-first discovery and exact RNG restore for resume."""

import glob
import os
import re

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

_STATE_RE = re.compile(r'^training-state-(\d{7,})\.pt$')


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message is one sentence for the user."""


def checkpoint_name(kimg: int) -> str:
    return f'training-state-{int(kimg):07d}.pt'


def find_latest_checkpoint(run_dir: str) -> str | None:
    """Newest training-state file in run_dir by images seen, or None."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(run_dir), 'training-state-*.pt')):
        m = _STATE_RE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


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
    """torch.save through a temp file and rename, so a killed run never leaves a truncated checkpoint."""
    with dnnlib.util.atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f'Cannot resume from {path}: the file is unreadable ({e}); delete it to resume from the one before.'
        ) from e
