"""Click parameter types shared by the scripts."""

import math
from collections.abc import Callable, Collection

import click


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
