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

from nfnet_jax.train.paths import ClassifierSource, PathPredicate, as_predicate, classifier_of, is_classifier, is_gain
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


Exclude = PathPredicate | str | None


def adaptive_clip_grad(
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Exclude = is_classifier,
    per_element: PathPredicate = is_gain,
    model: ClassifierSource | None = None,
) -> optax.GradientTransformation:
    """timm's AGC as an optax transform; it needs `params` in `update`.

    `exclude` selects the parameters left unclipped, by dotted path (`stages.0.1.conv1.kernel`,
    see `nfnet_jax.train.paths`): a predicate, a regex (`matches`), or None to clip everything
    (timm's `--clip-mode agc` with `exclude_head=False`). It is meant to leave the final
    classifier unclipped, like timm's `--clip-mode agc`:

    - by default it is an NFNet's classifier, `head.fc.kernel` and `head.fc.bias`;
    - with `model` (and no `exclude`) it is found in the model (`classifier_of`): an NFNet's
      `head.fc` (NNX, or the Linen `nfnet_jax.linen.NFNet`), in an NNX model of your own the last
      linear layer assigned (your head), in a Linen model's params tree (pass the tree as
      `model`) its last Dense layer. A model without a linear layer is an error: say what to exclude.

    An `exclude` that matches none of the params `init` is given is an error (on a model of your
    own the NFNet default would otherwise clip your head silently). `per_element(path)` picks
    the tensors clipped element by element (timm's (O, 1, 1, 1) gains).
    """
    if model is not None and exclude is is_classifier:
        exclude = classifier_of(model)
    exclude = as_predicate(exclude) if exclude is not None else None

    def init(params: Any) -> AgcState:
        if exclude is not None:
            paths = [dotted_path(keypath) for keypath, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            if not any(exclude(path) for path in paths):
                examples = ', '.join(paths[:3] + (['...'] if len(paths) > 5 else []) + paths[max(3, len(paths) - 2) :])
                raise ValueError(
                    f'AGC exclude={exclude!r} matches none of the {len(paths)} params ({examples}): pass '
                    'model=your_model to leave its classifier unclipped, an exclude= that names it, or exclude=None '
                    'to clip every parameter'
                )
        return AgcState()

    def update(updates: Any, state: AgcState, params: Any = None) -> tuple[Any, AgcState]:
        if params is None:
            raise ValueError('adaptive_clip_grad needs the params: call tx.update(grads, state, params)')

        def clip(keypath: tuple[Any, ...], grad: Array, param: Array) -> Array:
            path = dotted_path(keypath)
            if exclude is not None and exclude(path):
                return grad
            return clip_unitwise(grad, param, clip_factor, eps, per_element(path))

        return jax.tree_util.tree_map_with_path(clip, updates, params), state

    return optax.GradientTransformation(init, update)
