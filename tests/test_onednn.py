"""Building and loading oneDNN's bridge library (`nfnet_jax.cpu.onednn`): what a cache holds, and what failures say.

The test extra installs oneDNN, so these tests build the kernels (once per cache folder) and fail if
they cannot. How the CPU backend uses them, and their values: tests/test_cpu_backend.py.
"""

from __future__ import annotations

import importlib.metadata

import pytest
from helpers import cpu_backend

from nfnet_jax.cpu import onednn


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """`onednn.load` and `enabled` as in a new process, building into an empty cache folder; reset afterwards."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    onednn.load.cache_clear()
    yield tmp_path
    onednn.load.cache_clear()


def test_without_the_extra_xla_convolutions_run_and_the_error_says_what_to_install(fresh_load, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, 'distribution', not_installed)
    with pytest.raises(onednn.OnednnUnavailable, match=r"pip install 'nfnet-jax\[onednn\]'"):
        onednn.load()
    assert not onednn.enabled()
    with cpu_backend() as kernels:  # the backend goes on without oneDNN's kernels
        assert not kernels.onednn


def test_a_failed_build_leaves_no_library_and_says_why(fresh_load, monkeypatch):
    monkeypatch.setenv('CXX', 'false')  # a compiler that always fails
    with pytest.raises(onednn.OnednnUnavailable, match='building the oneDNN kernels failed: false exited with 1'):
        onednn.load()
    assert not onednn.enabled()
    assert list((fresh_load / 'nfnet_jax').iterdir()) == []  # no half-written library under its name


def test_a_damaged_cached_library_is_built_again(fresh_load):
    library = onednn.library_path(importlib.metadata.version(onednn.LIBRARY_DISTRIBUTION))
    assert library.parent == fresh_load / 'nfnet_jax'
    library.parent.mkdir()
    library.write_bytes(b'not a shared library')
    assert onednn.load() == library and onednn.enabled()
    assert library.read_bytes().startswith(b'\x7fELF')
