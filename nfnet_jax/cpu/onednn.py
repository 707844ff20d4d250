"""Convolutions on XLA:CPU in oneDNN, Intel's CPU kernels (those under PyTorch on CPU), when installed.

XLA:CPU runs convolutions in Eigen, which is well behind oneDNN's kernels, and it has no bfloat16
convolution at all. With the optional extra `pip install 'nfnet-jax[onednn]'` (Intel's oneDNN wheels:
the library and its headers), `load()` compiles a small XLA FFI library once (`kernels/onednn_conv.cc`,
with the C++ compiler `$CXX` or `c++`) into `$XDG_CACHE_HOME/nfnet_jax` (~/.cache/nfnet_jax) and
registers its calls; the CPU backend's convolution lowering (`cpu.convolution`) then emits them.

Programs with these calls are for the process that built them, so `jax.export` never gets them.
`NFNET_JAX_ONEDNN=0` (or false, off, no) turns them off; without the extra, or where the library cannot be
built (no compiler, a failed build) or trusted (a cache folder another user owns or can write),
`enabled()` logs why once and the CPU backend keeps XLA's convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import logging
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
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
SWITCH_ON = ('1', 'true', 'on', 'yes')  # NFNET_JAX_ONEDNN's values
SWITCH_OFF = ('0', 'false', 'off', 'no')
_registered: set[str] = set()  # the targets registered with XLA:CPU in this process


class OnednnUnavailable(RuntimeError):
    """Why the oneDNN convolutions cannot run in this process (the extra, a compiler, or the build)."""


class OnednnNotInstalled(OnednnUnavailable):
    """The optional extra is not installed: the usual case, logged at INFO level only."""


def enabled() -> bool:
    """Whether convolutions can run here: the extra is installed, the library built and loaded, and
    `NFNET_JAX_ONEDNN` does not turn them off. The first call builds or loads the library."""
    if not _switched_on():
        return False
    try:
        load()
    except OnednnUnavailable as unavailable:
        _log_once(str(unavailable), logging.INFO if isinstance(unavailable, OnednnNotInstalled) else logging.WARNING)
        return False
    return True


def _switched_on() -> bool:
    """`NFNET_JAX_ONEDNN`: unset or empty is on; raises ValueError for a value that is neither on nor off."""
    value = os.environ.get('NFNET_JAX_ONEDNN', '').strip().lower()
    if value in SWITCH_OFF:
        return False
    if value and value not in SWITCH_ON:
        raise ValueError(
            f'NFNET_JAX_ONEDNN={value!r} is neither on nor off: set it to one of {", ".join(SWITCH_ON)} '
            f'or {", ".join(SWITCH_OFF)}, or unset it'
        )
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
    targets with XLA:CPU; its path. Raises OnednnUnavailable, saying what to install or what failed.

    Only a cache folder of this user's that no one else can write holds the library, and only a library
    whose bytes match the SHA-256 in its name (taken when it was built) is loaded: a damaged one is
    built again. A failed build is remembered (a `.failed` file with the error) until its inputs change.
    """
    library_dir, include_dir, version = _onednn()
    command = [*_compiler(), '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}']
    command += [f'-I{include_dir}', str(SOURCE), f'-L{library_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{library_dir}']
    folder = cache_folder()
    fingerprint = _fingerprint(version)
    try:
        library = _cached_library(folder, fingerprint)
    except OSError as error:
        raise OnednnUnavailable(f'cannot read the cache folder {folder}: {error}') from error
    library = library or _build(command, folder, fingerprint)
    try:
        handle = ctypes.cdll.LoadLibrary(str(library))
        capsules = {name: jax.ffi.pycapsule(getattr(handle, symbol)) for name, symbol in TARGETS.values()}
    except (OSError, AttributeError) as error:
        raise OnednnUnavailable(f'the oneDNN kernels ({library}) do not load: {error}') from error
    for name, capsule in capsules.items():
        if name not in _registered:  # XLA takes one handler per name and process
            jax.ffi.register_ffi_target(name, capsule, platform='cpu')
            _registered.add(name)
    return library


def cache_folder() -> Path:
    """`$XDG_CACHE_HOME/nfnet_jax` (~/.cache/nfnet_jax), made private (0o700, whatever the umask) if missing;
    raises OnednnUnavailable where it, or a folder above it, is another user's or others can write it: code
    there could be anyone's."""
    folder = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'nfnet_jax'
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        for path in reversed(missing):
            path.mkdir(mode=0o700, exist_ok=True)
        problem = _distrust(folder) or _unsafe_parent(folder)
    except OSError as error:
        raise OnednnUnavailable(f'cannot make the cache folder {folder}: {error}') from error
    if problem:
        raise OnednnUnavailable(
            f'the cache folder {folder} is not safe for compiled code ({problem}): make the folder named yours '
            'and `chmod go-w` it, or set XDG_CACHE_HOME to a folder of your own'
        )
    return folder


