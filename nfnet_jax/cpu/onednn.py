"""Convolutions on XLA:CPU in oneDNN, Intel's CPU kernels (those under PyTorch on CPU), when installed.

XLA:CPU runs convolutions in Eigen, which is well behind oneDNN's kernels, and it has no bfloat16
convolution at all. With the optional extra `pip install 'nfnet-jax[onednn]'` (Intel's oneDNN wheels:
the library and its headers), `load()` compiles a small XLA FFI library once (`kernels/onednn_conv.cc`,
with the C++ compiler `$CXX` or `c++`) into `$XDG_CACHE_HOME/nfnet_jax` (~/.cache/nfnet_jax) and
registers its calls; the CPU backend's convolution lowering (`cpu.convolution`) then emits them.

Programs with these calls are for the process that built them, so `jax.export` never gets them.
`NFNET_JAX_ONEDNN=0` turns them off; without the extra, or where the library cannot be built (no
compiler), `enabled()` logs why once and the CPU backend keeps XLA's convolutions.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import logging
import os
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax.files import atomic_write

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]  # a convolution's (top, bottom), (left, right)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / 'kernels' / 'onednn_conv.cc'
LIBRARY_DISTRIBUTION = 'onednn-cpu-gomp'  # libdnnl.so.3, built with GCC's OpenMP
HEADERS_DISTRIBUTION = 'onednn-devel-cpu-gomp'  # oneapi/dnnl/*.hpp for the same version
TARGETS = {  # the XLA FFI names and the library's symbols
    'forward': ('nfnet_onednn_conv_forward', 'NfnetOnednnConvForward'),
    'backward_data': ('nfnet_onednn_conv_backward_data', 'NfnetOnednnConvBackwardData'),
    'backward_weights': ('nfnet_onednn_conv_backward_weights', 'NfnetOnednnConvBackwardWeights'),
}
BUILD_TIMEOUT_S = 300
_registered: set[str] = set()  # the targets registered with XLA:CPU in this process


class OnednnUnavailable(RuntimeError):
    """Why the oneDNN convolutions cannot run in this process (the extra, a compiler, or the build)."""


class OnednnNotInstalled(OnednnUnavailable):
    """The optional extra is not installed: the usual case, logged at INFO level only."""


def enabled() -> bool:
    """Whether convolutions can run here: the extra is installed, the library built and loaded, and
    `NFNET_JAX_ONEDNN` is not '0'. The first call builds or loads the library."""
    if os.environ.get('NFNET_JAX_ONEDNN', '1') == '0':
        return False
    try:
        load()
    except OnednnUnavailable as unavailable:
        _log_once(str(unavailable), logging.INFO if isinstance(unavailable, OnednnNotInstalled) else logging.WARNING)
        return False
    return True


def cpu_convolutions() -> str:
    """Which kernels can run convolutions on CPU, for reports: 'oneDNN <version>' or 'XLA'."""
    return f'oneDNN {importlib.metadata.version(LIBRARY_DISTRIBUTION)}' if enabled() else 'XLA'


@cache
def _log_once(message: str, level: int) -> None:
    log.log(level, "XLA's convolutions on CPU, not oneDNN's: %s", message)


@cache
def load() -> Path:
    """Build the FFI library if this machine has none for this jaxlib and oneDNN, load it and register its
    targets with XLA:CPU; its path. A cached library that does not load (a damaged file) is built again.
    Raises OnednnUnavailable, saying what to install or what failed."""
    library_dir, include_dir, version = _onednn()
    compiler = shlex.split(os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++') or '')
    if not compiler:
        raise OnednnUnavailable('no C++ compiler to build the oneDNN kernels: install one (g++), or set CXX')
    library = library_path(version)
    command = [*compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}']
    command += [f'-I{include_dir}', str(SOURCE), f'-L{library_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{library_dir}']
    for attempt in ('cached', 'rebuilt'):
        if attempt == 'rebuilt' or not library.exists():
            log.info('building the oneDNN convolution kernels (once per jaxlib and oneDNN version) into %s', library)
            try:
                atomic_write(library, lambda tmp: _compile(command + ['-o', tmp]), force=True)
            except (OSError, subprocess.SubprocessError) as error:
                raise OnednnUnavailable(f'building the oneDNN kernels failed: {error}') from error
        try:
            handle = ctypes.cdll.LoadLibrary(str(library))
            break
        except OSError as error:
            if attempt == 'rebuilt':
                raise OnednnUnavailable(f'the oneDNN kernels ({library}) do not load: {error}') from error
            log.warning('the cached oneDNN kernels do not load (%s): building them again', error)
    for name, symbol in TARGETS.values():
        if name not in _registered:  # XLA takes one handler per name and process
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, symbol)), platform='cpu')
            _registered.add(name)
    return library


def library_path(onednn_version: str) -> Path:
    """Where the bridge library for this source, jax and oneDNN version is (or will be) built."""
    parts = [SOURCE.read_bytes(), jax.__version__.encode(), onednn_version.encode()]
    fingerprint = hashlib.sha256(b'\0'.join(parts)).hexdigest()[:16]
    cache_root = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'nfnet_jax'
    return cache_root / f'onednn_conv-{fingerprint}.so'


def _compile(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise subprocess.SubprocessError(f'{command[0]} exited with {done.returncode}: {done.stderr.strip()[-2000:]}')


def _onednn() -> tuple[Path, Path, str]:
    """The folders of libdnnl.so.3 and of oneDNN's headers, from the extra's wheels, and their version."""
    try:
        library = importlib.metadata.distribution(LIBRARY_DISTRIBUTION)
        headers = importlib.metadata.distribution(HEADERS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as missing:
        raise OnednnNotInstalled(f"{missing.name} is not installed: pip install 'nfnet-jax[onednn]'") from None
    shared = [f for f in library.files or () if f.name == 'libdnnl.so.3']
    header = [f for f in headers.files or () if f.as_posix().endswith('include/oneapi/dnnl/dnnl.hpp')]
    if not shared or not header:
        raise OnednnUnavailable(f'{LIBRARY_DISTRIBUTION} or {HEADERS_DISTRIBUTION} lacks libdnnl.so.3 or dnnl.hpp')
    include_dir = Path(headers.locate_file(header[0])).parents[2]
    return Path(library.locate_file(shared[0])).parent, include_dir, library.version


def conv2d(x: Array, kernel: Array, groups: int, strides: tuple[int, int], padding: Padding) -> Array:
    """The convolution NHWC x HWIO -> NHWC in oneDNN, float32 (bfloat16 operands' products summed in float32).

    `x` and `kernel` are both float32 or both bfloat16; `load()` must have succeeded.
    """
    (top, bottom), (left, right) = padding
    height = (x.shape[1] + top + bottom - kernel.shape[0]) // strides[0] + 1
    width = (x.shape[2] + left + right - kernel.shape[1]) // strides[1] + 1
    out = jax.ShapeDtypeStruct((x.shape[0], height, width, kernel.shape[3]), jnp.float32)
    return _call('forward', out, groups, strides, padding, x, kernel)


def conv2d_input_gradient(
    dy: Array, kernel: Array, x_shape: tuple[int, ...], groups: int, strides: tuple[int, int], padding: Padding
) -> Array:
    """The NHWC input gradient of `conv2d(x, kernel, groups, strides, padding)` given the output's gradient `dy`,
    in dy's dtype (summed in float32)."""
    return _call('backward_data', jax.ShapeDtypeStruct(x_shape, dy.dtype), groups, strides, padding, dy, kernel)


def conv2d_kernel_gradient(
    x: Array, dy: Array, kernel_shape: tuple[int, ...], groups: int, strides: tuple[int, int], padding: Padding
) -> Array:
    """The HWIO kernel gradient of `conv2d(x, kernel, groups, strides, padding)` given the output's gradient `dy`
    (in x's dtype), summed in float32."""
    return _call('backward_weights', jax.ShapeDtypeStruct(kernel_shape, jnp.float32), groups, strides, padding, x, dy)


def _call(
    target: str, out: jax.ShapeDtypeStruct, groups: int, strides: tuple[int, int], padding: Padding, *operands: Array
) -> Array:
    (top, bottom), (left, right) = padding
    geometry = dict(
        stride_h=strides[0],
        stride_w=strides[1],
        pad_top=top,
        pad_bottom=bottom,
        pad_left=left,
        pad_right=right,
        groups=groups,
    )
    call = jax.ffi.ffi_call(TARGETS[target][0], out, vmap_method='sequential')
    return call(*operands, **{key: np.int64(value) for key, value in geometry.items()})
