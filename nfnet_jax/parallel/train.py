"""Sharded training: `nfnet_jax.train`'s steps data-parallel over a mesh, optionally FSDP.

The only module of `nfnet_jax.parallel` that imports `nfnet_jax.train` (optax, orbax), so
sharded inference never loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from nfnet_jax import cpu, split
from nfnet_jax.parallel.mesh import (
    DATA_AXIS,
    DEFAULT_MIN_SHARD_SIZE,
    MODEL_AXIS,
    Mesh,
    batch_sharding,
    global_batch,
    place,
    replicated,
    state_shardings,
)
from nfnet_jax.split import SplitCache
from nfnet_jax.train.state import TrainState
from nfnet_jax.train.step import Metrics, Preprocess, pure_eval_step, pure_train_step


class ShardedTrainer:
    """`nfnet_jax.train`'s train and eval steps, data-parallel over a mesh, optionally FSDP.

    The state is placed on the mesh in place when the trainer is made, and stays there: each
    step takes it with its shardings and returns it with the same ones (its buffers donated).
    The batch is split along 'data' and XLA reduces the gradients across it. Weights are
    replicated, or with `fsdp=True` split along 'data' too (each device keeps 1/n of every big
    param, its gradient, momentum and EMA; XLA gathers a weight where a layer needs it), and
    split along 'model' where the mesh has that axis. `state` may be saved and restored with
    `TrainCheckpointer` as usual: orbax writes and reads each shard where it lives.

    `preprocess(step, images, labels)` and `eval_preprocess(images)` run inside the jitted steps,
    on the devices (see `nfnet_jax.train.pure_train_step`): uint8 batches cross to the devices and
    are normalised, erased and mixed there.
    """

    def __init__(
        self,
        state: TrainState,
        mesh: Mesh,
        *,
        fsdp: bool = False,
        label_smoothing: float = 0.0,
        min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
        preprocess: Preprocess | None = None,
        eval_preprocess: Callable[[jax.Array], jax.Array] | None = None,
    ):
        self.state = state
        self.mesh = mesh
        axes = (MODEL_AXIS, DATA_AXIS) if fsdp else (MODEL_AXIS,)
        self.state_shardings = state_shardings(nnx.state(state), mesh, axes, min_shard_size)
        nnx.update(state, place(nnx.state(state), self.state_shardings))
        train_shardings = jax.tree.leaves(self.state_shardings)
        eval_shardings = jax.tree.leaves(state_shardings(nnx.state(state.eval_model), mesh, axes, min_shard_size))
        data, metrics = batch_sharding(mesh), replicated(mesh)

        def train(graphdef: nnx.GraphDef, treedef: Any) -> Callable:
            step = split.on_arrays(
                pure_train_step, graphdef, treedef, True, label_smoothing=label_smoothing, preprocess=preprocess
            )
            return jax.jit(
                step,
                compiler_options=cpu.compiler_options(training=True),
                in_shardings=(train_shardings, data, data),
                out_shardings=(train_shardings, metrics),
                donate_argnums=0,
            )

        def evaluate(graphdef: nnx.GraphDef, treedef: Any) -> Callable:
            step = split.on_arrays(pure_eval_step, graphdef, treedef, False, preprocess=eval_preprocess)
            return jax.jit(
                step,
                compiler_options=cpu.compiler_options(),
                in_shardings=(eval_shardings, data, data),
                out_shardings=metrics,
            )

        # The state and the models evaluated stay split between steps (`nfnet_jax.split`).
        self._train, self._eval = SplitCache(train), SplitCache(evaluate)

    def train_step(self, images: Any, labels: Any) -> Metrics:
        """One optimizer step on a batch, updating `self.state` in place; metrics are replicated.

        `images` and `labels` are this process's rows (numpy) or global arrays from `global_batch`.
        """
        kept, jitted = self._train(self.state)
        arrays, metrics = jitted(kept.arrays(), *self._global(images, labels))
        kept.update(arrays)
        return metrics

    def eval_step(self, images: Any, labels: Any, model: nnx.Module | None = None) -> Metrics:
        """`eval_step_fn` on a sharded batch, of `model`: `state.eval_model` (the EMA weights when
        there are any) by default, or `state.model`, which is sharded alike."""
        kept, jitted = self._eval(self.state.eval_model if model is None else model)
        return jitted(kept.arrays(), *self._global(images, labels))

    def _global(self, images: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
        if isinstance(images, jax.Array) and isinstance(labels, jax.Array):
            return images, labels
        return global_batch((images, labels), self.mesh)
