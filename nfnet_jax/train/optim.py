"""The NFNet paper's training recipe as optax pieces: schedule, optimizer, label-smoothed loss.

DeepMind's F0 recipe (Brock et al. 2021): SGD with Nesterov momentum 0.9, learning rate 0.1 per
256 images (1.6 at batch 4096) warmed up linearly for 5 epochs then cosine-decayed to 0,
weight decay 2e-5 on the weights only (not on biases, gains or skip gains), AGC with
clip factor 0.01 leaving the classifier unclipped, label smoothing 0.1, an EMA of the weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from nfnet_jax.train.agc import Exclude, adaptive_clip_grad
from nfnet_jax.train.paths import ClassifierSource, PathPredicate, is_bias_or_gain, is_classifier, path_mask

OPTIMIZERS = ('sgd', 'adamw')


def warmup_cosine_schedule(
    learning_rate: float, total_steps: int, warmup_steps: int = 0, end_learning_rate: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay until `total_steps`."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f'need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, total={total_steps}')
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=end_learning_rate,
    )


def nfnet_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 2e-5,
    clip_factor: float | None = 0.01,
    agc_exclude: Exclude = is_classifier,
    no_decay: PathPredicate = is_bias_or_gain,
    model: ClassifierSource | None = None,
    opt: str = 'sgd',
) -> optax.GradientTransformation:
    """AGC, then masked weight decay, then SGD with (Nesterov) momentum, in the paper's order.

    `opt='adamw'` keeps AGC and the mask but takes AdamW instead (torch's defaults: betas
    (0.9, 0.999), eps 1e-8, the weight decay decoupled: `lr * weight_decay * param`).

    `learning_rate` is a float or a schedule (`warmup_cosine_schedule`). `clip_factor=None`
    turns AGC off. `agc_exclude` and `no_decay` take dotted param paths (`head.fc.kernel`):
    by default the classifier is not clipped and biases and gains are not decayed. AGC's
    classifier is an NFNet's `head.fc`; pass `model` to have it found in a model of your own
    (its last linear layer; a Linen model's params tree: see `adaptive_clip_grad`).
    Weight decay is added to the gradient (coupled, like torch's SGD and DeepMind's code),
    so it is scaled by the learning rate.
    """
    if opt not in OPTIMIZERS:
        raise ValueError(f'unknown optimizer {opt!r}; choose one of {", ".join(OPTIMIZERS)}')
    steps = []
    if clip_factor is not None:
        steps.append(adaptive_clip_grad(clip_factor, exclude=agc_exclude, model=model))

    def decayed(params: Any) -> Any:
        return path_mask(lambda p: not no_decay(p), params)

    if opt == 'adamw':
        steps.append(optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=decayed))
        return optax.chain(*steps)
    if weight_decay:
        steps.append(optax.add_decayed_weights(weight_decay, mask=decayed))
    steps.append(optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*steps)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross entropy with label smoothing, in float32 whatever the logits' dtype.

    Equal to timm's `LabelSmoothingCrossEntropy(smoothing)`: the target puts
    `1 - smoothing + smoothing / K` on the label and `smoothing / K` on every other class.
    """
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))
