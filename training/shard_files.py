"""Tar shards on disk: naming them (brace pattern, folder, list file) and reading their samples with
webdataset's tar iterator, grouped by key as img2dataset writes them."""

import os
import tarfile
from collections.abc import Iterator
from typing import Any

import webdataset as wds
from webdataset import tariterators

from training.dataset import DatasetError

IMAGE_FIELDS = ('jpg', 'jpeg', 'png', 'webp')


class ShardError(DatasetError):
    """Shards, a filter or a shard sample the user can fix; the message names the file or the text."""


def is_shard_spec(path: str) -> bool:
    """Whether `--data` names shards rather than a folder or ZIP of images."""
    path = str(path)
    if '{' in path or path.endswith('.tar') or path.endswith('.txt'):
        return True
    return os.path.isdir(path) and any(f.endswith('.tar') for f in os.listdir(path))


def expand_shards(spec: str) -> list[str]:
    """Shard paths of a brace pattern, a folder of .tar files or a text file listing them, checked to exist."""
    spec = str(spec)
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith('.tar'))
    elif spec.endswith('.txt') and os.path.isfile(spec):
        base = os.path.dirname(spec)
        with open(spec, encoding='utf-8') as f:
            paths = [os.path.join(base, line.strip()) for line in f if line.strip() and not line.startswith('#')]
    else:
        paths = list(wds.shardlists.expand_urls(spec))
    if not paths:
        raise ShardError(f'{spec}: names no shards; give a brace pattern, a folder of .tar files or a list file')
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
        raise ShardError(f'{spec}: matches no file (first expected: {paths[0]}); check the pattern and the folder')
    if len(found) < len(paths):
        missing = next(p for p in paths if not os.path.isfile(p))
        raise ShardError(f'{spec}: {len(paths) - len(found)} of {len(paths)} shards missing, e.g. {missing}')
    return paths


def read_shard(path: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard as dicts {'__key__': ..., 'png': bytes, ...}, in file order."""
    try:
        with open(path, 'rb') as f:
            members = (dict(m, __url__=path) for m in tariterators.tar_file_iterator(f))
            yield from tariterators.group_by_keys(members)
    except tarfile.TarError as e:
        raise ShardError(f'{path}: not a readable tar file ({e}); re-create it with dataset_tool.py shards') from None
