"""The machine a benchmark ran on, as its reports name it. Only the standard library (see `markdown`)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('Intel(R) Xeon(R) ...'); elsewhere what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def command_output(argv: Sequence[str]) -> str | None:
    """What a command prints, stripped; None where it is missing, fails or hangs."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def nvidia_gpus() -> list[dict[str, str]]:
    """The GPUs nvidia-smi lists (name, driver, memory, compute capability); none without nvidia-smi."""
    fields = ('name', 'driver_version', 'memory.total', 'compute_cap')
    out = command_output(['nvidia-smi', f'--query-gpu={",".join(fields)}', '--format=csv,noheader'])
    if not out:
        return []
    return [dict(zip(fields, (v.strip() for v in line.split(',')), strict=False)) for line in out.splitlines()]


def host_machine(gpus: list[dict[str, str]]) -> dict[str, Any]:
    """The host as a report records it, seen without JAX or torch: CPU, memory, OS, Python, `gpus`, the CUDA
    version the driver supports, and the commit of this checkout (marked when it has uncommitted changes)."""
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemTotal:'):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    cuda_driver_api = None
    header = command_output(['nvidia-smi']) if gpus else None
    if header and 'CUDA Version:' in header:
        cuda_driver_api = header.split('CUDA Version:')[1].split()[0]
    commit = command_output(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])
    if commit and command_output(['git', '-C', str(REPO), 'status', '--porcelain', '--untracked-files=no']):
        commit += ' (with uncommitted changes)'
    return dict(
        cpu=cpu_model(),
        cpu_cores=os.cpu_count(),
        memory_gib=memory_gib,
        os=platform.platform(),
        python=sys.version.split()[0],
        gpus=gpus,
        cuda_driver_supports=cuda_driver_api,
        nfnet_jax_commit=commit,
    )
