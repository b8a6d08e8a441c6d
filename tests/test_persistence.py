"""Tests for torch_utils.persistence: self-contained pickles, nesting, import hooks, NVIDIA's format."""

import io
import pickle
import sys
import textwrap
import uuid

import pytest
import torch

from torch_utils import persistence

MODULE_SRC = textwrap.dedent("""
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Inner(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.linear = torch.nn.Linear(channels, channels)

        def forward(self, x):
            return self.linear(x).relu() + OFFSET

    @persistence.persistent_class
    class Outer(torch.nn.Module):
        def __init__(self, channels, scale=2.0):
            super().__init__()
            self.inner = Inner(channels)
            self.scale = scale

        def forward(self, x):
            return self.inner(x) * self.scale

    @persistence.persistent_class
    class Wrapper(torch.nn.Module):
        def __init__(self, net, options):
            super().__init__()
            self.net = net
            self.options = options

        def forward(self, x):
            return self.net(x)

    OFFSET = 1.0
""")


class _MetaCapture(pickle.Unpickler):
    """Unpickles persistent objects as their raw meta dicts, to inspect the format independently."""

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return lambda meta: meta
        return super().find_class(module, name)


def _raw_meta(data: bytes) -> dict:
    return _MetaCapture(io.BytesIO(data)).load()


@pytest.fixture
def temp_module(tmp_path, monkeypatch):
    """Import MODULE_SRC from a temp file; yields (module, forget) where forget() removes every trace."""
    name = f'persist_test_{uuid.uuid4().hex}'
    (tmp_path / f'{name}.py').write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)

    def forget():
        del sys.modules[name]
        sys.path.remove(str(tmp_path))
        (tmp_path / f'{name}.py').unlink()

    return module, forget


def test_round_trip_without_defining_module(temp_module):
    module, forget = temp_module
    torch.manual_seed(0)
    net = module.Outer(4, scale=3.0)
    x = torch.randn(2, 4)
    expected = (torch.nn.functional.linear(x, net.inner.linear.weight, net.inner.linear.bias).relu() + 1.0) * 3.0
    data = pickle.dumps(net)
    forget()
    with pytest.raises(ImportError):
        __import__(module.__name__)
    loaded = pickle.loads(data)
    assert type(loaded).__module__ != module.__name__
    assert persistence.is_persistent(loaded) and persistence.is_persistent(loaded.inner)
    assert torch.equal(loaded(x), expected)
    assert loaded.init_args == (4,) and loaded.init_kwargs == {'scale': 3.0}
    assert loaded.inner.init_args == (4,)


def test_meta_follows_spec_and_survives_repickling(temp_module):
    module, forget = temp_module
    data = pickle.dumps(module.Outer(3))
    meta = _raw_meta(data)
    assert {k: meta[k] for k in ('type', 'version', 'class_name')} == {
        'type': 'class',
        'version': 6,
        'class_name': 'Outer',
    }
    assert meta['module_src'] == MODULE_SRC
    inner_meta = meta['state']['_modules']['inner']
    assert inner_meta['class_name'] == 'Inner' and inner_meta['module_src'] == MODULE_SRC
    forget()
    again = _raw_meta(pickle.dumps(pickle.loads(data)))
    assert again['module_src'] == MODULE_SRC
    assert torch.equal(
        again['state']['_modules']['inner']['state']['_modules']['linear'].weight,
        meta['state']['_modules']['inner']['state']['_modules']['linear'].weight,
    )


def test_same_source_is_executed_once(temp_module):
    module, _ = temp_module
    a = pickle.loads(pickle.dumps(module.Outer(2)))
    b = pickle.loads(pickle.dumps(module.Inner(2)))
    assert type(a.inner) is type(b)
    assert sys.modules[type(a).__module__].Outer is type(a)


def test_init_args_are_copies(temp_module):
    module, _ = temp_module
    net = module.Outer(2, scale=[1.0])
    net.init_kwargs['scale'].append(5.0)
    assert net.init_kwargs == {'scale': [1.0]}


def test_a_wrapped_module_is_recorded_as_itself_and_pickled_once(temp_module):
    module, forget = temp_module
    options = {'steps': [1]}
    wrapper = module.Wrapper(module.Inner(64), options=options)
    options['steps'].append(2)
    assert wrapper._init_args[0] is wrapper.net and wrapper.init_kwargs == {'options': {'steps': [1]}}
    weight_bytes = 64 * 64 * 4
    assert len(pickle.dumps(wrapper)) - len(pickle.dumps(wrapper.net)) < weight_bytes / 2  # one set of weights
    data = pickle.dumps(wrapper)
    forget()
    loaded = pickle.loads(data)
    assert loaded._init_args[0] is loaded.net and type(loaded.net).__name__ == 'Inner'
    rebuilt = type(loaded)(*loaded.init_args, **loaded.init_kwargs)
    x = torch.randn(3, 64)
    assert torch.equal(rebuilt(x), wrapper(x)) and rebuilt.net is not loaded.net


def test_import_hook_can_patch_source(temp_module, monkeypatch):
    module, forget = temp_module
    monkeypatch.setattr(persistence, '_import_hooks', [])
    net = module.Outer(2)
    data = pickle.dumps(net)
    forget()
    seen = []

    def hook(meta):
        seen.append(meta.class_name)
        meta.module_src = meta.module_src.replace('OFFSET = 1.0', 'OFFSET = 11.0')
        return meta

    persistence.import_hook(hook)
    loaded = pickle.loads(data)
    x = torch.randn(3, 2)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x) + 10.0 * 2.0)
    assert sorted(seen) == ['Inner', 'Outer']


def test_unknown_format_is_rejected():
    meta = dict(type='class', version=99, module_src='', class_name='X', state={})
    with pytest.raises(ValueError, match='version'):
        persistence._reconstruct_persistent_obj(meta)


NVIDIA_STYLE_SRC = textwrap.dedent("""
    import numpy as np
    import torch
    import psutil
    import dnnlib
    from torch_utils import persistence
    from torch_utils import misc
    from torch_utils import distributed as dist
    from torch_utils import training_stats

    @persistence.persistent_class
    class Scale(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            return x * misc.const_like(x, [1.0, 2.0]) * np.float32(self.k), dnnlib.make_cache_dir_path('x')
""")


class _HandBuilt:
    """Pickles exactly as a call to _reconstruct_persistent_obj(meta), the way NVIDIA's files are laid out."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)


def test_nvidia_style_pickle_loads_and_runs(monkeypatch, tmp_path):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    state = dict(torch.nn.Module().__dict__, k=3.0, _init_args=(3.0,), _init_kwargs={})
    meta = dict(type='class', version=6, module_src=NVIDIA_STYLE_SRC, class_name='Scale', state=state)
    data = pickle.dumps({'ema': _HandBuilt(meta)})
    net = pickle.loads(data)['ema']
    x = torch.randn(5, 2, dtype=torch.float64)
    y, path = net(x)
    assert y.dtype == torch.float64 and torch.equal(y, x * torch.tensor([1.0, 2.0], dtype=torch.float64) * 3.0)
    assert path == str(tmp_path / 'x')
    assert net.init_args == (3.0,) and persistence.is_persistent(net)
    assert _raw_meta(pickle.dumps(net))['module_src'] == NVIDIA_STYLE_SRC
