"""The CPU backend, opt-in: faster convolutions on XLA:CPU, compiler options, chunked batches, memory settings.

The model is timm's formulas over `jax.lax.conv_general_dilated`, and traces the same program under
any jit. On a machine without an accelerator, one call makes it fast:

    nfnet_jax.cpu.enable()          # the commands call it for you when they run on CPU

From then on, every program this process lowers for CPU (a plain `jax.jit(model)` as much as the
inference functions and the train steps) runs its convolutions through `cpu.convolution`'s
lowering: grouped ones a group at a time, 1x1 ones as matmuls, bfloat16 ones as matmuls with float32
sums, and, with the optional `onednn` extra, in oneDNN's kernels. The library's own jits also take
XLA:CPU options that suit NFNets (`compiler_options`) and run large inference batches in chunks
(`in_chunks`). Other backends are left alone, and so is `jax.export` (its programs keep XLA's
lowering, so they run anywhere). Without `enable()` nothing here is loaded.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from functools import wraps
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import xla_bridge  # the only way to ask whether JAX has made its clients yet

CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
CPU_TRAINING_OPTIONS = {**CPU_OPTIONS, 'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
CPU_CHUNK = 8  # the fewest images per chunk of a CPU inference batch (`in_chunks`)
CPU_CHUNK_PIXELS = CPU_CHUNK * 256 * 256  # the pixels a chunk holds at least, in images of 256 x 256 or smaller

_enabled = False


def enable(*, onednn: bool = True, keep_memory: bool = False) -> bool:
    """Turn the CPU backend on for this process, if its default backend is the CPU; whether it is on.

    Call it before the first compilation (programs compiled before keep their lowering); it starts
    no JAX client, so it may come before `jax.distributed.initialize`.
    `onednn`: run convolutions in oneDNN where the optional extra is installed (its bridge
    library is built here, once per machine, not while a program is traced). `keep_memory`:
    also `memory.keep_cpu_memory()`, process-wide allocator settings that must come before the
    process's first JAX computation (RuntimeError after it).
    """
    global _enabled
    if not default_backend_is_cpu():
        return False
    from nfnet_jax.cpu import convolution, memory

    if keep_memory:
        memory.keep_cpu_memory()
    convolution.register(use_onednn=onednn)
    _enabled = True
    return True


def default_backend_is_cpu() -> bool:
    """Whether JAX's default backend is (or will be) the CPU, found without starting JAX's clients.

    Before they exist: the first of `jax_platforms` where it is set, else whether no accelerator
    plugin (a `jax_plugins` entry point, jax_cuda*/jax_rocm*, libtpu) is installed.
    """
    if xla_bridge.backends_are_initialized():
        return jax.default_backend() == 'cpu'
    if jax.config.jax_platforms:
        return jax.config.jax_platforms.split(',')[0].strip() == 'cpu'
    plugins = {entry.name for entry in importlib.metadata.entry_points(group='jax_plugins')}
    accelerators = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin', 'libtpu')
    return not plugins and not any(importlib.util.find_spec(name) for name in accelerators)


def enabled() -> bool:
    """Whether `enable()` turned the backend on."""
    return _enabled


def disable() -> None:
    """Turn the CPU backend off: programs lowered from now on are as without `enable()` (the memory settings stay)."""
    global _enabled
    from nfnet_jax.cpu import convolution

    convolution.unregister()
    _enabled = False


def compiler_options(training: bool = False) -> dict[str, str] | None:
    """The XLA:CPU options for `jax.jit(..., compiler_options=)` of a top-level jit; None (XLA's defaults) when off.

    Convolutions stay XLA's Eigen ones (the list of op kinds given to YNNPACK leaves them out), and a
    training step takes the memory-optimised scheduler: both run NFNets faster on CPU.
    """
    if not _enabled:
        return None
    return dict(CPU_TRAINING_OPTIONS if training else CPU_OPTIONS)


def images_per_chunk(height: int, width: int) -> int:
    """CPU_CHUNK images, doubled until the chunk holds CPU_CHUNK_PIXELS pixels (small images need more per chunk)."""
    images = CPU_CHUNK
    while images * height * width < CPU_CHUNK_PIXELS:
        images *= 2
    return images


def in_chunks(fn: Callable[[Any, jax.Array], Any]) -> Callable[[Any, jax.Array], Any]:
    """`fn(state, images)` running a batch of two chunks or more a chunk at a time; `fn` itself when the backend is off.

    XLA:CPU's kernels stop getting faster once a chunk holds `images_per_chunk` images, while memory
    grows with the whole batch; the chunks run one after another (a `lax.scan`), and a batch the
    chunk does not divide runs its last images as one more call. `fn` must compute every image on
    its own, as every NFNet in eval mode does. A symbolic batch or image size (`jax.export`) runs whole.
    """

    if not _enabled:
        return fn

    @wraps(fn)  # the jit keeps fn's name (in profiles and XLA dumps)
    def chunked(state: Any, images: jax.Array) -> Any:
        n, height, width = images.shape[:3]
        if not all(isinstance(d, int) for d in (n, height, width)):
            return fn(state, images)
        chunk = images_per_chunk(height, width)
        if n < 2 * chunk:
            return fn(state, images)
        whole = n - n % chunk
        chunks = images[:whole].reshape(whole // chunk, chunk, *images.shape[1:])
        _, outputs = jax.lax.scan(lambda _, chunk_images: (None, fn(state, chunk_images)), None, chunks)
        outputs = jax.tree.map(lambda y: y.reshape(whole, *y.shape[2:]), outputs)
        if whole == n:
            return outputs
        return jax.tree.map(lambda head, tail: jnp.concatenate([head, tail]), outputs, fn(state, images[whole:]))

    return chunked
