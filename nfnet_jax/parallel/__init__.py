"""Sharding NFNets over many devices and many hosts: meshes and batches (`mesh`), sharded inference
(`inference`) and sharded training (`train`, imported only when asked for: it loads optax and orbax)."""

from typing import Any

from nfnet_jax.parallel.inference import shard_inference
from nfnet_jax.parallel.mesh import (
    DATA_AXIS,
    DEFAULT_MIN_SHARD_SIZE,
    MODEL_AXIS,
    batch_sharding,
    create_sharded,
    global_batch,
    initialize_distributed,
    local_rows,
    make_mesh,
    partition_spec,
    place,
    process_rows,
    replicated,
    state_shardings,
)

__all__ = [
    'DATA_AXIS',
    'DEFAULT_MIN_SHARD_SIZE',
    'MODEL_AXIS',
    'batch_sharding',
    'create_sharded',
    'global_batch',
    'initialize_distributed',
    'local_rows',
    'make_mesh',
    'partition_spec',
    'place',
    'process_rows',
    'replicated',
    'shard_inference',
    'state_shardings',
]


def __getattr__(name: str) -> Any:
    """`nfnet_jax.parallel.ShardedTrainer`, kept for one release: it now lives in `nfnet_jax.parallel.train`."""
    if name == 'ShardedTrainer':
        import warnings

        from nfnet_jax.parallel import train

        warnings.warn(
            'nfnet_jax.parallel.ShardedTrainer moved to nfnet_jax.parallel.train.ShardedTrainer',
            DeprecationWarning,
            stacklevel=2,
        )
        return train.ShardedTrainer
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
