"""Building and loading oneDNN's bridge library (`nfnet_jax.cpu.onednn`): what a cache holds, what is
trusted, and what failures say.

The test extra installs oneDNN, so these tests build the kernels (once, shared: the other tests get the
same bytes from a stand-in compiler) and fail if they cannot. How the CPU backend uses them, and their
values: tests/test_cpu_backend.py.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import stat
import subprocess
from pathlib import Path

import pytest
from helpers import cpu_backend

from nfnet_jax.cpu import onednn

# A shared library whose constructor writes a file: loading it would run someone else's code.
PLANTED_SOURCE = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen("%s", "w");
    if (marker) fclose(marker);
}
"""


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """`onednn.load` and `enabled` as in a new process, with an empty cache under tmp_path/cache; reset afterwards.
    Records the paths dlopened in the test."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('NFNET_JAX_ONEDNN', raising=False)
    opened: list[Path] = []
    real_load_library = ctypes.cdll.LoadLibrary

    def load_library(name):
        opened.append(Path(name))
        return real_load_library(name)

    monkeypatch.setattr(ctypes.cdll, 'LoadLibrary', load_library)
    onednn.load.cache_clear()
    yield opened
    onednn.load.cache_clear()


@pytest.fixture(scope='module')
def built(tmp_path_factory) -> bytes:
    """The bridge library's bytes, built once by the real compiler under `umask 000` into a cache folder
    whose parents do not exist yet; checks what that build leaves."""
    cache = tmp_path_factory.mktemp('built') / 'missing' / 'cache'
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv('XDG_CACHE_HOME', str(cache))
        monkeypatch.delenv('NFNET_JAX_ONEDNN', raising=False)
        onednn.load.cache_clear()
        old_umask = os.umask(0)
        try:
            library = onednn.load()
        finally:
            os.umask(old_umask)
            onednn.load.cache_clear()
    assert library.parent == cache / 'nfnet_jax'
    for folder in (cache.parent, cache, library.parent):  # private, whatever the umask
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert library.stat().st_mode & 0o022 == 0
    data = library.read_bytes()
    assert data.startswith(b'\x7fELF')
    assert library.name == f'onednn_conv-{onednn._fingerprint(_version())}-{_sha256(data)}.so'
    return data


@pytest.fixture
def compiler(monkeypatch, built) -> list[list[str]]:
    """A stand-in for the C++ compiler that writes the shared build's bytes; the command lines it was given."""
    calls: list[list[str]] = []

    def compile_(command: list[str]) -> None:
        calls.append(command)
        Path(command[-1]).write_bytes(built)

    monkeypatch.setattr(onednn, '_compile', compile_)
    return calls


@pytest.fixture(scope='module')
def planted(tmp_path_factory) -> tuple[bytes, Path]:
    """A shared library whose constructor writes a marker file, and that marker's path (not there)."""
    folder = tmp_path_factory.mktemp('planted')
    marker = folder / 'constructor_ran'
    (folder / 'planted.c').write_text(PLANTED_SOURCE % marker)
    subprocess.run(['cc', '-shared', '-fPIC', '-o', folder / 'planted.so', folder / 'planted.c'], check=True)
    return (folder / 'planted.so').read_bytes(), marker


def _version() -> str:
    return importlib.metadata.version(onednn.LIBRARY_DISTRIBUTION)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _plant(data: bytes, digest: str | None = None) -> Path:
    """`data` in the cache under the name a build with SHA-256 `digest` (by default data's own) gets."""
    folder = onednn.cache_folder()
    library = folder / f'onednn_conv-{onednn._fingerprint(_version())}-{digest or _sha256(data)}.so'
    library.write_bytes(data)
    return library


def test_without_the_extra_xla_convolutions_run_and_the_error_says_what_to_install(fresh_load, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, 'distribution', not_installed)
    with pytest.raises(onednn.OnednnUnavailable, match=r"pip install 'nfnet-jax\[onednn\]'"):
        onednn.load()
    assert not onednn.enabled()
    with cpu_backend() as kernels:  # the backend goes on without oneDNN's kernels
        assert not kernels.onednn


def test_a_build_loads_and_a_second_process_loads_the_cached_library(fresh_load, built, compiler):
    library = onednn.load()
    assert library.read_bytes() == built and fresh_load == [library] and len(compiler) == 1
    onednn.load.cache_clear()  # a new process
    assert onednn.load() == library and onednn.enabled() and len(compiler) == 1  # not built again


@pytest.mark.parametrize('mode', [0o777, 0o770, 0o702])
def test_a_library_in_a_cache_folder_others_can_write_is_never_loaded(fresh_load, planted, mode):
    data, marker = planted
    library = _plant(data)  # named with its own digest: only the folder says it is not ours
    library.parent.chmod(mode)
    with pytest.raises(onednn.OnednnUnavailable, match=r'is not safe for compiled code \(group or others can write'):
        onednn.load()
    assert not onednn.enabled()
    assert not marker.exists() and fresh_load == []


def test_a_library_in_another_users_cache_folder_is_never_loaded(fresh_load, planted, monkeypatch):
    data, marker = planted
    other_user = _plant(data).parent.stat().st_uid + 1
    monkeypatch.setattr(os, 'getuid', lambda: other_user)  # the folder (and library) are not this user's
    with pytest.raises(onednn.OnednnUnavailable, match=r'is not safe for compiled code \(it belongs to uid'):
        onednn.load()
    assert not onednn.enabled()
    assert not marker.exists() and fresh_load == []


