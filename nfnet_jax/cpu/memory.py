"""Keep XLA:CPU's large buffers in the process between calls, so that calls stop page-faulting them in.

XLA:CPU mallocs a program's temporary buffer on every call, and glibc maps a buffer that large
afresh each time, so every call faults it in again while the kernel zeroes its pages.
`keep_cpu_memory()` stops that with two settings that need each other: glibc serves large buffers
from its heap and never trims it (`mallopt`), and JAX runs CPU computations on the calling thread
(`jax_cpu_enable_async_dispatch` off), whose heap can hold the buffer (a worker thread's arena
cannot: glibc maps a larger buffer afresh whatever its settings).

The costs: the process keeps its peak memory until it exits, and Python waits for each CPU
computation instead of running ahead of it. Both hold for the whole process, so the library makes
them only when asked (`nfnet_jax.cpu.enable(keep_memory=True)`), before the process's first JAX
computation (JAX makes its CPU client once, with the dispatch setting of that moment).
"""

from __future__ import annotations

import ctypes
import sys

import jax
from jax._src import xla_bridge  # the only way to ask whether JAX has made its clients yet

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # the largest trim threshold mallopt takes (an int)


def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (Linux), else None: only glibc has these settings."""
    if not sys.platform.startswith('linux'):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, 'gnu_get_libc_version') else None


def keep_cpu_memory() -> bool:
    """Keep large CPU buffers on glibc's heap and run CPU computations on the calling thread.

    Returns True when the settings were made, False where the C library is not glibc (nothing
    is changed there). Affects the whole process; see the module's docstring for the costs.
    Raises RuntimeError, changing nothing, once JAX has run a computation.
    """
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "keep_cpu_memory() must run before the process's first JAX computation: JAX's CPU client "
            'already exists and keeps the dispatch it was made with. Call it at the start of the program.'
        )
    libc = glibc()
    if libc is None or libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return False
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    return True
