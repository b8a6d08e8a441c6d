"""Network pickle names and I/O shared by training, generation, post-hoc EMA and metrics."""

import os
import pickle
import re

import dnnlib

_SNAPSHOT_RE = re.compile(r'^(?P<prefix>.+)-(?P<kimg>\d{7,})-(?P<std>\d+\.\d+)\.pkl$')


class NetworkPickleError(Exception):
    """A network pickle that cannot be used; the message is one sentence for the user."""


def snapshot_name(prefix: str, kimg: int, std: float) -> str:
    return f'{prefix}-{int(kimg):07d}-{std:.3f}.pkl'


def parse_snapshot_name(path: str) -> tuple[str, int, float]:
    """Split '.../{prefix}-{kimg:07d}-{std:.3f}.pkl' into (prefix, kimg, std)."""
    m = _SNAPSHOT_RE.match(os.path.basename(path))
    if m is None:
        raise ValueError(f'{path!r} is not named like PREFIX-KIMG-STD.pkl (e.g. network-snapshot-0008388-0.050.pkl)')
    return m['prefix'], int(m['kimg']), float(m['std'])


def save_network_pickle(data: dict, path: str) -> None:
    """Pickle a snapshot dict atomically, so a crash never leaves a truncated file."""
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(data, f)


def load_network_pickle(path_or_url: str) -> dict:
    """Load an edm2x or EDM2 network pickle: a dict holding at least the network under 'ema'."""
    if '://' not in path_or_url and not os.path.isfile(path_or_url):
        raise NetworkPickleError(f'Network pickle not found: {path_or_url}')
    try:
        with dnnlib.util.open_url(path_or_url, verbose=False) as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, ModuleNotFoundError) as e:
        raise NetworkPickleError(f'{path_or_url} is not a readable network pickle ({e}).') from e
    if not isinstance(data, dict) or 'ema' not in data:
        raise NetworkPickleError(f"{path_or_url} holds no network: expected a dict with an 'ema' entry.")
    return data
