"""nfnet_jax's weights file: one safetensors file of flat params, with metadata naming the model.

The metadata names the architecture and head, so `nfnet_jax.load_checkpoint` can rebuild the
model without being told what it is, and holds the SHA-256 of every tensor's bytes
(`tensor_sha256`), checked on every read: a file damaged after it was written (disk, copy,
download) is refused, naming the tensors that changed. The checksums guard against accidents,
not against someone who rewrites the metadata too. Files written before the checksums existed
load without the check.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from nfnet_jax.files import atomic_write
from nfnet_jax.weights.params import CheckpointError

FORMAT = 'nfnet_jax'
CHECKSUMS = 'tensor_sha256'
ZIP_MAGIC, PICKLE_MAGIC, TAR_MAGIC = b'PK\x03\x04', b'\x80', b'ustar'


def file_kind(path: str | os.PathLike) -> str | None:
    """What a weights file holds, from its first bytes (never its name): 'safetensors', 'torch' or None.

    torch files are a zip archive (torch >= 1.6), a bare pickle (older torch, or
    `_use_new_zipfile_serialization=False`) or a tar archive (torch < 0.4); a safetensors file
    starts with the little-endian length of its JSON header, then the header's '{'.
    """
    with open(path, 'rb') as f:
        head = f.read(512)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC) or head[257:262] == TAR_MAGIC:
        return 'torch'
    if len(head) > 8 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= size - 8:
        return 'safetensors'
    return None


def array_sha256(array: np.ndarray) -> str:
    """The SHA-256 of an array's bytes in C order (any dtype, bfloat16 included)."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def tensor_checksums(tensors: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Every tensor's `array_sha256`, on threads (hashlib releases the GIL): one pass over memory."""
    names = sorted(tensors)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: array_sha256(tensors[name]), names), strict=True))


def verify_checksums(path: str | os.PathLike, params: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Raise a CheckpointError naming `path` and the damaged tensors if any differs from the saved checksums."""
    if CHECKSUMS not in metadata:
        return  # written before checksums were saved
    try:
        saved = json.loads(metadata[CHECKSUMS])
        if not isinstance(saved, dict):
            raise ValueError('not a mapping')
    except ValueError as err:
        raise CheckpointError(
            f'{path}: its {CHECKSUMS} metadata is not readable ({err}): the file was altered'
        ) from None
    found = tensor_checksums(params)
    damaged = sorted(name for name in saved.keys() | found.keys() if saved.get(name) != found.get(name))
    if damaged:
        shown = ', '.join(damaged[:5]) + (f' and {len(damaged) - 5} more' if len(damaged) > 5 else '')
        raise CheckpointError(
            f'{path} is damaged: {len(damaged)} tensors differ from the checksums saved with them ({shown}). '
            'It changed after it was written (disk, copy or download): write or fetch it again'
        )


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
    metadata = {
        'format': FORMAT,
        'architecture': architecture,
        'num_classes': str(num_classes),
        'global_pool': global_pool,
        'in_chans': str(in_chans),
        **(extra_metadata or {}),
    }
    tensors = {key: np.asarray(value, order='C') for key, value in params.items()}
    metadata[CHECKSUMS] = json.dumps(tensor_checksums(tensors), separators=(',', ':'))

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        if check is not None:
            check(tmp)

    atomic_write(Path(path), write, force=force)


def _open_checkpoint(path: str | os.PathLike, read_tensors: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:
        with safe_open(path, framework='np') as f:
            metadata = f.metadata() or {}
            params = {key: f.get_tensor(key) for key in f.keys()} if read_tensors else {}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        if file_kind(path) == 'torch':
            raise CheckpointError(
                f'{path} is a torch/timm checkpoint, not an nfnet_jax one: convert it with '
                f'`python -m convert.from_timm ARCHITECTURE --checkpoint {path} -o OUT.safetensors`'
            ) from None
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


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read an nfnet_jax checkpoint: (flat params, metadata). Clear errors for bad files.

    With `verify` (the default), every tensor is checked against the checksums saved with it.
    """
    params, metadata = _open_checkpoint(path, read_tensors=True)
    if verify:
        verify_checksums(path, params, metadata)
    return params, metadata
