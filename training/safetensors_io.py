"""Network snapshots as .safetensors files: weights plus the constructor configuration, loaded without running
code from the file.

A network pickle rebuilds its objects by executing the source code it carries (torch_utils/persistence.py), so
loading one from a stranger runs the stranger's code. A .safetensors file instead holds plain tensors and a JSON
description of how to rebuild each snapshot entry ('ema', 'encoder', 'loss_fn', 'dataset_kwargs') from edm2x's own
classes: the class names must be on an allow-list of edm2x's persistent classes (plus VPDiffusion), constructor
arguments that name a class are checked against the same list, and the weights then replace the new object's.

The description of an object is what persistence recorded when it was made, its constructor arguments, encoded as
JSON with tagged values: {"__object__": class, "args", "kwargs"}, {"__tensor__": key}, {"__ndarray__": key},
{"__tuple__": [...]}, {"__dict__": {...}}. Plain attributes changed after construction (a VAE name replaced at
load time, say) are recorded per sub-module under "attrs". NVIDIA's EDM2 pickles map to edm2x's classes by name.
"""

import json
import os
from typing import Any

import numpy as np
import torch

import dnnlib
from torch_utils import persistence
from training import (
    backbones,
    cascade,
    clip_guide,
    encoders,
    loss,
    networks_dit,
    networks_dit_text,
    networks_edm2,
    networks_text,
    text,
    vp_diffusion,
)
from training.vp_diffusion import VPDiffusion

FORMAT = 'edm2x-safetensors'
VERSION = 1
_META_KEY = 'edm2x'
_CONFIG_PREFIX = '__config__.'  # Tensors that are constructor arguments, not weights.
_CLASS_ARGS = ('backbone', 'class_name')  # Constructor arguments that name a class to build.
_META_MIN_WEIGHTS = 1 << 25  # Networks with this many weights or more are built on the meta device first.
_MODULES = (
    networks_edm2,
    networks_text,
    networks_dit,
    networks_dit_text,
    text,
    backbones,
    vp_diffusion,
    clip_guide,
    encoders,
    loss,
    cascade,
)


class SafetensorsError(Exception):
    """A network that cannot be written as, or read from, a .safetensors file; one sentence for the user."""


def allowed_classes() -> dict[str, type]:
    """'training.module.Name' -> class, for every class a .safetensors file may build."""
    found = {'training.vp_diffusion.VPDiffusion': VPDiffusion}
    for module in _MODULES:
        for name, obj in vars(module).items():
            if isinstance(obj, type) and persistence.is_persistent(obj) and obj.__module__ == module.__name__:
                found[f'{module.__name__}.{name}'] = obj
    return found


def _class_path(obj: Any, allowed: dict[str, type]) -> str:
    """The allow-listed name of obj's class; a class from a pickle's embedded code (NVIDIA's) maps by its name."""
    cls = type(obj)
    path = f'{cls.__module__}.{cls.__name__}'
    if allowed.get(path) is cls:
        return path
    matches = [p for p in allowed if p.rsplit('.', 1)[1] == cls.__name__]
    if len(matches) != 1:
        raise SafetensorsError(f'{cls.__name__} (module {cls.__module__}) has no edm2x class to be rebuilt as.')
    return matches[0]


# ----------------------------------------------------------------------------
# Objects -> JSON-able descriptions and tensors.


