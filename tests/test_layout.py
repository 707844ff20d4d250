"""The layout's promises: dependencies go one way, inference loads no training code, small utilities behave."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import nfnet_jax
from nfnet_jax import progress
from nfnet_jax.weights import file as weights_file

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of its code (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def module_name(path: Path) -> str:
    """The dotted name of a file under ROOT: nfnet_jax/data/__init__.py is nfnet_jax.data."""
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


PROJECT = {module_name(path): path for top in ('nfnet_jax', 'convert') for path in (ROOT / top).rglob('*.py')}


def project_imports(name: str, node: ast.AST | None = None) -> set[str]:
    """The project modules that module `name` (or `node`, a part of it) imports, at any depth.

    `from a.b import c` is an import of the module a.b.c where there is one, else of a.b; relative
    imports are resolved. A package a submodule sits in is not counted: Python loads it first anyway.
    """
    path = PROJECT[name]
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for child in ast.walk(node or ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(child, ast.Import):
            found |= {alias.name for alias in child.names}
        elif isinstance(child, ast.ImportFrom):
            base = package.rsplit('.', child.level - 1)[0] if child.level else ''
            base = '.'.join(part for part in (base, child.module) if part)
            found |= {f'{base}.{alias.name}' if f'{base}.{alias.name}' in PROJECT else base for alias in child.names}
    return {module for module in found if module in PROJECT and module != name}


def test_dependencies_go_one_way():
    """No import cycle among nfnet_jax's and convert's modules, counting imports in functions and under
    TYPE_CHECKING too: a cycle is not fixed by hiding one of its imports."""
    graph = {name: project_imports(name) for name in PROJECT}
    done: set[str] = set()

    def cycle_from(name: str, path: list[str]) -> list[str] | None:
        for module in sorted(graph[name]):
            if module in path:
                return path[path.index(module) :] + [module]
            if module not in done and (found := cycle_from(module, [*path, module])):
                return found
        done.add(name)
        return None

    assert [cycle for name in sorted(graph) if (cycle := cycle_from(name, [name]))] == []


# Deliberate lazy imports, each with its reason: (module, imported module) -> why.
LAZY_IMPORTS = {
    ('nfnet_jax.cpu', 'nfnet_jax.cpu.convolution'): 'the CPU backend loads only when a program enables it',
    ('nfnet_jax.cpu', 'nfnet_jax.cpu.memory'): 'the CPU backend loads only when a program enables it',
    ('nfnet_jax.train', 'nfnet_jax.train.loop'): 'train_and_evaluate needs grain (an extra) and parallel.train, '
    'which imports nfnet_jax.train',
}

COMMANDS = {'nfnet_jax.predict', 'nfnet_jax.batch_predict', 'nfnet_jax.export', 'nfnet_jax.finetune'}
# Who may import the CPU backend's switch (nfnet_jax.cpu): the jit sites that take its options, and the commands' setup.
CPU_BACKEND_USERS = {
    'nfnet_jax',
    'nfnet_jax.inference',
    'nfnet_jax.train.step',
    'nfnet_jax.parallel.train',
    'nfnet_jax.cli',
}


def test_the_import_direction_by_role():
    """commands -> library -> model: the model imports nothing else of the project; nothing imports a command, and
    only the commands use their shared plumbing (nfnet_jax.cli);
    the CPU backend is imported only where programs are jitted or the commands set up, its kernels only by itself."""
    graph = {name: project_imports(name) for name in PROJECT}
    wrong = set()
    for name, imports in graph.items():
        for module in imports:
            if name.startswith('nfnet_jax.models') and not module.startswith('nfnet_jax.models'):
                wrong.add((name, module, 'the model imports only the model'))
            if module in COMMANDS:
                wrong.add((name, module, 'nothing imports a command'))
            if module == 'nfnet_jax.cli' and name not in COMMANDS and not name.startswith('convert'):
                wrong.add((name, module, "the commands' plumbing is theirs: the library does not use it"))
            if module == 'nfnet_jax.cpu' and name not in CPU_BACKEND_USERS and not name.startswith('nfnet_jax.cpu'):
                wrong.add((name, module, 'the CPU backend is switched on by the jit sites and the commands only'))
            if module.startswith('nfnet_jax.cpu.') and not name.startswith('nfnet_jax.cpu'):
                wrong.add((name, module, "the backend's kernels are its own business"))
    assert sorted(wrong) == []


def test_the_architecture_page_lists_every_module():
    listed = set(re.findall(r'`((?:nfnet_jax|convert)/[\w/]+\.py)`', (ROOT / 'docs' / 'architecture.md').read_text()))
    modules = {str(path.relative_to(ROOT)) for path in PROJECT.values()}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []


def test_no_function_imports_the_project():
    """Project modules are imported at the top of a module, where the dependency shows, not in a function."""
    in_functions = {
        (name, module)
        for name, path in PROJECT.items()
        for function in ast.walk(ast.parse(path.read_text(encoding='utf-8')))
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for module in project_imports(name, function)
    }
    assert in_functions == set(LAZY_IMPORTS)


def test_the_library_never_imports_the_command_package():
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path) if name.split('.')[0] == 'convert')
        for path in (ROOT / 'nfnet_jax').rglob('*.py')
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_only_parallel_train_imports_training_outside_nfnet_jax_train():
    """Inference and sharding code stays free of optax/orbax users; the commands other than finetune likewise."""
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / 'nfnet_jax').rglob('*.py')
        if 'train' not in path.relative_to(ROOT / 'nfnet_jax').parts[:1]
        and any(
            name.startswith('nfnet_jax.train') or name in ('optax', 'orbax.checkpoint')
            for name in imported_modules(path)
        )
    )
    assert importers == ['nfnet_jax/finetune.py', 'nfnet_jax/parallel/train.py']  # the training command


def test_inference_and_its_commands_load_no_training_code_and_nothing_loads_the_cpu_backend():
    """nfnet_jax.train stays unloaded, and orbax too until the commands' file reader (grain, which imports
    orbax itself); no module of the CPU backend is loaded by any import. optax is loaded by flax.nnx itself
    (nnx.Optimizer), not by us."""
    code = (
        'import sys, nfnet_jax, nfnet_jax.inference, nfnet_jax.parallel\n'
        "training = ('orbax', 'nfnet_jax.train', 'nfnet_jax.parallel.train')\n"
        'loaded = sorted(m for m in sys.modules if m.startswith(training))\n'
        'assert not loaded, loaded\n'
        'import nfnet_jax.predict, nfnet_jax.batch_predict\n'
        "training = ('nfnet_jax.train', 'nfnet_jax.parallel.train')\n"
        'loaded = sorted(m for m in sys.modules if m.startswith(training))\n'
        'assert not loaded, loaded\n'
        'import nfnet_jax.train, nfnet_jax.parallel.train, nfnet_jax.linen, nfnet_jax.finetune, nfnet_jax.export\n'
        "backend = sorted(m for m in sys.modules if m.startswith('nfnet_jax.cpu.'))\n"
        'assert not backend, backend  # the CPU backend loads only when enabled\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, timeout=300)
    flax_alone = subprocess.run(
        [sys.executable, '-c', "import sys, flax.nnx; print('optax' in sys.modules)"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert flax_alone.stdout.strip() == 'True'


def test_reading_metadata_reads_no_tensor(tmp_path, monkeypatch):
    path = tmp_path / 'w.safetensors'
    nfnet_jax.save_checkpoint(
        path, {'a': np.ones((4, 4), np.float32)}, architecture='test_nfnet', num_classes=1, global_pool='avg'
    )
    read = []
    real_safe_open = weights_file.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def __enter__(self):
            inner = self.handle.__enter__()
            outer = self

            class Proxy:
                def metadata(self):
                    return inner.metadata()

                def keys(self):
                    return inner.keys()

                def get_tensor(self, key):
                    read.append(key)
                    return inner.get_tensor(key)

            outer.proxy = Proxy()
            return outer.proxy

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(weights_file, 'safe_open', CountingHandle)
    assert nfnet_jax.weights.read_checkpoint_metadata(path)['architecture'] == 'test_nfnet'
    assert read == []
    assert nfnet_jax.read_checkpoint(path)[0].keys() == {'a'} and read == ['a']


def test_progress_redraws_only_on_a_terminal(monkeypatch):
    """In a log file each shown update is its own line, at most one per interval, and a message written
    between updates does not redraw the bar: no carriage returns, no repeated lines."""
    log = io.StringIO()
    monkeypatch.setattr(progress, 'LOG_INTERVAL_S', 3600.0)
    with progress.progress(range(1000), file=log, desc='work') as bar:
        for i in bar:
            if i == 500:
                bar.write('a message', file=log)
    lines = log.getvalue().splitlines()
    assert '\r' not in log.getvalue()
    assert [line[:10] for line in lines] == ['work:   0%', 'a message', 'work: 100%']
