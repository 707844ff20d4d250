"""Shared test setup: exact float32 math on every backend, fixtures, and the figures printed after the run."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import randomize_, stage_hub_checkpoint
from multihost import FAST_COMPILE_FLAGS

# GPUs and TPUs default to TF32/bf16 passes for float32 matmuls and convs; parity needs full float32.
jax.config.update('jax_default_matmul_precision', 'highest')

# Most of the suite's time is XLA compiling the same small models again, in other tests, in the
# other pytest-xdist worker and in the commands' child processes. One persistent compilation
# cache for the whole session (children find it through the environment) compiles each once.
CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
CACHE_SETTINGS = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.2', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def pytest_configure(config) -> None:
    # Set before any computation (XLA reads them when its CPU client starts); the workers inherit them and
    # the children take them too (multihost). A run that sets XLA_FLAGS itself keeps its own in the test
    # processes (`XLA_FLAGS= pytest` compiles them with XLA's defaults).
    os.environ.setdefault('XLA_FLAGS', FAST_COMPILE_FLAGS)
    if not hasattr(config, 'workerinput') and CACHE_ENV not in os.environ:  # the controller makes it, workers inherit
        config.compilation_cache = tempfile.mkdtemp(prefix='nfnet_jax_test_cache_')
        os.environ[CACHE_ENV] = config.compilation_cache
        os.environ.update(CACHE_SETTINGS)
    if CACHE_ENV in os.environ:
        jax.config.update('jax_compilation_cache_dir', os.environ[CACHE_ENV])
        jax.config.update(
            'jax_persistent_cache_min_compile_time_secs',
            float(os.environ.get('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')),
        )
        jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config) -> None:
    if getattr(config, 'compilation_cache', None):
        shutil.rmtree(config.compilation_cache, ignore_errors=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope='session')
def hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding timm's test_nfnet.r160_in1k with random weights (every tensor randomised)."""
    import timm

    cache = tmp_path_factory.mktemp('hub_cache')
    model = timm.create_model('test_nfnet')
    randomize_(model, seed=1)
    stage_hub_checkpoint(cache, model.state_dict(), 'timm/test_nfnet.r160_in1k')
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """Point huggingface_hub at the staged cache, offline: the real hub client runs, without a network.

    huggingface_hub reads its environment once at import, so its constants are patched too;
    the environment variables are set for subprocesses.
    """
    import huggingface_hub.constants

    monkeypatch.setenv('HF_HUB_CACHE', str(hub_cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    return hub_cache


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the worst parity error per family and the figures tests record as `('figure', (label, value))`,
    so every CI log shows the figures, not only a pass."""
    worst: dict[str, tuple[float, str]] = {}
    figures: list[tuple[str, float]] = []
    for report in terminalreporter.stats.get('passed', []):
        for name, value in report.user_properties:
            if name == 'parity':
                architecture, size, error = value
                family = architecture.rstrip('0123456789')  # dm_nfnet_f, nfnet_l, nf_regnet_b, ...
                if error >= worst.get(family, (-1.0, ''))[0]:
                    worst[family] = (error, f'{architecture} at {size[0]}x{size[1]}')
            elif name == 'figure':
                figures.append(value)
    if worst:
        terminalreporter.write_sep('-', 'worst fp32 parity error per family (max|ours - timm| / max|timm|)')
        for family, (error, where) in sorted(worst.items()):
            terminalreporter.write_line(f'{family:<14} {error:.2e}  ({where})')
    if figures:
        terminalreporter.write_sep('-', 'other measured figures (relative errors: max|ours - ref| / max|ref|)')
        for label, error in figures:
            terminalreporter.write_line(f'{error:.2e}  {label}')