def _encode(value: Any, tensors: dict[str, torch.Tensor], allowed: dict[str, type]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        key = f'{_CONFIG_PREFIX}{len([k for k in tensors if k.startswith(_CONFIG_PREFIX)])}'
        tensors[key] = torch.as_tensor(value).detach().cpu().contiguous().clone()
        return {'__tensor__' if isinstance(value, torch.Tensor) else '__ndarray__': key}
    if isinstance(value, list):
        return [_encode(v, tensors, allowed) for v in value]
    if isinstance(value, tuple):
        return {'__tuple__': [_encode(v, tensors, allowed) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise SafetensorsError(f'a dict with non-string keys ({list(value)[:3]}) cannot be stored.')
        return {'__dict__': {k: _encode(v, tensors, allowed) for k, v in value.items()}}
    if isinstance(value, VPDiffusion):
        kwargs = dict(betas=value.betas, prediction=value.prediction, variance=value.variance)
        kwargs['timesteps'] = value.timesteps
        return {
            '__object__': 'training.vp_diffusion.VPDiffusion',
            'args': [],
            'kwargs': _encode(kwargs, tensors, allowed),
        }
    if persistence.is_persistent(value):
        return {
            '__object__': _class_path(value, allowed),
            'args': [_encode(v, tensors, allowed) for v in value.init_args],
            'kwargs': _encode(dict(value.init_kwargs), tensors, allowed),
        }
    raise SafetensorsError(f'a {type(value).__name__} cannot be stored in a .safetensors file.')


def _plain_attrs(obj: Any) -> dict[str, dict[str, Any]]:
    """Sub-module path -> its attributes that are plain JSON scalars (what a constructor sets from its arguments)."""
    parts = obj.named_modules() if isinstance(obj, torch.nn.Module) else [('', obj)]
    plain = (bool, int, float, str, type(None))
    skip = ('training',)
    return {
        path: {k: v for k, v in vars(m).items() if type(v) in plain and k not in skip and not k.startswith('__')}
        for path, m in parts
    }


def _describe(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, allowed: dict[str, type]) -> dict:
    """An entry of the file: the object's description, its weights under `prefix`, and the attribute overrides."""
    entry = dict(config=_encode(obj, tensors, allowed))
    if isinstance(obj, torch.nn.Module):
        entry['training'] = obj.training
        for name, t in obj.state_dict().items():
            tensors[f'{prefix}.{name}'] = t.detach().cpu().contiguous().clone()
    if persistence.is_persistent(obj):  # Rebuild now, so that a file that cannot be loaded is never written.
        rebuilt = _construct(json.loads(json.dumps(entry['config'])), tensors, prefix, allowed)
        now, fresh = _plain_attrs(obj), _plain_attrs(rebuilt)
        attrs = {p: {k: v for k, v in a.items() if fresh.get(p, {}).get(k, v) != v} for p, a in now.items()}
        entry['attrs'] = {p: a for p, a in attrs.items() if a}
    return entry


def describe(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The JSON-able description of how `obj` was constructed, and the tensors among its arguments (no weights)."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, tensors, allowed_classes()), tensors


def save_safetensors(data: dict, path: str) -> None:
    """Write a snapshot dict (network under 'ema'; 'encoder', 'loss_fn', 'dataset_kwargs' and others optional) as
    `path`, atomically. Raises SafetensorsError for an entry that edm2x's classes cannot rebuild."""
    from safetensors.torch import save

    if not isinstance(data, dict) or 'ema' not in data:
        raise SafetensorsError("expected a snapshot dict with the network under 'ema'.")
    allowed, tensors, entries = allowed_classes(), {}, {}
    for name, obj in data.items():
        if '.' in name or name.startswith('__'):
            raise SafetensorsError(f'entry name {name!r} cannot be stored.')
        with torch.random.fork_rng(devices=[]):
            entries[name] = _describe(obj, tensors, name, allowed)
    meta = {_META_KEY: json.dumps(dict(format=FORMAT, version=VERSION, entries=entries))}
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with dnnlib.util.atomic_write(path) as f:
        f.write(save(tensors, metadata=meta))


# ----------------------------------------------------------------------------
# Descriptions and tensors -> objects, with nothing but allow-listed constructors run.


def _build(desc: Any, tensors: dict[str, torch.Tensor], allowed: dict[str, type]) -> Any:
    if desc is None or isinstance(desc, (bool, int, float, str)):
        return desc
    if isinstance(desc, list):
        return [_build(v, tensors, allowed) for v in desc]
    if not isinstance(desc, dict) or len(desc) not in (1, 3):
        raise SafetensorsError(f'unreadable value {str(desc)[:60]!r} in the configuration.')
    if '__tensor__' in desc or '__ndarray__' in desc:
        key = desc.get('__tensor__', desc.get('__ndarray__'))
        if not isinstance(key, str) or key not in tensors:
            raise SafetensorsError(f'the configuration refers to a missing tensor {str(key)[:60]!r}.')
        return tensors[key].clone() if '__tensor__' in desc else tensors[key].numpy().copy()
    if '__tuple__' in desc:
        return tuple(_build(desc['__tuple__'], tensors, allowed))
    if '__dict__' in desc and isinstance(desc['__dict__'], dict):
        return dnnlib.EasyDict({k: _build(v, tensors, allowed) for k, v in desc['__dict__'].items()})
    if set(desc) != {'__object__', 'args', 'kwargs'}:
        raise SafetensorsError(f'unreadable value {str(desc)[:60]!r} in the configuration.')
    name = desc['__object__']
    if name not in allowed:
        raise SafetensorsError(f'class {str(name)[:80]!r} is not one of the edm2x classes a file may build.')
    args, kwargs = _build(desc['args'], tensors, allowed), _build(desc['kwargs'], tensors, allowed)
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise SafetensorsError(f'the arguments of {name} are not a list and a dict.')
    for key in _CLASS_ARGS:
        if kwargs.get(key) is not None and kwargs[key] not in allowed:
            raise SafetensorsError(f'{name} argument {key}={str(kwargs[key])[:80]!r} is not an allowed edm2x class.')
    try:
        return allowed[name](*args, **kwargs)
    except Exception as e:  # Any failure of a constructor on stored arguments is the file's fault.
        raise SafetensorsError(f'{name} cannot be built from the stored arguments ({e}).') from None


def build(description: Any, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    """The object a description (from describe()) specifies, built by allow-listed constructors only, with freshly
    initialised weights; the caller's random state is kept. Raises SafetensorsError for anything else."""
    with torch.random.fork_rng(devices=[]):
        return _build(description, tensors or {}, allowed_classes())


def _with_weights(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A module takes the tensors stored under `prefix.` as its parameters and buffers (the dtypes stay)."""
    if isinstance(obj, torch.nn.Module):
        weights = {k[len(prefix) + 1 :]: t for k, t in tensors.items() if k.startswith(f'{prefix}.')}
        try:
            obj.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[1:2] or [str(e)]
            raise SafetensorsError(f'the weights of {prefix!r} do not fit its network ({first[0].strip()})') from None
    return obj


def _left_on_meta(obj: Any) -> bool:
    """Whether a tensor of `obj` (parameter, buffer, or tensor attribute of a part or of an object a part holds)
    was not replaced by a stored one."""
    parts = list(obj.modules()) if isinstance(obj, torch.nn.Module) else [obj]
    values = [v for part in parts for v in vars(part).values()]
    values += [v for x in list(values) if hasattr(x, '__dict__') and not isinstance(x, (type, torch.nn.Module))
               for v in vars(x).values()]  # fmt: skip
    if isinstance(obj, torch.nn.Module):
        values += [*obj.parameters(), *obj.buffers()]
    return any(isinstance(v, torch.Tensor) and v.is_meta for v in values)


def _construct(config: Any, tensors: dict[str, torch.Tensor], prefix: str, allowed: dict[str, type]) -> Any:
    """The object of a stored entry with its stored weights. A large network is first built on the meta device,
    where the random initial weights that the stored ones replace cost nothing (its first use in a process costs
    an import of about a second, more than a small net's random initialisation); a class that computes with
    tensors while it is built, or keeps tensors the weights do not cover, is built again on the CPU."""
    with torch.random.fork_rng(devices=[]):  # Construction draws random weights; keep the caller's RNG as it was.
        if sum(t.numel() for k, t in tensors.items() if k.startswith(f'{prefix}.')) >= _META_MIN_WEIGHTS:
            try:
                with torch.device('meta'):
                    obj = _build(config, tensors, allowed)
                obj = _with_weights(obj, tensors, prefix)
                if not _left_on_meta(obj):
                    return obj
            except SafetensorsError:
                pass  # Built again on the CPU, which raises the error a user should see.
        return _with_weights(_build(config, tensors, allowed), tensors, prefix)


def _restore(entry: dict, tensors: dict[str, torch.Tensor], prefix: str, allowed: dict[str, type]) -> Any:
    if not isinstance(entry, dict) or 'config' not in entry:
        raise SafetensorsError(f'entry {prefix!r} has no configuration.')
    obj = _construct(entry['config'], tensors, prefix, allowed)
    if isinstance(obj, torch.nn.Module):
        obj.train(entry.get('training') is True)
    attrs = entry.get('attrs', {})
    modules = dict(obj.named_modules()) if isinstance(obj, torch.nn.Module) else {'': obj}
    for path, values in attrs.items() if isinstance(attrs, dict) else [(None, None)]:
        target = modules.get(path)
        if target is None or not isinstance(values, dict):
            raise SafetensorsError(f'entry {prefix!r} sets attributes of an unknown part {str(path)[:60]!r}.')
        for k, v in values.items():
            if not hasattr(target, k) or type(getattr(target, k)) not in (type(v), type(None)) and v is not None:
                raise SafetensorsError(f'entry {prefix!r} sets an unknown attribute {path}.{str(k)[:60]}.')
            setattr(target, k, v)
    return obj


def load_safetensors(path: str) -> dict:
    """The snapshot dict stored in a .safetensors file, its objects built from edm2x's classes on the CPU."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise SafetensorsError(f'Network file not found: {path}')
    try:
        with safe_open(path, framework='pt') as f:
            meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SafetensorsError(f'{path} is not a readable .safetensors file ({e}).') from None
    try:
        header = json.loads(meta) if meta is not None else None
    except json.JSONDecodeError as e:
        raise SafetensorsError(f'{path} has a corrupt edm2x configuration ({e}).') from None
    if not isinstance(header, dict) or header.get('format') != FORMAT or not isinstance(header.get('entries'), dict):
        raise SafetensorsError(
            f'{path} holds no edm2x network configuration; convert the pickle with export_network.py.'
        )
    if header.get('version') != VERSION:
        raise SafetensorsError(f'{path} has format version {header.get("version")!r}; this edm2x reads {VERSION}.')
    allowed = allowed_classes()
    try:
        data = {name: _restore(entry, tensors, name, allowed) for name, entry in header['entries'].items()}
    except SafetensorsError as e:
        raise SafetensorsError(f'{path}: {e}') from None
    if 'ema' not in data:
        raise SafetensorsError(f"{path} holds no network: expected an 'ema' entry.")
    return data
