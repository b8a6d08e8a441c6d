"""Network snapshot names and I/O shared by training, generation, post-hoc EMA and metrics: pickles, and
.safetensors files that load without running code (training/safetensors_io.py)."""

import os
import pickle
import re
import warnings
from typing import Any

import dnnlib
from training.safetensors_io import SafetensorsError, load_safetensors, save_safetensors

_SNAPSHOT_RE = re.compile(r'^(?P<prefix>.+)-(?P<kimg>\d{7,})-(?P<std>\d+\.\d+)\.(pkl|safetensors)$')
_CLASSIC_RE = re.compile(r'^.+-\d{7,}-ema[0-9.e+-]+\.(pkl|safetensors)$')  # classic_snapshot_name's
SNAPSHOT_FORMATS = ('pkl', 'safetensors', 'both')
TRUST_HELP = 'Load pickles without the notice that they run code (they still run it).'  # --trust-pickles


class NetworkPickleError(Exception):
    """A network pickle that cannot be used; the message is one sentence for the user."""


class PickleWarning(UserWarning):
    """Loading a pickle runs the code inside it; shown once per process unless pickles are trusted."""


def trust_pickles(_ctx: Any = None, _param: Any = None, value: bool = True) -> bool:
    """Silence PickleWarning for this process when `value` (EDM2X_TRUST_PICKLES=1 does the same); the signature is
    that of a click option callback, so that scripts declare --trust-pickles in one line."""
    if value:
        warnings.filterwarnings('ignore', category=PickleWarning)
    return value


def snapshot_name(prefix: str, kimg: int, std: float, ext: str = 'pkl') -> str:
    return f'{prefix}-{int(kimg):07d}-{std:.3f}.{ext}'


def classic_snapshot_name(prefix: str, kimg: int, beta: float, ext: str = 'pkl') -> str:
    """A classic EMA's snapshot, e.g. network-snapshot-0000128-ema0.9999.pkl: named apart from the
    power-function EMAs, so that post-hoc reconstruction and run-folder resolution never take it for one."""
    return f'{prefix}-{int(kimg):07d}-ema{beta:g}.{ext}'


def is_snapshot_name(path: str) -> bool:
    """Whether `path` is named as a snapshot: a power-function EMA's (snapshot_name) or a classic EMA's."""
    return bool(_SNAPSHOT_RE.match(os.path.basename(path)) or _CLASSIC_RE.match(os.path.basename(path)))


def parse_snapshot_name(path: str) -> tuple[str, int, float]:
    """Split '.../{prefix}-{kimg:07d}-{std:.3f}.pkl' (or .safetensors) into (prefix, kimg, std)."""
    m = _SNAPSHOT_RE.match(os.path.basename(path))
    if m is None:
        raise ValueError(f'{path!r} is not named like PREFIX-KIMG-STD.pkl (e.g. network-snapshot-0008388-0.050.pkl)')
    return m['prefix'], int(m['kimg']), float(m['std'])


def save_network_pickle(data: dict, path: str) -> None:
    """Pickle a snapshot dict atomically, so a crash never leaves a truncated file."""
    with dnnlib.util.atomic_write(path) as f:
        pickle.dump(data, f)


def snapshot_files(path: str, snapshot_format: str) -> list[str]:
    """The files `snapshot_format` ('pkl', 'safetensors' or 'both') writes for `path`, NAME with either extension."""
    if snapshot_format not in SNAPSHOT_FORMATS:
        raise NetworkPickleError(f'Unknown snapshot format {snapshot_format!r}; choose one of {SNAPSHOT_FORMATS}.')
    name = os.path.splitext(path)[0]
    return [f'{name}.{kind}' for kind in ('pkl', 'safetensors') if snapshot_format in (kind, 'both')]


def save_snapshot_file(data: dict, path: str) -> None:
    """Write a snapshot dict as the one file `path`: a pickle, or .safetensors by its extension."""
    if not path.endswith('.safetensors'):
        save_network_pickle(data, path)
        return
    try:
        save_safetensors(data, path)
    except SafetensorsError as e:
        raise NetworkPickleError(f'{path}: {e}') from None


def save_network(data: dict, path: str, snapshot_format: str = 'pkl') -> None:
    """Write a snapshot dict as NAME.pkl, NAME.safetensors or both (`snapshot_format` 'pkl', 'safetensors' or 'both';
    `path` is NAME with either extension)."""
    for file in snapshot_files(path, snapshot_format):
        save_snapshot_file(data, file)


def load_network_pickle(path_or_url: str) -> dict:
    """Load an edm2x or EDM2 network pickle, or a .safetensors snapshot (built from edm2x's classes, no code from
    the file run): a dict holding at least the network under 'ema'. A pickle warns once that it runs code."""
    if path_or_url.endswith('.safetensors'):
        if '://' in path_or_url:
            path_or_url = dnnlib.util.open_url(path_or_url, return_filename=True, verbose=False)
        try:
            return load_safetensors(path_or_url)
        except SafetensorsError as e:
            raise NetworkPickleError(str(e)) from None
    if '://' not in path_or_url and not os.path.isfile(path_or_url):
        raise NetworkPickleError(f'Network pickle not found: {path_or_url}')
    if os.environ.get('EDM2X_TRUST_PICKLES', '0') in ('0', ''):
        warnings.warn(
            'Loading a pickle runs the code inside it; load only pickles you trust, or convert them once with '
            '"python export_network.py safetensors --net=PKL" (--trust-pickles or EDM2X_TRUST_PICKLES=1 hides this).',
            PickleWarning,
        )
    try:
        with dnnlib.util.open_url(path_or_url, verbose=False) as f:
            data = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, ModuleNotFoundError) as e:
        raise NetworkPickleError(f'{path_or_url} is not a readable network pickle ({e}).') from e
    if not isinstance(data, dict) or 'ema' not in data:
        raise NetworkPickleError(f"{path_or_url} holds no network: expected a dict with an 'ema' entry.")
    return data
