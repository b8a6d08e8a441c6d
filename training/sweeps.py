"""Sweeps over sampler settings: comma lists of --guidance, --guidance-interval, --solver and --steps expand
into every combination, each generated into its own sub-folder (the way guidance weight, interval and
solver are tuned, Kynkäänniemi et al. 2024)."""

import itertools
import os
from typing import Any

import dnnlib
from training.generation import SAMPLER_OPTIONS, GenerationError, resolve_sampler_options

SWEEP_NAMES = ('guidance', 'guidance_interval', 'solver', 'num_steps')  # Option names that take comma lists.
_SHORT = dict(guidance='w', guidance_interval='interval', solver='', num_steps='steps')


def _values(name: str, text: Any) -> list[Any]:
    """One option's comma list as values of its type; intervals are consecutive pairs LO,HI,LO,HI,..."""
    if not isinstance(text, str):
        return [text]
    option = next(o for o in SAMPLER_OPTIONS if o.name == name)
    items = [v.strip() for v in text.split(',')]
    if name == 'guidance_interval':
        if len(items) % 2:
            raise GenerationError(f'{option.flag}={text}: give pairs LO,HI (a sweep: LO,HI,LO,HI,...).')
        return [f'{lo},{hi}' for lo, hi in zip(items[::2], items[1::2])]
    try:
        values = [option.type(v) for v in items]
    except ValueError:
        raise GenerationError(f'{option.flag}={text}: give a {option.metavar} or a comma list of them.') from None
    if option.min is not None and any(v < option.min or (option.min_open and v == option.min) for v in values):
        raise GenerationError(f'{option.flag}={text}: every value must be at least {option.min}.')
    return values


def single_value(name: str, text: Any) -> Any:
    """An option that cannot be swept here (e.g. the guidance of a cascade) as one value of its type."""
    values = _values(name, text)
    if len(values) > 1:
        raise GenerationError(f'{name}={text}: give one value here; sweeps run for single networks only.')
    return values[0]


def sweep_settings(options: dict[str, Any]) -> list[tuple[str, dnnlib.EasyDict]]:
    """(sub-folder name, resolve_sampler_options() result) per combination; the name is '' without a sweep."""
    lists = {name: _values(name, options[name]) if name in SWEEP_NAMES else [options[name]] for name in options}
    swept = [name for name in SWEEP_NAMES if len(lists.get(name, [])) > 1]
    settings = []
    for combo in itertools.product(*lists.values()):
        values = dict(zip(lists, combo))
        label = '-'.join(f'{_SHORT[n]}{values[n]}'.replace(',', '_') for n in swept)
        settings.append((label, resolve_sampler_options(**values)))
    return settings


def sweep_path(path: str | None, label: str, folder: bool = False) -> str | None:
    """A combination's output: a sub-folder of an output folder, or a suffix before a file's extension."""
    if path is None or not label:
        return path
    if folder:
        return os.path.join(path, label)
    root, ext = os.path.splitext(path)
    return f'{root}-{label}{ext}'
