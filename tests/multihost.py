"""Running JAX in child processes for the parallel tests: a device count per process, loopback ports, deadlines.

JAX fixes its device count when it starts, and a multi-process run needs one process per
"host", so these tests run their JAX work in children. Every child is killed at the deadline,
so a hung collective fails a test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jaxlib.version

ROOT = Path(__file__).resolve().parent.parent
# XLA_FLAGS of the test suite (conftest) and of every child it starts: they compile many programs and
# run each briefly. LLVM at -O0 and XLA:CPU's classic emitters compile test_nfnet's train step in 3.4-4.4 s
# against 14-20 s with XLA's defaults (8-10 s with -O0 alone). Results stay within every test's tolerance
# (parity errors moved by ~10%); they are what is tested, not XLA's optimisations. jaxlib 0.11.1 removed
# the classic emitters, and XLA stops at a flag it does not know, so newer jaxlibs get -O0 alone.
CLASSIC_EMITTERS = jaxlib.version.__version_info__ < (0, 11, 1)
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0' + (
    ' --xla_cpu_use_fusion_emitters=false' if CLASSIC_EMITTERS else ''
)


@dataclass
class Finished:
    returncode: int | None  # None: still running at the deadline, then killed
    output: str  # stdout and stderr
    seconds: float


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def child_xla_flags(devices: int) -> str:
    """XLA_FLAGS of a child with `devices` host devices, compiling with FAST_COMPILE_FLAGS."""
    return f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}'


def child_env(devices: int) -> dict[str, str]:
    """The environment of a CPU-only JAX child with `devices` host devices."""
    return os.environ | {
        'XLA_FLAGS': child_xla_flags(devices),
        'JAX_PLATFORMS': 'cpu',
        'PYTHONPATH': str(ROOT),
    }


def run_processes(commands: list[list[str]], devices: int, timeout: float) -> list[Finished]:
    """Start every command at once (`python` is this interpreter) and wait for all, killing any past `timeout`."""
    start = time.monotonic()
    env = child_env(devices)
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as files:
        children = []
        for i, command in enumerate(commands):
            log = files.enter_context(open(Path(logs) / f'{i}.log', 'w+'))  # not a pipe: a chatty child never blocks
            argv = [sys.executable if command[0] == 'python' else command[0], *command[1:]]
            child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            children.append((child, log))
        finished = []
        for child, log in children:
            try:
                returncode = child.wait(timeout=max(timeout - (time.monotonic() - start), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                returncode = None
            log.seek(0)
            finished.append(Finished(returncode, log.read(), time.monotonic() - start))
    return finished
