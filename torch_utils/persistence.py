"""Pickles that carry their own source code (the network-pickle format of StyleGAN2-ADA and EDM2).

An instance of a class decorated with `persistent_class` pickles as a call to
`_reconstruct_persistent_obj(meta)`, with the full source text of the module that defined the class in
`meta`. Loading executes that source in a fresh module, so a network pickle keeps working after the
code that made it has changed or gone, and NVIDIA's EDM2 pickles load with edm2x's modules."""

import copy
import inspect
import linecache
import sys
import types
import uuid
from collections.abc import Callable
from typing import Any

import torch

import dnnlib

_version = 6  # Format version written into every meta dict.
_decorators: set[type] = set()  # Every class persistent_class has produced.
_decorated: dict[type, type] = {}  # Original class -> its decorated subclass.
_import_hooks: list[Callable[[dict], dict]] = []  # Patches applied to meta before loading.
_module_to_src_dict: dict[types.ModuleType, str] = {}
_src_to_module_dict: dict[str, types.ModuleType] = {}


def persistent_class(orig_class: type) -> type:
    """Class decorator: instances pickle together with the source of the defining module, and keep
    deep copies of their constructor arguments in `init_args` / `init_kwargs`. A torch module passed directly as
    an argument (a wrapped network; not one inside a list or dict) is recorded as itself, not copied: it is a
    part of the object, and a copy would hold a second, stale set of its weights in memory and in every pickle."""
    if not isinstance(orig_class, type):
        raise TypeError(f'persistent_class expects a class, got {type(orig_class).__name__}')
    if orig_class in _decorators:
        return orig_class
    if orig_class in _decorated:
        return _decorated[orig_class]
    module_src = _module_to_src(sys.modules[orig_class.__module__])

    class Persistent(orig_class):
        _orig_module_src, _orig_class_name = module_src, orig_class.__name__

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Copy first, so that a constructor that mutates its arguments cannot alter the record.
            parts = {id(a): a for a in (*args, *kwargs.values()) if isinstance(a, torch.nn.Module)}
            init_args, init_kwargs = copy.deepcopy(args, dict(parts)), copy.deepcopy(kwargs, dict(parts))
            super().__init__(*args, **kwargs)
            self._init_args = init_args
            self._init_kwargs = init_kwargs

        @property
        def init_args(self) -> tuple:
            return copy.deepcopy(self._init_args)

        @property
        def init_kwargs(self) -> dnnlib.EasyDict:
            return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

        def __reduce__(self) -> tuple:
            meta = dict(
                type='class',
                version=_version,
                module_src=self._orig_module_src,
                class_name=self._orig_class_name,
                state=_get_state(self, orig_class),
            )
            return _reconstruct_persistent_obj, (meta,), None

    for attr in ('__name__', '__qualname__', '__module__', '__doc__'):
        setattr(Persistent, attr, getattr(orig_class, attr))
    _decorators.add(Persistent)
    _decorated[orig_class] = Persistent
    return Persistent


def _get_state(obj: Any, orig_class: type) -> Any:
    # Python 3.11 gives every object a __getstate__; only a class's own one changes the state.
    if getattr(orig_class, '__getstate__', None) is not getattr(object, '__getstate__', None):
        return obj.__getstate__()
    return dict(obj.__dict__)


def is_persistent(obj: Any) -> bool:
    """Whether `obj` is a persistent class or an instance of one."""
    return (obj if isinstance(obj, type) else type(obj)) in _decorators


def import_hook(hook: Callable[[dict], dict]) -> None:
    """Register `hook(meta) -> meta`, run on every persistent object before it is rebuilt; hooks can
    patch `meta.module_src` or `meta.state` to load pickles made by older code."""
    if not callable(hook):
        raise TypeError('import_hook expects a callable')
    _import_hooks.append(hook)


def _reconstruct_persistent_obj(meta: dict) -> Any:
    """Rebuild a persistent object from the meta dict written by its __reduce__."""
    state = meta.get('state')
    meta = dnnlib.EasyDict(meta, state=dnnlib.EasyDict(state) if isinstance(state, dict) else state)
    for patch in _import_hooks:
        meta = patch(meta)
        if meta is None:
            raise TypeError(f'import hook {patch!r} returned None instead of the meta dict')
    if meta.get('type') != 'class':
        raise ValueError(f"unknown persistent object type {meta.get('type')!r}; expected 'class'")
    if not isinstance(meta.get('version'), int) or not 1 <= meta.version <= _version:
        raise ValueError(
            f'persistent object format version {meta.get("version")!r} is newer than '
            f'this code understands ({_version}); update edm2x'
        )

    cls = persistent_class(getattr(_src_to_module(meta.module_src), meta.class_name))
    obj = cls.__new__(cls)
    if meta.state is not None:
        if hasattr(cls, '__setstate__'):
            obj.__setstate__(meta.state)
        else:
            vars(obj).update(meta.state)
    return obj


def _module_to_src(module: types.ModuleType) -> str:
    """Source text of a module: remembered for modules built from pickles, else read by inspect."""
    if module not in _module_to_src_dict:
        _module_to_src_dict[module] = inspect.getsource(module)
    return _module_to_src_dict[module]


def _src_to_module(src: str) -> types.ModuleType:
    """A module executed from `src`, built once per distinct source text."""
    module = _src_to_module_dict.get(src)
    if module is not None:
        return module
    name = f'_imported_module_{uuid.uuid4().hex}'
    filename = f'<persistent {name}>'
    module = types.ModuleType(name)
    module.__file__ = filename
    # Registered before exec, so that classes defined in the source can be pickled and inspected,
    # and tracebacks show the embedded source lines.
    sys.modules[name] = module
    linecache.cache[filename] = (len(src), None, src.splitlines(keepends=True), filename)
    _module_to_src_dict[module], _src_to_module_dict[src] = src, module
    try:
        exec(compile(src, filename, 'exec'), module.__dict__)
    except BaseException:
        del sys.modules[name], linecache.cache[filename], _module_to_src_dict[module], _src_to_module_dict[src]
        raise
    return module
