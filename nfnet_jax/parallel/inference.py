"""Sharded inference: `nfnet_jax.inference`'s pure functions jitted over a mesh."""

from __future__ import annotations

from nfnet_jax.inference import InferenceFn, jit_inference
from nfnet_jax.parallel.mesh import (
    DEFAULT_MIN_SHARD_SIZE,
    MODEL_AXIS,
    Mesh,
    batch_sharding,
    place,
    state_shardings,
)


def shard_inference(fn: InferenceFn, mesh: Mesh, *, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE) -> InferenceFn:
    """`fn` (from `nfnet_jax.inference`) jitted over `mesh`: batch split along 'data', outputs likewise.

    The prepared weights are replicated on every device, or, when the mesh has a 'model' axis
    of size > 1, split along it (output channels of every kernel of at least `min_shard_size`
    elements that it divides). Call the result with a global batch (`global_batch`); with one
    process a numpy batch works too. Its batch size must be a multiple of the 'data' axis.
    """
    shardings = state_shardings(fn.state, mesh, (MODEL_AXIS,), min_shard_size)
    batch = batch_sharding(mesh)  # the images, and every output: logits, embeddings or each feature map
    return jit_inference(fn.apply, place(fn.state, shardings), in_shardings=(shardings, batch), out_shardings=batch)
