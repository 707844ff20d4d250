"""The jitted training and evaluation steps.

Mixed precision comes from the model: built with `dtype=jnp.bfloat16` it computes in bfloat16
while its params, their gradients, the optimizer state and the EMA stay float32 (the
`param_dtype`); the loss is computed in float32 from the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nfnet_jax.train.optim import cross_entropy_loss
from nfnet_jax.train.state import TrainState

Metrics = dict[str, jax.Array]


def train_step_fn(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> Metrics:
    """One optimizer step on a batch (NHWC images, int labels), updating `state` in place.

    Runs the model in whatever mode it is in: call `state.model.train()` for dropout and
    drop path. Not jitted: compose it into your own `nnx.jit` / `nnx.shard_map`, or use `train_step`.
    """

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        logits = model(images)
        return cross_entropy_loss(logits, labels, label_smoothing), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(state.model)
    state.optimizer.update(state.model, grads)
    if state.ema is not None:
        state.ema.update(state.model, state.optimizer.step[...])
    return {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels)}


def eval_step_fn(model: nnx.Module, images: jax.Array, labels: jax.Array) -> Metrics:
    """Summed loss, number correct and number of examples on a batch; labels < 0 mark padding.

    Sums rather than means, so a data set split into padded batches of one shape averages right
    (and compiles once).
    """
    logits = model(images).astype(jnp.float32)
    valid = labels >= 0
    safe_labels = jnp.where(valid, labels, 0)
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe_labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == labels) & valid
    return {'loss_sum': jnp.sum(jnp.where(valid, losses, 0.0)), 'correct': jnp.sum(correct), 'count': jnp.sum(valid)}


train_step = nnx.jit(train_step_fn, static_argnames='label_smoothing')
eval_step = nnx.jit(eval_step_fn)
