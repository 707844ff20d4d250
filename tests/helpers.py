"""What several test modules share: the parity metric, random weights (from `benchmarks.random_weights`), layout
converters, hub staging, state arrays."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.random_weights import random_weights, randomize_
from nfnet_jax import cpu
from nfnet_jax.cpu import convolution
from nfnet_jax.numerics import FP32_RTOL, relative_error

__all__ = [
    'FP32_RTOL',
    'ONE_PER_CONFIG',
    'bomb_png',
    'count_sharded',
    'cpu_backend',
    'make_train_state',
    'leaves',
    'nchw',
    'nhwc',
    'random_params',
    'random_weights',
    'randomize_',
    'relative_error',
    'stage_hub_checkpoint',
]


# One architecture of each config helper and stem: the larger ones of a family run the same layers, only deeper and
# wider. The fast tier (-m "not slow") checks these.
ONE_PER_CONFIG = frozenset(
    {'dm_nfnet_f0', 'nfnet_f0', 'nfnet_l0', 'eca_nfnet_l0', 'nf_regnet_b0', 'nf_resnet26', 'nf_seresnet26'}
    | {'nf_ecaresnet26', 'test_nfnet'}
)


@contextlib.contextmanager
def cpu_backend(onednn: bool = True, bfloat16: bool | None = None) -> Iterator[convolution.Kernels]:
    """The CPU backend on inside, and as it was after. `bfloat16`: as if the CPU had (or lacked) bfloat16
    arithmetic; None: as it is."""
    was_enabled = cpu.enabled()
    assert cpu.enable(onednn=onednn)
    try:
        yield convolution.register(use_onednn=onednn, bfloat16=bfloat16)
    finally:
        if was_enabled:
            cpu.enable()
        else:
            cpu.disable()


def random_params(params: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Random values (`random_weights`) for flat Flax params, in their dtypes."""
    values = random_weights({key: np.shape(value) for key, value in params.items()}, output_axis=-1, seed=seed)
    return {key: value.astype(np.asarray(params[key]).dtype) for key, value in values.items()}


def make_train_state(
    tx: Any,
    *,
    seed: int = 0,
    dropout_seed: int | None = None,
    ema: float | None = 0.9,
    randomized: bool = False,
    architecture: str = 'test_nfnet',
    **model_kwargs: Any,
) -> Any:
    """A run in which every part of the state changes in a step: dropout and drop path on, EMA kept, train mode.

    test_nfnet with 10 classes by default; `randomized` gives every param `random_params` values.
    """
    from flax import nnx

    import nfnet_jax
    from nfnet_jax.train import TrainState
    from nfnet_jax.weights import flat_params, set_flat_params

    model_kwargs = dict(num_classes=10, drop_rate=0.3, drop_path_rate=0.3) | model_kwargs
    rngs = nnx.Rngs(params=seed, dropout=seed + 100 if dropout_seed is None else dropout_seed)
    model = nfnet_jax.create_model(architecture, rngs=rngs, **model_kwargs)
    if randomized:
        set_flat_params(model, random_params(flat_params(model)))
    state = TrainState(model, tx, ema_decay=ema)
    state.model.train()
    return state


def nchw(x: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t: Any) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def leaves(tree: Any) -> list[jax.Array]:
    """Every array of a state, PRNG keys as their raw data (so they compare and convert like arrays)."""
    return [
        jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x for x in jax.tree.leaves(tree)
    ]


def count_sharded(state: Any) -> int:
    """How many arrays of `state` are split over devices (the rest are replicated)."""
    return sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))


def stage_hub_checkpoint(cache: Path, state_dict: dict, repo_id: str, revision: str = '0123456789abcdef') -> Path:
    """Lay out a Hugging Face hub cache folder holding `repo_id/model.safetensors`, as the hub client writes it."""
    from safetensors.torch import save_file

    repo = cache / f'models--{repo_id.replace("/", "--")}'
    (repo / 'snapshots' / revision).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    path = repo / 'snapshots' / revision / 'model.safetensors'
    save_file({key: value.contiguous() for key, value in state_dict.items()}, path)
    return path


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's shape): 8-bit grayscale,
    one empty compressed block. PIL refuses it at open, before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

    header = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b'')
    )
    return path
