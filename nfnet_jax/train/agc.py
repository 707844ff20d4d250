"""Adaptive gradient clipping exactly as timm's `timm.utils.agc.adaptive_clip_grad`, as an optax transform.

For each parameter `p` with gradient `g`, per unit:
`max_norm = clip_factor * max(||p||, eps)`; where `||g|| >= max_norm` the gradient becomes
`g * max_norm / max(||g||, 1e-6)`.

A unit is what timm's `unitwise_norm` reduces to, translated to Flax layouts (output axis last):
- conv kernels (HWIO), Linear kernels (in, out), the ECA conv (K, 1, 1): one unit per output
  channel, the norm over every other axis;
- conv gains: timm stores them as (O, 1, 1, 1), so every element is its own unit (|g| vs |p|),
  although ours are (O,);
- biases (1-D) and 0-d skip gains: the whole tensor is one unit.

`optax.adaptive_grad_clip` differs: it treats a 1-D gain as one unit (DeepMind's Haiku
convention, where gains are 1-D too), clips only where `||g|| > max_norm`, and excludes nothing.
Use it to reproduce DeepMind's code; use `adaptive_clip_grad` here to reproduce timm's training
(`--clip-mode agc`), which is what timm's pretrained NFNet-L / ECA / RegNet weights were trained with.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nfnet_jax.train.paths import PathPredicate, is_classifier, is_gain
from nfnet_jax.weights.params import dotted_path

Array = jax.Array


def unitwise_norm(x: Array, per_element: bool = False) -> Array:
    """The L2 norm of each unit of `x`, broadcastable against `x` (see the module docstring)."""
    x = x.astype(jnp.float32)
    if per_element:
        return jnp.abs(x)
    if x.ndim <= 1:
        return jnp.sqrt(jnp.sum(x * x))
    return jnp.sqrt(jnp.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True))


def clip_unitwise(grad: Array, param: Array, clip_factor: float, eps: float, per_element: bool) -> Array:
    """timm's clipping rule for one tensor."""
    max_norm = jnp.maximum(unitwise_norm(param, per_element), eps) * clip_factor
    grad_norm = unitwise_norm(grad, per_element)
    clipped = grad * (max_norm / jnp.maximum(grad_norm, 1e-6)).astype(grad.dtype)
    return jnp.where(grad_norm < max_norm, grad, clipped)


class AgcState(NamedTuple):
    """AGC keeps no state; a named type makes it recognisable in an optimizer state tree."""


def adaptive_clip_grad(
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: PathPredicate | None = is_classifier,
    per_element: PathPredicate = is_gain,
) -> optax.GradientTransformation:
    """timm's AGC as an optax transform; it needs `params` in `update`.

    `exclude(path)` is true for parameters left unclipped, by dotted path
    (`stages.0.1.conv1.kernel`, see `nfnet_jax.train.paths`); the default leaves the classifier
    (`head.fc.kernel`, `head.fc.bias`) unclipped like timm's `--clip-mode agc`, None clips
    everything (timm's `--clip-mode agc` with `exclude_head=False`). `per_element(path)` picks
    the tensors clipped element by element (timm's (O, 1, 1, 1) gains).
    """

    def update(updates: Any, state: AgcState, params: Any = None) -> tuple[Any, AgcState]:
        if params is None:
            raise ValueError('adaptive_clip_grad needs the params: call tx.update(grads, state, params)')

        def clip(keypath: tuple[Any, ...], grad: Array, param: Array) -> Array:
            path = dotted_path(keypath)
            if exclude is not None and exclude(path):
                return grad
            return clip_unitwise(grad, param, clip_factor, eps, per_element(path))

        return jax.tree_util.tree_map_with_path(clip, updates, params), state

    return optax.GradientTransformation(lambda params: AgcState(), update)
