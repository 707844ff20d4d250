"""Sharding NFNets over many devices and many hosts: meshes and batches (`mesh`), sharded inference
(`inference`) and sharded training (`train`: import it as `nfnet_jax.parallel.train`, as it loads optax and orbax)."""

from nfnet_jax.parallel.inference import shard_inference
from nfnet_jax.parallel.mesh import (
    DATA_AXIS,
    DEFAULT_MIN_SHARD_SIZE,
    MODEL_AXIS,
    batch_sharding,
    create_sharded,
    global_batch,
    initialize_distributed,
    leader_decides,
    local_rows,
    make_mesh,
    partition_spec,
    place,
    prefetch_to_device,
    process_rows,
    refuse_unless_all_agree,
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
    'leader_decides',
    'local_rows',
    'make_mesh',
    'partition_spec',
    'place',
    'prefetch_to_device',
    'process_rows',
    'refuse_unless_all_agree',
    'replicated',
    'shard_inference',
    'state_shardings',
]
