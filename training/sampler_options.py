"""Sampler options as data, presets and sweeps: the rows each script turns into its own command-line options.

`SAMPLER_OPTIONS` lists the sampler settings of `training.generation.sample()` (EDM2's option names);
`resolve_sampler_options` expands a generation preset under the options given and checks them;
`sweep_settings` expands comma lists of --guidance, --guidance-interval, --solver and --steps into every
combination, each generated into its own sub-folder (the way guidance weight, interval and solver are tuned,
Kynkäänniemi et al. 2024).
"""

import itertools
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable

import dnnlib
from training.generation import SAMPLERS, GenerationError, unread_settings
from training.presets_generate import presets
from training.solvers import ORDERS, SCHEDULES, check_solver


@dataclass(frozen=True)
class Option:
    flag: str
    name: str
    type: type
    default: Any
    metavar: str
    help: str
    min: float | None = None  # Lower bound of a number.
    min_open: bool = False  # The bound itself is excluded.
    infinite: bool = False  # A float that may be inf (never NaN); other floats must be finite.


SAMPLER_OPTIONS: list[Option] = [
    Option('--preset', 'preset', str, None, 'NAME', 'Named net/gnet/guidance, e.g. edm2-img512-s-autog-fid, or demo.'),
    Option(
        '--net',
        'net',
        str,
        None,
        'PKL|PT|URL|DIR',
        'Network (.pkl, .safetensors), run folder, or DiT checkpoint (.pt, diffusers).',
    ),
    Option(
        '--gnet', 'gnet', str, None, 'PKL|URL|DIR', 'Guiding network: unconditional (CFG) or weaker (autoguidance).'
    ),
    Option(
        '--guidance',
        'guidance',
        float,
        None,
        'FLOAT[,..]',
        'Guidance strength w; 1 = none; a comma list sweeps  [default: preset, else 1]',
    ),
    Option(
        '--steps',
        'num_steps',
        int,
        None,
        'INT[,..]',
        'Number of sampling steps; a comma list sweeps  [default: preset, else 32]',
        min=1,
    ),
    Option(
        '--sigma_min',
        'sigma_min',
        float,
        None,
        'FLOAT',
        "Lowest noise level  [default: a DDPM net's, else 0.002]",
        min=0,
        min_open=True,
    ),
    Option(
        '--sigma_max',
        'sigma_max',
        float,
        None,
        'FLOAT',
        "Highest noise level  [default: a DDPM net's, else 80]",
        min=0,
        min_open=True,
    ),
    Option('--rho', 'rho', float, 7.0, 'FLOAT', 'Time step exponent of the karras schedule.', min=0, min_open=True),
    Option('--S_churn', 'S_churn', float, None, 'FLOAT', 'Stochasticity strength  [default: preset, else 0]', min=0),
    Option('--S_min', 'S_min', float, 0.0, 'FLOAT', 'Lowest noise level with churn.', min=0),
    Option('--S_max', 'S_max', float, float('inf'), 'FLOAT', 'Highest noise level with churn.', min=0, infinite=True),
    Option('--S_noise', 'S_noise', float, 1.0, 'FLOAT', 'Churn noise inflation.'),
    # ODE solver, noise-level schedule and guidance interval (training/solvers.py, training/sampling.py).
    Option('--solver', 'solver', str, 'heun', 'NAME[,..]', f'ODE solver: {", ".join(ORDERS)}; a comma list sweeps.'),
    Option('--schedule', 'schedule', str, 'karras', 'NAME', f'Noise levels: {", ".join(SCHEDULES)}.'),
    Option(
        '--guidance-interval',
        'guidance_interval',
        str,
        None,
        'LO,HI[,..]',
        'Guide only for LO < sigma <= HI; more pairs sweep.',
    ),
    # Discrete-time samplers, for every net (see sample()).
    Option('--sampler', 'sampler', str, None, 'edm|ddpm|ddim', 'Sampler  [default: preset, else edm]'),
    Option('--respacing', 'respacing', str, None, 'STR', 'DDPM/DDIM steps: 250, ddim25, 10,15,20  [default: --steps]'),
    Option('--eta', 'eta', float, 0.0, 'FLOAT', 'DDIM noise: 0 deterministic, 1 as DDPM.', min=0),
    Option(
        '--vp-schedule', 'vp_schedule', str, None, 'NAME', 'β schedule of an EDM net under ddpm/ddim  [default: linear]'
    ),
    Option('--vae', 'vae', str, None, 'ID|DIR', "VAE decoder of a latent net  [default: preset, else the net's]"),
]

# Each option's value when not given: its default, or for these the one sample() takes in place of None.
_DEFAULTS = {**{o.name: o.default for o in SAMPLER_OPTIONS}, 'S_churn': 0.0, 'num_steps': 32}


def _number_ok(option: Option, value: float) -> bool:
    return math.isfinite(value) or (option.infinite and not math.isnan(value))