def _distrust(path: Path) -> str | None:
    """Why `path` may hold someone else's code: not this user's, writable by others, or a symbolic link; None
    when it is this user's own."""
    status = path.lstat() if path.is_file() else path.stat()
    if stat.S_ISLNK(status.st_mode):
        return 'it is a symbolic link'
    if status.st_uid != os.getuid():
        return f'it belongs to uid {status.st_uid}, not to you (uid {os.getuid()})'
    if status.st_mode & 0o022:
        return f'group or others can write it (mode {stat.S_IMODE(status.st_mode):o})'
    return None


def _unsafe_parent(folder: Path) -> str | None:
    """Why a folder above `folder` would let someone else swap it for theirs: not this user's or root's, or
    writable by group or others without the sticky bit (which stops them renaming what is not theirs,
    as in /tmp); None when every one is safe."""
    for parent in Path(os.path.realpath(folder)).parents:
        status = parent.stat()
        if status.st_uid not in (0, os.getuid()):
            return f'{parent} belongs to uid {status.st_uid}'
        if status.st_mode & 0o022 and not status.st_mode & stat.S_ISVTX:
            return f'group or others can write {parent} (mode {stat.S_IMODE(status.st_mode):o})'
    return None


def _compiler() -> list[str]:
    """The C++ compiler's command line: `$CXX`, or c++ / g++ on the PATH."""
    line = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++') or ''
    try:
        compiler = shlex.split(line)
    except ValueError as error:
        raise OnednnUnavailable(f'CXX={line!r} is not a command line ({error}): fix its quoting, or unset it') from None
    if not compiler:
        raise OnednnUnavailable('no C++ compiler to build the oneDNN kernels: install one (g++), or set CXX')
    return compiler


def _fingerprint(onednn_version: str) -> str:
    """What a library is built from: the bridge's source, jax's and oneDNN's versions."""
    parts = [SOURCE.read_bytes(), jax.__version__.encode(), onednn_version.encode()]
    return hashlib.sha256(b'\0'.join(parts)).hexdigest()[:16]


def _sha256(path: Path) -> str:
    with path.open('rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def _cached_library(folder: Path, fingerprint: str) -> Path | None:
    """A library built here for these inputs whose bytes match the digest in its name; others (damaged,
    truncated, or not this user's own) are removed, never loaded."""
    for library in sorted(folder.glob(f'onednn_conv-{fingerprint}-*.so')):
        problem = _distrust(library)
        if problem is None and _sha256(library) != library.stem.rsplit('-', 1)[1]:
            problem = 'its bytes differ from those built'
        if problem is None:
            return library
        log.warning('the cached oneDNN kernels %s are not loaded (%s): building them again', library, problem)
        library.unlink(missing_ok=True)
    return None


def _build(command: list[str], folder: Path, fingerprint: str) -> Path:
    """Compile the library into `folder`, named by its fingerprint and SHA-256; a compiler's failure is
    remembered beside it for this command line, and later calls raise it without compiling again."""
    failure = (
        folder / f'onednn_conv-{fingerprint}-{hashlib.sha256(shlex.join(command).encode()).hexdigest()[:16]}.failed'
    )
    if failure.exists():
        error = failure.read_text(encoding='utf-8', errors='replace')
        raise OnednnUnavailable(f'{error} (an earlier try; delete {failure} to build again)')
    log.info('building the oneDNN convolution kernels (once per jaxlib and oneDNN version) into %s', folder)
    try:
        with tempfile.TemporaryDirectory(prefix='.build-', dir=folder) as scratch:
            built = Path(scratch) / 'onednn_conv.so'
            _compile(command + ['-o', str(built)])
            built.chmod(0o755)
            library = folder / f'onednn_conv-{fingerprint}-{_sha256(built)}.so'
            os.replace(built, library)
            return library
    except subprocess.TimeoutExpired:
        error = f'building the oneDNN kernels failed: {command[0]} did not finish in {BUILD_TIMEOUT_S} s'
    except subprocess.SubprocessError as compiler_failed:
        error = f'building the oneDNN kernels failed: {compiler_failed}'
    except OSError as error:
        raise OnednnUnavailable(f'building the oneDNN kernels failed: {error}') from error
    with contextlib.suppress(OSError):  # remembering is a saving, not a need
        atomic_write(failure, lambda tmp: Path(tmp).write_text(error, encoding='utf-8'), force=True, mode=0o644)
    raise OnednnUnavailable(error)


def _compile(command: list[str]) -> None:
    """Run the compiler in its own process group, all of which is killed after BUILD_TIMEOUT_S."""
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as process:
        try:
            _, errors = process.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    if process.returncode != 0:
        raise subprocess.SubprocessError(f'{command[0]} exited with {process.returncode}: {errors.strip()[-2000:]}')


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
