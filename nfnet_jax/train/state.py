"""Everything a training run carries from step to step, as one NNX module.

`nnx.state(train_state)` is the whole run: the model's params and its dropout / drop-path RNG
streams, the optimizer state with its step count, and the EMA weights. That one state is what
`nfnet_jax.train.checkpoint` saves and restores, so a resumed run continues bit for bit.

The model is any NNX module whose call maps images to logits: an NFNet, or a model of your own
with an NFNet backbone inside (see docs/backbone.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.filterlib import Filter

from nfnet_jax.weights.params import clone_with_own_arrays


class ModelEma(nnx.Module):
    """An exponential moving average of a model's weights, kept as a second model in eval mode.

    `ema = ema + (1 - decay) * (params - ema)` after each step, as timm's ModelEmaV3. With
    `warmup=True` the decay is `min(decay, (1 + step) / (10 + step))`, so early steps are not
    dominated by the random init (TensorFlow's ExponentialMovingAverage num_updates rule).
    Evaluate with `ema.model(x)`.
    """

    def __init__(self, model: nnx.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f'EMA decay must be in (0, 1), got {decay}')
        self.model = clone_with_own_arrays(model)  # the step donates both; one buffer cannot go twice
        self.model.eval()
        self.decay = decay
        self.warmup = warmup

    def current_decay(self, step: jax.Array) -> jax.Array:
        if not self.warmup:
            return jnp.asarray(self.decay, jnp.float32)
        step = jnp.asarray(step, jnp.float32)
        return jnp.minimum(self.decay, (1.0 + step) / (10.0 + step))

    def update(self, model: nnx.Module, step: jax.Array) -> None:
        """Move the averages towards `model`'s current params (`step`: the optimizer's step count)."""
        decay = self.current_decay(step)
        averages = nnx.state(self.model, nnx.Param)
        params = nnx.state(model, nnx.Param)
        nnx.update(
            self.model,
            jax.tree.map(lambda e, p: e + ((1.0 - decay) * (p - e)).astype(e.dtype), averages, params),
        )


class TrainState(nnx.Module):
    """The model, its optimizer and optionally an EMA of its weights.

    `model` is any NNX module mapping images to logits. The optimizer updates the variables
    that the NNX filter `wrt` selects (every `nnx.Param` by default); the others stay frozen
    and get no gradient, e.g. `wrt=nnx.All(nnx.Param, nnx.PathContains('head'))` trains only
    the `head` of a model with a frozen backbone.
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        *,
        wrt: Filter = nnx.Param,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
    ):
        self.model = model
        self.optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        self.ema = ModelEma(model, ema_decay, ema_warmup) if ema_decay is not None else None

    @property
    def step(self) -> int:
        """How many optimizer steps have been taken."""
        return int(self.optimizer.step[...])

    @property
    def eval_model(self) -> nnx.Module:
        """The model to evaluate: the EMA weights when there are any."""
        return self.ema.model if self.ema is not None else self.model