def check_solver_options(k: dict[str, Any], given: Iterable[str] | None = None) -> None:
    """Parse --guidance-interval 'LO,HI' in place to (σ_lo, σ_hi); a GenerationError for settings that cannot run,
    and for those `given` (the options set on the command line; default: all of k) at a value other than their
    default that the sampler would not read (training.generation.unread_settings)."""
    text = k.get('guidance_interval')
    if isinstance(text, str):
        try:
            k['guidance_interval'] = lo, hi = tuple(float(v) for v in text.split(','))
        except ValueError:
            raise GenerationError(f'--guidance-interval={text}: give two noise levels LO,HI, e.g. 0.3,5.') from None
        if not 0 <= lo <= hi:
            raise GenerationError(f'--guidance-interval={text}: needs 0 <= LO <= HI.')
    for o in SAMPLER_OPTIONS:
        value = k.get(o.name)
        if o.type is float and o.name not in SWEEP_NAMES and value is not None and not _number_ok(o, value):
            raise GenerationError(f'{o.flag}={value}: give a {"number" if o.infinite else "finite number"}.')
    if k.get('sigma_min') is not None and k.get('sigma_max') is not None and k['sigma_min'] >= k['sigma_max']:
        raise GenerationError(f'--sigma_min={k["sigma_min"]} must be below --sigma_max={k["sigma_max"]}.')
    try:
        check_solver(k.get('solver', 'heun'), k.get('schedule', 'karras'), k.get('num_steps', 32), k.get('S_churn', 0))
    except ValueError as e:
        raise GenerationError(str(e)) from None
    unread = unread_settings(k)
    flags = {}  # condition -> the flags set that need it
    for name in k if given is None else given:
        if name in unread and k.get(name, _DEFAULTS.get(name)) != _DEFAULTS.get(name):
            flags.setdefault(unread[name], []).append(next(o.flag for o in SAMPLER_OPTIONS if o.name == name))
    if flags:
        parts = [f'{" and ".join(f)} {"applies" if len(f) == 1 else "apply"} {why}' for why, f in flags.items()]
        raise GenerationError(f'{"; ".join(parts)}.')


def override_sampler_settings(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Sampler settings `given` over a preset's `defaults`. A preset's churn belongs to its Heun solver: with another
    solver given, it runs without (churn given explicitly stays, and check_solver_options refuses it)."""
    defaults = dict(defaults)
    if given.get('solver', defaults.get('solver', 'heun')) != 'heun':
        defaults.pop('S_churn', None)
    return {**defaults, **given}


def resolve_sampler_options(
    preset: str | None,
    net: str | None,
    gnet: str | None,
    guidance: float | None,
    vae: str | None = None,
    **sampler_kwargs: Any,
) -> dnnlib.EasyDict:
    """Expand a preset under the options given: EasyDict(net, gnet, vae, sampler_kwargs) for generate_images().
    Options left at None take the preset's value, else sample()'s default."""
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    given = [key for key, value in sampler_kwargs.items() if value != _DEFAULTS.get(key)]
    if preset is not None:
        if preset not in presets:
            raise GenerationError(f'Unknown preset {preset!r}; choose one of: {", ".join(presets)}.')
        p = presets[preset]
        net, gnet, vae = net or p.net, gnet or p.gnet, vae or p.get('vae')
        guidance = p.guidance if guidance is None else guidance
        sampler_kwargs = override_sampler_settings(p.get('sampler_kwargs', {}), sampler_kwargs)
    if net is None:
        raise GenerationError('No network given: use --net=PKL or --preset=NAME.')
    if sampler_kwargs.get('sampler', 'edm') not in SAMPLERS:
        raise GenerationError(f'Unknown sampler {sampler_kwargs["sampler"]!r}; choose one of: {", ".join(SAMPLERS)}.')
    guidance = 1.0 if guidance is None else guidance
    check_solver_options(sampler_kwargs, given)
    return dnnlib.EasyDict(
        net=net, gnet=gnet, vae=vae, sampler_kwargs=dnnlib.EasyDict(guidance=guidance, **sampler_kwargs)
    )


def read_prompts(prompt: Iterable[str], prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts=FILE."""
    prompts = list(prompt)
    if prompts_file is None:
        return prompts
    try:
        with open(prompts_file, encoding='utf-8') as f:
            prompts += [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(
            f'--prompts={prompts_file}: cannot read it ({e}); give a UTF-8 text file, one prompt a line.'
        ) from None
    if not prompts:
        raise GenerationError(f'--prompts={prompts_file} holds no prompts; write one prompt a line.')
    return prompts


# ----------------------------------------------------------------------------
# Sweeps.

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
    if option.type is float and not all(_number_ok(option, v) for v in values):
        raise GenerationError(f'{option.flag}={text}: every value must be a finite number.')
    if option.min is not None and any(v < option.min or (option.min_open and v == option.min) for v in values):
        raise GenerationError(f'{option.flag}={text}: every value must be at least {option.min}.')
    return values


def single_value(name: str, text: Any) -> Any:
    """An option that cannot be swept here (e.g. the guidance of a cascade) as one value of its type."""
    values = _values(name, text)
    if len(values) > 1:
        raise GenerationError(f'{name}={text}: give one value here; sweeps run for single networks only.')
    return values[0]


# Options a cascade cannot take: its stages name their own networks, and it runs the EDM sampler.
_NOT_FOR_CASCADES = ('preset', 'net', 'gnet', 'sampler', 'respacing', 'eta', 'vp_schedule', 'vae')


def cascade_settings(options: dict[str, Any]) -> dict[str, Any]:
    """A cascade's settings from the SAMPLER_OPTIONS values given: `guidance` for its base stage and the EDM
    sampler's settings for every stage, one value each (a cascade is not swept)."""
    given = {o.name: options.get(o.name, o.default) for o in SAMPLER_OPTIONS if options.get(o.name) is not None}
    wrong = [
        o.flag for o in SAMPLER_OPTIONS if o.name in _NOT_FOR_CASCADES and given.get(o.name, o.default) != o.default
    ]
    if wrong:
        verb = 'does' if len(wrong) == 1 else 'do'
        raise GenerationError(
            f'{", ".join(wrong)} {verb} not apply to --cascade, whose stages name their networks and run the EDM '
            f'sampler.'
        )
    settings = {name: single_value(name, value) for name, value in given.items() if name not in _NOT_FOR_CASCADES}
    check_solver_options(settings)  # Parses the interval.
    return settings


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
