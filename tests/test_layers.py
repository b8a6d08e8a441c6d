"""The layers of the tree, read from every import statement (deferred ones inside functions included).

    scripts (top-level *.py, bench/*.py)   parse options, call training/; nothing imports them
      -> training/                        the library; no import cycles among its modules
        -> torch_utils/, dnnlib/          generic helpers; import nothing above them

Only the scripts may use click: library modules raise their own exception types. The one exception is
training/click_types.py, the click parameter types the scripts share (scripts cannot import one another); nothing in
training/ imports it.
"""

import ast
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ('dnnlib', 'torch_utils', 'training')
SKIPPED_DIRS = {'tests', 'docs', 'build', 'dist'}
CLICK_TYPES = 'training.click_types'  # The scripts' shared click types: the only click below them.


class Import:
    """One import statement's target, with where it was written."""

    def __init__(self, file: str, line: int, target: str) -> None:
        self.file, self.line, self.target = file, line, target

    def __str__(self) -> str:
        return f'{self.file}:{self.line} imports {self.target}'


def repo_modules(root: Path) -> dict[str, str]:
    """Dotted module name -> path relative to `root`, for the repository's own .py files outside tests/."""
    modules = {}
    for path in sorted(root.rglob('*.py')):
        rel = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.startswith('.') for part in rel.parts[:-1]):
            continue
        parts = rel.with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        modules[name] = rel.as_posix()
    return modules


def layer(module: str) -> str:
    """'dnnlib', 'torch_utils', 'training' or 'script' (every other file: top-level tools and bench/)."""
    top = module.split('.')[0]
    return top if top in LIBRARY_PACKAGES else 'script'


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `tree`; `from a import b` yields a.b (b may be a module)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                package = module.split('.') if is_package else module.split('.')[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            names += [(node.lineno, base)] + [(node.lineno, f'{base}.{alias.name}'.strip('.')) for alias in node.names]
    return names


def collect_imports(root: Path) -> dict[str, list[Import]]:
    """Module -> its imports, each resolved to a repository module where it names one (else kept as written)."""
    modules = repo_modules(root)
    result = {}
    for module, rel in modules.items():
        tree = ast.parse((root / rel).read_text(encoding='utf-8'), filename=rel)
        found = {}
        for line, name in imported_names(tree, module, rel.endswith('__init__.py')):
            prefixes = ['.'.join(name.split('.')[:i]) for i in range(name.count('.') + 1, 0, -1)]
            target = next((p for p in prefixes if p in modules), name)
            if target != module:
                found.setdefault(target, Import(rel, line, target))
        result[module] = list(found.values())
    return result


def layer_violations(imports: dict[str, list[Import]], modules: dict[str, str]) -> dict[str, list[str]]:
    """Rule name -> offending imports, for the rules between layers."""
    rules: dict[str, list[str]] = {
        'dnnlib/torch_utils import training/ or a script': [],
        'training/ imports a script': [],
        'a script imports a script': [],
        'click below the scripts': [],
    }
    for module, found in imports.items():
        for imp in found:
            src = layer(module)
            dst = layer(imp.target) if imp.target in modules else None
            if src in ('dnnlib', 'torch_utils') and dst in ('training', 'script'):
                rules['dnnlib/torch_utils import training/ or a script'].append(str(imp))
            if src == 'training' and dst == 'script':
                rules['training/ imports a script'].append(str(imp))
            if src == 'script' and dst == 'script':
                rules['a script imports a script'].append(str(imp))
            if src != 'script' and imp.target.split('.')[0] == 'click' and module != CLICK_TYPES:
                rules['click below the scripts'].append(str(imp))
            if src != 'script' and (imp.target == CLICK_TYPES or imp.target.startswith(CLICK_TYPES + '.')):
                rules['click below the scripts'].append(str(imp))
    return rules


def training_cycles(imports: dict[str, list[Import]]) -> list[str]:
    """Every import cycle among training/ modules (strongly connected components, Tarjan), with its edges."""
    graph = {
        m: [i for i in found if layer(i.target) == 'training' and i.target in imports]
        for m, found in imports.items()
        if layer(m) == 'training'
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for edge in graph[v]:
            w = edge.target
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [
        ' and '.join(str(e) for m in sorted(c) for e in graph[m] if e.target in c) for c in components if len(c) > 1
    ]


def check_tree(root: Path) -> dict[str, list[str]]:
    modules = repo_modules(root)
    imports = collect_imports(root)
    return {**layer_violations(imports, modules), 'import cycle in training/': training_cycles(imports)}


@pytest.fixture(scope='module')
def repo_report() -> dict[str, list[str]]:
    return check_tree(REPO)


@pytest.mark.parametrize(
    'rule',
    [
        'dnnlib/torch_utils import training/ or a script',
        'training/ imports a script',
        'a script imports a script',
        'click below the scripts',
        'import cycle in training/',
    ],
)
def test_repository_keeps_its_layers(repo_report, rule):
    offences = repo_report[rule]
    assert not offences, f'{rule}:\n  ' + '\n  '.join(offences)


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, source in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(source))


CLEAN_TREE = {
    'dnnlib/__init__.py': 'from . import util\n',
    'dnnlib/util.py': 'import os\n',
    'torch_utils/misc.py': 'import dnnlib\n',
    'training/__init__.py': '',
    'training/a.py': 'from torch_utils import misc\nfrom . import b\n',
    'training/b.py': 'import dnnlib.util\n',
    'training/click_types.py': 'import click\n',  # The scripts' shared click types.
    'tool.py': 'import click\nfrom training import a\nfrom training.click_types import T\n',
    'bench/speed.py': 'from training.b import x\n',
    'tests/test_x.py': 'import tool\n',  # tests may import scripts
}


def test_checker_passes_a_clean_tree(tmp_path):
    _write_tree(tmp_path, CLEAN_TREE)
    assert all(not offences for offences in check_tree(tmp_path).values())


@pytest.mark.parametrize(
    'rule, files, expected',
    [
        (
            'dnnlib/torch_utils import training/ or a script',
            {'torch_utils/misc.py': 'def f():\n    from training.a import g\n'},
            'torch_utils/misc.py:2 imports training.a',
        ),
        ('training/ imports a script', {'training/b.py': 'import tool\n'}, 'training/b.py:1 imports tool'),
        (
            'a script imports a script',
            {'bench/speed.py': 'import sys\nfrom tool import main\n'},
            'bench/speed.py:2 imports tool',
        ),
        (
            'click below the scripts',
            {'dnnlib/util.py': 'import click.testing\n'},
            'dnnlib/util.py:1 imports click.testing',
        ),
        (
            'click below the scripts',
            {'training/b.py': 'from training.click_types import T\n'},
            'training/b.py:1 imports training.click_types',
        ),
        (
            'import cycle in training/',
            {'training/b.py': 'def f():\n    from training import a\n'},
            'training/a.py:2 imports training.b and training/b.py:2 imports training.a',
        ),
    ],
)
def test_checker_catches_a_planted_violation(tmp_path, rule, files, expected):
    _write_tree(tmp_path, {**CLEAN_TREE, **files})
    report = check_tree(tmp_path)
    assert report[rule] == [expected]
    assert all(not offences for name, offences in report.items() if name != rule)
