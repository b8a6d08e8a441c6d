"""Checks of the files and folders a script is asked to write, made before any work: an output that cannot be
written, or that would replace one of the script's inputs, is refused in one line while nothing is lost yet."""

import os
from collections.abc import Sequence


class OutputPathError(ValueError):
    pass


def nearest_existing(path: str) -> str:
    """`path`, or the nearest folder above it that exists (absolute)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def file_on_the_way(path: str) -> str | None:
    """The file standing where a folder above `path` would have to be, so that `path` cannot be made; or None."""
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    return None if os.path.isdir(parent) else parent


def _check_parent(flag: str, path: str) -> None:
    if blocker := file_on_the_way(path):
        raise OutputPathError(f'{flag}={path}: {blocker} is a file, not a folder.')


def check_output_folder(flag: str, path: str, inputs: Sequence[tuple[str, str | None]] = (), also: str = '') -> None:
    """`path` can be a folder to write into: it is one, or it can be made (no file on its way); `also`, a file
    written in it, is none of `inputs`, (flag, path) pairs of the files the script reads."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f'{flag}={path} is a file, not a folder; name a new or existing folder.')
    _check_parent(flag, path)
    _check_inputs(flag, path, also, inputs)


def check_output_file(
    flag: str, path: str, suffixes: tuple[str, ...], inputs: Sequence[tuple[str, str | None]] = (), also: str = ''
) -> None:
    """`path` can become a file ending in one of `suffixes` (any case), and is none of `inputs`, (flag, path) pairs
    of the files the script reads; nor is `also`, a file written beside `path`."""
    kinds = ' or '.join(suffixes)
    if not path.lower().endswith(suffixes):
        raise OutputPathError(f'{flag}={path}: name a {kinds} file.')
    if os.path.isdir(path):
        raise OutputPathError(f'{flag}={path} is a folder; name a {kinds} file.')
    _check_parent(flag, path)
    for input_flag, input_path in inputs:
        if input_path and os.path.realpath(path) == os.path.realpath(input_path):
            raise OutputPathError(f'{flag}={path} is the input {input_flag}; name another file.')
    _check_inputs(flag, path, also, inputs)


def _check_inputs(flag: str, path: str, also: str, inputs: Sequence[tuple[str, str | None]]) -> None:
    for input_flag, input_path in inputs:
        if also and input_path and os.path.realpath(also) == os.path.realpath(input_path):
            raise OutputPathError(f'{flag}={path} would write {also} over the input {input_flag}; name another one.')
