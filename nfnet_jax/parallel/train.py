"""Sharded training: `nfnet_jax.train`'s steps data-parallel over a mesh, optionally FSDP.

The only module of `nfnet_jax.parallel` that imports `nfnet_jax.train` (optax, orbax), so
sharded inference never loads them.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
from flax import nnx

from nfnet_jax import cpu
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
from nfnet_jax.train.state import TrainState
from nfnet_jax.train.step import Metrics, pure_eval_step, pure_train_step


class ShardedTrainer:
    """`nfnet_jax.train`'s train and eval steps, data-parallel over a mesh, optionally FSDP.

    The state is placed on the mesh in place when the trainer is made, and stays there: each
    step takes it with its shardings and returns it with the same ones (its buffers donated).
    The batch is split along 'data' and XLA reduces the gradients across it. Weights are
    replicated, or with `fsdp=True` split along 'data' too (each device keeps 1/n of every big
    param, its gradient, momentum and EMA; XLA gathers a weight where a layer needs it), and
    split along 'model' where the mesh has that axis. `state` may be saved and restored with
    `TrainCheckpointer` as usual: orbax writes and reads each shard where it lives.
    """

    def __init__(
        self,
        state: TrainState,
        mesh: Mesh,
        *,
        fsdp: bool = False,
        label_smoothing: float = 0.0,
        min_shard_size: int = DEFAULT_MIN_SHARD_SIZE,
    ):
        self.state = state
        self.mesh = mesh
        axes = (MODEL_AXIS, DATA_AXIS) if fsdp else (MODEL_AXIS,)
        self.state_shardings = state_shardings(nnx.state(state), mesh, axes, min_shard_size)
        nnx.update(state, place(nnx.state(state), self.state_shardings))
        eval_shardings = state_shardings(nnx.state(state.eval_model), mesh, axes, min_shard_size)
        data, metrics = batch_sharding(mesh), replicated(mesh)

        self._train = jax.jit(
            partial(pure_train_step, label_smoothing=label_smoothing),
            compiler_options=cpu.compiler_options(training=True),
            static_argnums=0,
            in_shardings=(self.state_shardings, data, data),
            out_shardings=(self.state_shardings, metrics),
            donate_argnums=1,
        )
        self._eval = jax.jit(
            pure_eval_step,
            compiler_options=cpu.compiler_options(),
            static_argnums=0,
            in_shardings=(eval_shardings, data, data),
            out_shardings=metrics,
        )

    def train_step(self, images: Any, labels: Any) -> Metrics:
        """One optimizer step on a batch, updating `self.state` in place; metrics are replicated.

        `images` and `labels` are this process's rows (numpy) or global arrays from `global_batch`.
        """
        graphdef, state = nnx.split(self.state)
        new_state, metrics = self._train(graphdef, state, *self._global(images, labels))
        nnx.update(self.state, new_state)
        return metrics

    def eval_step(self, images: Any, labels: Any, model: nnx.Module | None = None) -> Metrics:
        """`eval_step_fn` on a sharded batch, of `model`: `state.eval_model` (the EMA weights when
        there are any) by default, or `state.model`, which is sharded alike."""
        graphdef, state = nnx.split(self.state.eval_model if model is None else model)
        return self._eval(graphdef, state, *self._global(images, labels))

    def _global(self, images: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
        if isinstance(images, jax.Array) and isinstance(labels, jax.Array):
            return images, labels
        return global_batch((images, labels), self.mesh)
