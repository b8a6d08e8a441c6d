"""Small helpers shared by every edm2x module: attribute dicts, the download cache, atomic writes,
objects by name, a stdout/stderr tee, and parsers for command-line sizes and lists."""

import builtins
import contextlib
import fractions
import hashlib
import importlib
import io
import math
import os
import re
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import IO, Any

import requests
import tqdm

# Read once at import: os.umask can only be queried by setting it, which is not thread-safe later.
_UMASK = os.umask(0)
os.umask(_UMASK)


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


class DownloadError(OSError):
    """A URL could not be fetched, or its content failed the sha256 check."""


def make_cache_dir_path(*paths: str) -> str:
    """Path inside the cache root: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    root = os.environ.get('DNNLIB_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'dnnlib')
    return os.path.join(root, *paths)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[IO]:
    """Yield a file that becomes `path` only once the block succeeds; `path` is never partly written.
    Text mode ('w') writes UTF-8."""
    if mode not in ('w', 'wb', 'wt'):
        raise ValueError(f"atomic_write mode must be 'w', 'wt' or 'wb', not {mode!r}")
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    # Same folder as the target, so os.replace is a rename within one file system.
    fd, tmp_path = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode, **({} if 'b' in mode else {'encoding': 'utf-8'})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames and new names in `folder` durable (a name lives in its folder's data, which a file's
    own fsync does not write); a file system that cannot sync a folder is left as it is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cache_file_name(url: str) -> str:
    # The hash tells apart URLs with equal base names; the base name keeps the cache readable.
    url_hash = hashlib.sha256(url.encode('utf-8')).hexdigest()[:32]
    base = os.path.basename(urllib.parse.urlparse(url).path)
    base = re.sub(r'[^A-Za-z0-9_.-]', '_', base) or 'download'
    return f'{url_hash}_{base}'


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def progress_bar(*args: Any, **kwargs: Any) -> tqdm.tqdm:
    """tqdm that, writing to a file or pipe (a log), redraws once a minute instead of ten times a second,
    so the log does not fill with copies of the bar."""
    file = kwargs.get('file') or sys.stderr
    if not getattr(file, 'isatty', lambda: False)():
        kwargs.setdefault('mininterval', 60)
    return tqdm.tqdm(*args, **kwargs)


def _download(url: str, sink: IO[bytes], sha256: str | None, verbose: bool) -> None:
    """Stream `url` into `sink`; raise DownloadError on an sha256 mismatch."""
    digest = hashlib.sha256()
    with requests.get(url, stream=True, timeout=(10, 60)) as response:
        response.raise_for_status()
        total = int(response.headers.get('content-length', 0)) or None
        with progress_bar(
            total=total,
            unit='B',
            unit_scale=True,
            desc=os.path.basename(url),
            disable=not verbose,
            file=sys.stderr,
            leave=False,
        ) as progress:
            for chunk in response.iter_content(chunk_size=1 << 20):
                sink.write(chunk)
                digest.update(chunk)
                progress.update(len(chunk))
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise DownloadError(
            f'Downloaded {url} has sha256 {digest.hexdigest()}, expected {sha256}; the file was not kept.'
        )


def open_url(
    url: str,
    cache_dir: str | None = None,
    num_attempts: int = 10,
    verbose: bool = True,
    return_filename: bool = False,
    cache: bool = True,
    sha256: str | None = None,
) -> Any:
    """Open a local path, file:// URL or http(s) URL as a binary file (or return its local file name).
    Downloads are cached under make_cache_dir_path('downloads'); a file placed by hand at the cache
    path named in the DownloadError is used without any network access."""
    if '://' not in url:
        return url if return_filename else open(url, 'rb')
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == 'file':
        local = urllib.request.url2pathname(urllib.parse.urlparse(url).path)
        return local if return_filename else open(local, 'rb')
    if scheme not in ('http', 'https'):
        raise ValueError(f'Cannot open {url}: only local paths, file://, http:// and https:// are supported.')
    if return_filename and not cache:
        raise ValueError('open_url(return_filename=True) needs cache=True, since the file must live somewhere.')

    if num_attempts < 1:
        raise ValueError(f'open_url needs num_attempts >= 1, got {num_attempts}.')
    cache_dir = cache_dir if cache_dir is not None else make_cache_dir_path('downloads')
    cache_file = os.path.join(cache_dir, _cache_file_name(url))
    if cache and os.path.isfile(cache_file):
        if sha256 is not None and _file_sha256(cache_file) != sha256.lower():
            raise DownloadError(
                f'The cached copy of {url} at {cache_file} does not match sha256 {sha256}; '
                f'delete it or replace it with the right file.'
            )
        return cache_file if return_filename else open(cache_file, 'rb')

    reason = None
    for attempt in range(num_attempts):
        try:
            if verbose:
                again = f' again ({reason}; attempt {attempt + 1} of {num_attempts})' if attempt else ''
                print(f'Downloading {url}{again} ...', file=sys.stderr, flush=True)
            if not cache:
                buffer = io.BytesIO()
                _download(url, buffer, sha256, verbose)
                buffer.seek(0)
                return buffer
            os.makedirs(cache_dir, exist_ok=True)
            with atomic_write(cache_file) as f:
                _download(url, f, sha256, verbose)
            return cache_file if return_filename else open(cache_file, 'rb')
        except DownloadError:
            raise
        except (requests.RequestException, OSError) as err:
            status = err.response.status_code if isinstance(err, requests.HTTPError) else None
            # A 4xx answer will not change on retry, and a host that cannot be reached twice is most
            # likely offline: fail within seconds so the user learns where to place the file.
            unreachable = isinstance(err, requests.ConnectionError) and attempt >= 1
            reason = f'HTTP {status}' if status is not None else type(err).__name__
            if attempt + 1 == num_attempts or unreachable or (status is not None and 400 <= status < 500):
                raise DownloadError(
                    f'Could not download {url} ({reason}); to work offline, place the file '
                    f'by hand at {cache_file} and run again.'
                ) from err
            time.sleep(min(2**attempt, 30))


def get_obj_by_name(name: str) -> Any:
    """The object a dotted name refers to, e.g. 'torch.nn.Linear'; undotted names are builtins."""
    parts = name.split('.')
    for split in range(len(parts) - 1, 0, -1):
        module_name = '.'.join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only a missing prefix means "try a shorter one"; a broken import inside it is a real error.
            if err.name is not None and (module_name + '.').startswith(err.name + '.'):
                continue
            raise
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    if len(parts) == 1 and hasattr(builtins, name):
        return getattr(builtins, name)
    raise ValueError(f'Cannot find {name!r}: no importable module defines it.')


def call_func_by_name(*args: Any, func_name: str, **kwargs: Any) -> Any:
    """Call the function named `func_name` with the given arguments."""
    func = get_obj_by_name(func_name)
    if not callable(func):
        raise TypeError(f'{func_name!r} is not callable.')
    return func(*args, **kwargs)


def construct_class_by_name(*args: Any, class_name: str, **kwargs: Any) -> Any:
    """Instantiate the class named `class_name` with the given arguments."""
    cls = get_obj_by_name(class_name)
    if not isinstance(cls, type):
        raise TypeError(f'{class_name!r} is not a class.')
    return cls(*args, **kwargs)


class _Tee:
    """Stands in for sys.stdout or sys.stderr, copying each write into the log file; a failed write to the file
    (a full disk) calls `lost` with the error instead of stopping the program."""

    def __init__(self, stream: IO[str], file: IO[str] | None, should_flush: bool, lost: Callable[[OSError], None]):
        self.stream, self.file, self.eager, self.lost = stream, file, should_flush, lost

    def write(self, text: str) -> int:
        self.stream.write(text)
        if self.file is not None:
            try:
                self.file.write(text)
                if self.eager:
                    self.file.flush()
            except OSError as e:
                self.lost(e)
        if self.eager:
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
            except OSError as e:
                self.lost(e)
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        # isatty, encoding, fileno and the like answer for the real stream.
        return getattr(self.stream, name)


class Logger:
    """Tee stdout and stderr into `file_name` (if given) until close(); usable as a context manager. When the file
    cannot be written (a full disk), the console goes on alone after one warning on stderr."""

    def __init__(self, file_name: str | None = None, file_mode: str = 'a', should_flush: bool = True):
        self.file_name = file_name
        self.file = open(file_name, file_mode, encoding='utf-8') if file_name is not None else None
        self.orig_stdout, self.orig_stderr = sys.stdout, sys.stderr
        self.stdout = _Tee(sys.stdout, self.file, should_flush, self._lost)
        self.stderr = _Tee(sys.stderr, self.file, should_flush, self._lost)
        sys.stdout, sys.stderr = self.stdout, self.stderr

    def _lost(self, error: OSError) -> None:
        if self.stdout.file is None:
            return
        self.stdout.file = self.stderr.file = None
        reason = error.strerror or str(error)
        self.orig_stderr.write(f'Warning: cannot write {self.file_name}: {reason}; the console goes on without it.\n')
        self.orig_stderr.flush()

    def __enter__(self) -> 'Logger':
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def flush(self) -> None:
        for tee in (self.stdout, self.stderr):
            tee.flush()

    def close(self) -> None:
        """Restore the original streams (if still ours) and close the file; safe to call twice."""
        self.flush()
        if sys.stdout is self.stdout:
            sys.stdout = self.orig_stdout
        if sys.stderr is self.stderr:
            sys.stderr = self.orig_stderr
        file, self.file = self.file, None
        if file is not None:
            self.stdout.file = self.stderr.file = None
            with contextlib.suppress(OSError):  # What a full disk kept from it is lost either way.
                file.close()


_NIMG_SUFFIXES = {'': 1, 'K': 10**3, 'M': 10**6, 'G': 10**9, 'Ki': 1 << 10, 'Mi': 1 << 20, 'Gi': 1 << 30}


def parse_nimg(s: str | int) -> int:
    """Image count with an optional suffix: '8Mi' -> 8 << 20, '1.5K' -> 1500, '2048' -> 2048."""
    if isinstance(s, int):
        return s
    match = re.fullmatch(r'\s*(\d+(?:\.\d*)?)\s*(Ki|Mi|Gi|K|M|G|)\s*', s)
    if match is None:
        raise ValueError(
            f"'{s}' is not an image count; write a whole number with an optional suffix "
            f'K, M, G (powers of 1000) or Ki, Mi, Gi (powers of 1024), e.g. 8Mi'
        )
    value = fractions.Fraction(match.group(1)) * _NIMG_SUFFIXES[match.group(2)]
    if value.denominator != 1:
        raise ValueError(f"'{s}' is not a whole number of images")
    return int(value)


def parse_int_list(s: str | list[int]) -> list[int]:
    """Comma-separated integers and inclusive ranges: '0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]."""
    if isinstance(s, list):
        return s
    result = []
    for item in s.split(','):
        match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', item)
        if match is None:
            raise ValueError(f"'{item.strip()}' in '{s}' is neither an integer nor a range like 2-5")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"'{item.strip()}' is a reversed range; write it as {hi}-{lo}")
        result.extend(range(lo, hi + 1))
    return result


def format_figure(value: float, digits: int = 3) -> str:
    """Fixed-point with two decimals, or as many more as show `digits` significant figures of a small value:
    '45.68', '0.0234' (not '0.02'), '0.000512'."""
    if value == 0 or not math.isfinite(value):
        return f'{value:.2f}'
    decimals = max(2, digits - 1 - math.floor(math.log10(abs(value))))
    return f'{value:.{decimals}f}'


def format_time(seconds: float) -> str:
    """Short human-readable duration: '42s', '3m 05s', '2h 03m 05s', '1d 02h 03m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {s // 60 % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {s // 3600 % 24:02d}h {s // 60 % 60:02d}m'
