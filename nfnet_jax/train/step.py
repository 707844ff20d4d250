"""The jitted training and evaluation steps.

Mixed precision comes from the model: built with `dtype=jnp.bfloat16` it computes in bfloat16
while its params, their gradients, the optimizer state and the EMA stay float32 (the
`param_dtype`); the loss is computed in float32 from the logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nfnet_jax import cpu, split
from nfnet_jax.split import SplitCache
from nfnet_jax.train.mixup import soft_target_cross_entropy
from nfnet_jax.train.optim import cross_entropy_loss
from nfnet_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def train_step_fn(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> Metrics:
    """One optimizer step on a batch (NHWC images, int labels), updating `state` in place.

    `labels` may also be soft targets (N, classes), as `nfnet_jax.train.Mixup` makes them: the
    loss is then timm's SoftTargetCrossEntropy (the targets carry the smoothing) and the
    accuracy counts the argmax of the targets.

    Runs the model in whatever mode it is in: call `state.model.train()` for dropout and
    drop path. Not jitted: compose it into your own `nnx.jit` / `nnx.shard_map`, or use `train_step`.
    """

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        logits = model(images)
        if labels.ndim == 2:
            return soft_target_cross_entropy(logits, labels), logits
        return cross_entropy_loss(logits, labels, label_smoothing), logits

    # Gradients of what the optimizer updates only: a frozen backbone costs no weight gradients.
    argnums = nnx.DiffState(0, state.optimizer.wrt)
    (loss, logits), grads = nnx.value_and_grad(loss_fn, argnums=argnums, has_aux=True)(state.model)
    state.optimizer.update(state.model, grads)
    if state.ema is not None:
        state.ema.update(state.model, state.optimizer.step[...])
    hard_labels = jnp.argmax(labels, -1) if labels.ndim == 2 else labels
    return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == hard_labels)}


def eval_step_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> Metrics:
    """Summed loss, number correct (top-1 and top-5) and number of examples on a batch; labels < 0 mark padding.

    Sums rather than means, so a data set split into padded batches of one shape averages right
    (and compiles once).
    """
    logits = model(images).astype(jnp.float32)
    valid = labels >= 0
    safe_labels = jnp.where(valid, labels, 0)
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe_labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == labels) & valid
    top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], axis=-1) & valid
    return {
        'loss_sum': jnp.sum(jnp.where(valid, losses, 0.0)),
        'correct': jnp.sum(correct),
        'correct_top5': jnp.sum(top5),
        'count': jnp.sum(valid),
    }


Preprocess = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def pure_train_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    labels: jax.Array,
    label_smoothing: float = 0.0,
    preprocess: Preprocess | None = None,
) -> tuple[nnx.State, Metrics]:
    """`train_step_fn` as a pure function of the split train state: (new state, metrics).

    This is the form `jax.jit` takes with shardings or compiler options. Keep `graphdef`
    static: switching the model between train() and eval() changes it. `preprocess(step, images,
    labels) -> (images, labels)` runs first, on the device (`step`: the optimizer's step count,
    for draws that depend on it): normalising uint8 batches, random erasing, mixup.
    """
    train_state = nnx.merge(graphdef, state)
    if preprocess is not None:
        images, labels = preprocess(train_state.optimizer.step[...], images, labels)
    metrics = train_step_fn(train_state, images, labels, label_smoothing)
    return nnx.state(train_state), metrics


def pure_eval_step(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    labels: jax.Array,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> Metrics:
    """`eval_step_fn` as a pure function of the split model; `preprocess(images)` runs first, on the device."""
    return eval_step_fn(nnx.merge(graphdef, state), images if preprocess is None else preprocess(images), labels)


@functools.cache
def train_steps(cpu_options: bool, label_smoothing: float) -> SplitCache:
    """The train step jitted over split states, with the CPU backend's compiler options or XLA's defaults.

    It takes (arrays, images, labels) and donates the arrays (their buffers become the new
    state's), as `ShardedTrainer`'s does. No argument is static, so a call hashes nothing.
    """

    def train(graphdef: nnx.GraphDef, treedef: Any) -> Callable:
        options = cpu.compiler_options(training=True) if cpu_options else None
        flat = split.on_arrays(pure_train_step, graphdef, treedef, True, label_smoothing=label_smoothing)
        return jax.jit(flat, donate_argnums=0, compiler_options=options)

    return SplitCache(train)


@functools.cache
def eval_steps(cpu_options: bool) -> SplitCache:
    """The eval step jitted over split models, taking (arrays, images, labels); options as `train_steps`."""

    def evaluate(graphdef: nnx.GraphDef, treedef: Any) -> Callable:
        options = cpu.compiler_options() if cpu_options else None
        return jax.jit(split.on_arrays(pure_eval_step, graphdef, treedef, False), compiler_options=options)

    return SplitCache(evaluate)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> Metrics:
    """`train_step_fn`, jitted (with the CPU backend's compiler options when it is on); updates `state` in place.

    The state stays split between calls (`nfnet_jax.split`), so a call costs the host little more
    than the jitted step itself. The state's arrays are donated to the step: arrays taken from it
    before the step (with `nnx.state` or `nnx.clone`, say) are deleted by it. Keep a copy with
    `nfnet_jax.weights.clone_with_own_arrays` or `jax.tree.map(jnp.copy, ...)`.
    """
    kept, jitted = train_steps(cpu.enabled(), label_smoothing)(state)
    arrays, metrics = jitted(kept.arrays(), images, labels)
    kept.update(arrays)
    return metrics


def eval_step(model: nnx.Module, images: jax.Array, labels: jax.Array) -> Metrics:
    """`eval_step_fn`, jitted (with the CPU backend's compiler options when it is on)."""
    kept, jitted = eval_steps(cpu.enabled())(model)
    return jitted(kept.arrays(), images, labels)
