"""Flat parameter dicts and nfnet_jax's checkpoint file: one safetensors file of dotted Flax paths.

A flat path joins the module path and the parameter name with dots, e.g.
`stages.2.3.conv2b.kernel`. The file's metadata names the architecture and head, so
`load_checkpoint` can rebuild the model without being told what it is.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

FORMAT = 'nfnet_jax'
Shape = tuple[int, ...]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


class StateMismatchError(CheckpointError):
    """Tensors that do not fit an architecture, all of them reported at once."""

    def __init__(
        self, what: str, missing: Iterable[str], unexpected: Iterable[str], misshaped: Iterable[str], hint: str = ''
    ):
        self.missing, self.unexpected, self.misshaped = sorted(missing), sorted(unexpected), sorted(misshaped)
        lines = [
            f'{what}: {len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.misshaped)} mis-shaped'
        ]
        for label, keys in (('missing', self.missing), ('unexpected', self.unexpected), ('mis-shaped', self.misshaped)):
            lines += [f'  {label}: {key}' for key in keys]
        if hint:
            lines.append(hint)
        super().__init__('\n'.join(lines))


def check_shapes(what: str, expected: Mapping[str, Shape], got: Mapping[str, Shape], hint: str = '') -> None:
    """Raise one StateMismatchError naming every missing, unexpected and mis-shaped key."""
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    misshaped = [
        f'{key}: got {tuple(got[key])}, expected {tuple(expected[key])}'
        for key in expected.keys() & got.keys()
        if tuple(got[key]) != tuple(expected[key])
    ]
    if missing or unexpected or misshaped:
        raise StateMismatchError(what, missing, unexpected, misshaped, hint)


def flat_path(path: tuple) -> str:
    return '.'.join(str(part) for part in path)


def param_shapes(model: nnx.Module) -> dict[str, Shape]:
    """Every parameter's flat path and shape; works on abstract (`nnx.eval_shape`) models too."""
    return {flat_path(path): tuple(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as a flat dict of numpy arrays."""
    return {
        flat_path(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def load_flat_params(model: nnx.Module, params: Mapping[str, np.ndarray], what: str = 'parameters') -> None:
    """Set every parameter of `model` from a flat dict, cast to the model's param dtypes.

    Checks first and changes nothing unless every key fits.
    """
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    check_shapes(what, {flat_path(p): tuple(v.shape) for p, v in state}, {k: np.shape(v) for k, v in params.items()})
    updated = {path: var.replace(jnp.asarray(params[flat_path(path)], dtype=var.dtype)) for path, var in state}
    nnx.update(model, nnx.from_flat_state(updated))


def atomic_write(path: Path, write: Callable[[str], None], force: bool = False) -> None:
    """Write through a temporary file in the target folder, then rename: never a half file.

    Refuses to replace an existing file unless `force`.
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f'{path} already exists; pass --force (force=True) to overwrite it')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | os.PathLike,
    params: Mapping[str, np.ndarray],
    *,
    architecture: str,
    num_classes: int,
    global_pool: str,
    in_chans: int = 3,
    extra_metadata: Mapping[str, str] | None = None,
    force: bool = False,
    check: Callable[[str], None] | None = None,
) -> None:
    """Save flat params with the metadata `load_checkpoint` needs, atomically.

    `check(tmp_path)` runs on the finished temporary file before it takes the final name;
    if it raises, nothing is left behind.
    """
    from safetensors.numpy import save_file

    metadata = {
        'format': FORMAT,
        'architecture': architecture,
        'num_classes': str(num_classes),
        'global_pool': global_pool,
        'in_chans': str(in_chans),
        **(extra_metadata or {}),
    }
    tensors = {key: np.asarray(value, order='C') for key, value in params.items()}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        if check is not None:
            check(tmp)

    atomic_write(Path(path), write, force=force)


def _open_checkpoint(path: str | os.PathLike, read_tensors: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:
        with safe_open(path, framework='np') as f:
            metadata = f.metadata() or {}
            params = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict) if read_tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f'{path} is not a readable safetensors file (corrupt or truncated?): {err}') from None
    if metadata.get('format') != FORMAT:
        raise CheckpointError(
            f'{path} is not an nfnet_jax checkpoint (no format={FORMAT!r} in its metadata); '
            'convert timm weights with `python -m convert.from_timm NAME --checkpoint FILE -o OUT.safetensors`'
        )
    return params, metadata


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an nfnet_jax checkpoint, without reading its tensors."""
    return _open_checkpoint(path, read_tensors=False)[1]


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read an nfnet_jax checkpoint: (flat params, metadata). Clear errors for bad files."""
    return _open_checkpoint(path, read_tensors=True)