@pytest.mark.parametrize('mode', [0o777, 0o775])
def test_a_cache_folder_inside_a_folder_others_can_write_is_not_trusted(fresh_load, tmp_path, mode):
    onednn.cache_folder()
    (tmp_path / 'cache').chmod(mode)  # anyone could rename nfnet_jax away and put a folder of theirs there
    unsafe = r'not safe for compiled code \(group or others can write .*/cache '
    with pytest.raises(onednn.OnednnUnavailable, match=unsafe):
        onednn.load()
    assert fresh_load == []
    (tmp_path / 'cache').chmod(mode | stat.S_ISVTX)  # sticky, as /tmp: only the owner renames what it holds
    assert onednn.cache_folder() == tmp_path / 'cache' / 'nfnet_jax'


@pytest.mark.parametrize('damage', ['not built here', 'others can write it', 'truncated', 'garbage'])
def test_a_library_that_is_not_what_was_built_is_never_loaded_and_is_built_again(
    fresh_load, built, planted, compiler, damage
):
    planted_data, marker = planted
    if damage == 'not built here':  # a valid library under a build's name, its bytes not those the name records
        library = _plant(planted_data, digest=_sha256(built))
    elif damage == 'others can write it':
        library = _plant(planted_data)
        library.chmod(0o666)
    elif damage == 'truncated':  # loading it would die of SIGBUS
        library = _plant(built[: len(built) // 2], digest=_sha256(built))
    else:
        library = _plant(os.urandom(4096), digest=_sha256(built))
    rebuilt = onednn.load()
    assert fresh_load == [rebuilt] and len(compiler) == 1
    assert (
        rebuilt.read_bytes() == built
        and rebuilt.name == f'onednn_conv-{onednn._fingerprint(_version())}-{_sha256(built)}.so'
    )
    assert not marker.exists()
    assert not library.exists() or library.read_bytes() == built


def test_a_cxx_that_is_not_a_command_line_says_so(fresh_load, monkeypatch):
    monkeypatch.setenv('CXX', 'g++ "-O2')
    with pytest.raises(onednn.OnednnUnavailable, match='CXX=.* is not a command line .*fix its quoting, or unset it'):
        onednn.load()
    assert not onednn.enabled()  # as without a compiler: XLA's convolutions, with a warning


def _script(path: Path, body: str) -> str:
    path.write_text(f'#!/bin/sh\necho run >> {path}.calls\n{body}\n')
    path.chmod(0o755)
    return str(path)


def test_a_failed_build_leaves_no_library_says_why_and_is_not_tried_again_until_the_compiler_changes(
    fresh_load, monkeypatch, tmp_path
):
    failing = _script(tmp_path / 'failing_cxx', 'echo "cannot compile" >&2; exit 1')
    monkeypatch.setenv('CXX', failing)
    with pytest.raises(onednn.OnednnUnavailable, match='building the oneDNN kernels failed: .* exited with 1: cannot'):
        onednn.load()
    folder = onednn.cache_folder()
    assert list(folder.glob('*.so')) == [] and list(folder.glob('.*')) == []  # no library, no leftovers
    onednn.load.cache_clear()  # another process: told the same, without compiling
    with pytest.raises(onednn.OnednnUnavailable, match='exited with 1: cannot compile \\(an earlier try; delete .*'):
        onednn.load()
    assert not onednn.enabled()
    assert Path(failing + '.calls').read_text().count('run') == 1
    monkeypatch.setenv('CXX', f'{failing} -g')  # another command line: tried again
    onednn.load.cache_clear()
    with pytest.raises(onednn.OnednnUnavailable, match='exited with 1: cannot compile$'):
        onednn.load()
    assert Path(failing + '.calls').read_text().count('run') == 2


def test_a_hanging_compiler_is_stopped_after_the_timeout_and_remembered(fresh_load, monkeypatch, tmp_path):
    hanging = _script(tmp_path / 'hanging_cxx', 'sleep 60 & wait')  # a compiler's child holds on too
    monkeypatch.setenv('CXX', hanging)
    monkeypatch.setattr(onednn, 'BUILD_TIMEOUT_S', 1)
    with pytest.raises(onednn.OnednnUnavailable, match=r'hanging_cxx did not finish in 1 s$'):
        onednn.load()
    onednn.load.cache_clear()
    with pytest.raises(onednn.OnednnUnavailable, match='did not finish in 1 s \\(an earlier try'):
        onednn.load()
    assert Path(hanging + '.calls').read_text().count('run') == 1


@pytest.mark.parametrize('value', ['0', 'false', 'off', 'no', 'False', 'OFF', ' No '])
def test_nfnet_jax_onednn_off_values_turn_the_kernels_off(monkeypatch, value):
    monkeypatch.setenv('NFNET_JAX_ONEDNN', value)
    monkeypatch.setattr(onednn, 'load', lambda: pytest.fail('loaded though switched off'))
    assert not onednn.enabled()


@pytest.mark.parametrize('value', ['1', 'true', 'on', 'yes', 'TRUE', ''])
def test_nfnet_jax_onednn_on_values_and_unset_keep_them_on(monkeypatch, value):
    monkeypatch.setenv('NFNET_JAX_ONEDNN', value)
    monkeypatch.setattr(onednn, 'load', lambda: Path('library.so'))
    assert onednn.enabled()


def test_nfnet_jax_onednn_other_values_say_which_to_use(monkeypatch):
    monkeypatch.setenv('NFNET_JAX_ONEDNN', 'maybe')
    with pytest.raises(ValueError, match=r"NFNET_JAX_ONEDNN='maybe' is neither on nor off: set it to one of 1, true"):
        onednn.enabled()
