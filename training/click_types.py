"""Click parameter types shared by the scripts."""

import math
from collections.abc import Callable, Collection

import click
import torch

from training.presets_train import TRAIN_PRESETS


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN (which passes any range check) and, unless `infinite`, ±inf."""

    def __init__(self, *args, infinite: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.infinite = infinite

    def _describe_range(self) -> str:
        return '' if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if math.isnan(value) or (math.isinf(value) and not self.infinite):
            self.fail(f'{value} is not a {"number" if self.infinite else "finite number"}.', param, ctx)
        return value


def option_type(option) -> click.ParamType | type:
    """The click type of a number or text row of an option table (training.sampler_options.Option): a float is
    finite (or inf where the row allows it), an int is range-checked."""
    if option.type is float:
        return FiniteFloatRange(option.min, min_open=option.min_open, infinite=option.infinite)
    if option.type is int and option.min is not None:
        return click.IntRange(option.min, min_open=option.min_open)
    return option.type


def click_options(options: list, as_text: Collection[str] = ()) -> Callable:
    """A decorator adding the rows of an option table (training.sampler_options.Option) to a click command; the
    rows named in `as_text` are read as text (comma lists of a sweep) and parsed by the command."""

    def decorate(fn: Callable) -> Callable:
        for o in reversed(options):
            fn = click.option(
                o.flag,
                o.name,
                metavar=o.metavar,
                type=str if o.name in as_text else option_type(o),
                default=o.default,
                show_default=o.default is not None,
                help=o.help,
            )(fn)
        return fn

    return decorate


def throughput_options(unit: str) -> Callable:
    """The options of bench/train_speed.py and bench/sample_speed.py; `unit` names one timed call ('step' of
    training, 'eval' of the denoiser)."""
    options = [
        click.option(
            '--preset',
            metavar='STR',
            type=click.Choice(list(TRAIN_PRESETS)),
            default='demo',
            show_default=True,
            help='Training preset whose network is timed.',
        ),
        click.option(
            '--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True, help=f'Images/{unit}.'
        ),
        click.option(
            '--resolution', metavar='INT', type=int, default=None, help='Input size [default: preset data, else 64].'
        ),
        click.option(
            '--channels-in', 'img_channels', metavar='INT', type=int, default=3, show_default=True, help='4: latents.'
        ),
        click.option('--label-dim', metavar='INT', type=int, default=10, show_default=True, help='Number of classes.'),
        click.option(
            '--precision',
            type=click.Choice(['fp32', 'fp16', 'bf16']),
            default='fp32',
            show_default=True,
            help='Compute precision (as --precision of train_edm2.py and generate_images.py).',
        ),
        click.option(
            '--steps', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True, help=f'Timed {unit}s.'
        ),
        click.option(
            '--device',
            metavar='STR',
            default='cuda' if torch.cuda.is_available() else 'cpu',
            show_default=True,
            help='Torch device, e.g. cpu or cuda:1 (the default: cuda where available).',
        ),
        click.option(
            '--compile', 'compile_net', is_flag=True, help=f'torch.compile the network (first {unit} compiles).'
        ),
        click.option(
            '--peak-tflops',
            metavar='FLOAT',
            type=FiniteFloatRange(min=0, min_open=True),
            default=None,
            help='Device peak for MFU [default: table].',
        ),
        click.option(
            '--channels-last',
            metavar='BOOL',
            type=bool,
            default=None,
            help='U-Net activations channels-last (True) or NCHW (False) [default: channels-last on CPU only].',
        ),
        click.option(
            '--keep-freed-memory',
            'keep_freed',
            metavar='BOOL',
            type=bool,
            default=True,
            show_default=True,
            help='CPU: keep freed host memory for reuse, as training and generation do (False: glibc malloc defaults).',
        ),
        click.option('--threads', metavar='INT', type=click.IntRange(min=1), default=None, help='torch CPU threads.'),
        click.option(
            '--clock',
            type=click.Choice(['wall', 'process']),
            default='wall',
            show_default=True,
            help='process: CPU time.',
        ),
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate
