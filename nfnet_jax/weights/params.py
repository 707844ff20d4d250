"""Flat parameter dicts: one dotted path per parameter, their shapes, and the checks that they fit a model.

A flat path joins the module path and the parameter name with dots (`stages.2.3.conv2b.kernel`),
the same string whatever holds the parameter: an NNX model or state, an optax state, a Linen
`params` dict. It is the key of nfnet_jax's weights file, of AGC and weight-decay masks, and
of the training checkpoints' run record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Shape = tuple[int, ...]
M = TypeVar('M', bound=nnx.Module)

# nnx.Variable flattens to one child named 'value'; it is the variable, not a level of the tree.
_VARIABLE_FIELDS = ('value', 'raw_value')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose tensors do not fit the model."""


class StateMismatchError(CheckpointError):
    """Tensors that do not fit an architecture, all of them reported at once (after the hint)."""

    def __init__(
        self, what: str, missing: Iterable[str], unexpected: Iterable[str], misshaped: Iterable[str], hint: str = ''
    ):
        self.missing, self.unexpected, self.misshaped = sorted(missing), sorted(unexpected), sorted(misshaped)
        lines = [
            f'{what}: {len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.misshaped)} mis-shaped'
        ]
        if hint:
            lines.append(hint)
        for label, keys in (('missing', self.missing), ('unexpected', self.unexpected), ('mis-shaped', self.misshaped)):
            lines += [f'  {label}: {key}' for key in keys]
        super().__init__('\n'.join(lines))


def dotted_path(path: Iterable[Any]) -> str:
    """'stages.0.1.conv1.kernel' for an NNX path (strings and ints) or a jax key path.

    A Variable's own 'value' field is not a level of the path.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name not in _VARIABLE_FIELDS:
                parts.append(key.name)
        else:
            parts.append(str(key))
    return '.'.join(parts)


def nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat dict of dotted paths as nested dicts of string keys (`stages.0.1` -> `['stages']['0']['1']`).

    String keys throughout, indices included, as Linen's params hold them: such a tree survives
    `flax.serialization.to_state_dict`, orbax restores without a target and `flatten_dict(sep='/')`.
    """
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flat_state(module: nnx.Module, *filters: Any) -> list[tuple[str, nnx.Variable]]:
    """(dotted path, variable) of every variable of `module` that the NNX `filters` select."""
    return [(dotted_path(path), var) for path, var in nnx.to_flat_state(nnx.state(module, *filters))]


def param_shapes(model: nnx.Module) -> dict[str, Shape]:
    """Every parameter's flat path and shape; works on abstract (`nnx.eval_shape`) models too."""
    return {path: tuple(var.shape) for path, var in flat_state(model, nnx.Param)}


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as a flat dict of numpy arrays."""
    return {path: np.asarray(var.get_value()) for path, var in flat_state(model, nnx.Param)}


def clone_with_own_arrays(module: M) -> M:
    """`nnx.clone(module)` whose arrays are copies: a plain clone shares the original's arrays.

    A training step donates its state's arrays (JAX deletes them), so a copy meant to outlive
    the training of the original (an EMA, a compiled classifier) must not share them.
    """
    clone = nnx.clone(module)
    nnx.update(clone, jax.tree.map(lambda x: jnp.copy(x) if isinstance(x, jax.Array) else x, nnx.state(clone)))
    return clone


def check_shapes(what: str, expected: Mapping[str, Shape], got: Mapping[str, Shape], hint: str = '') -> None:
    """Raise one StateMismatchError naming every missing, unexpected and mis-shaped key."""
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    misshaped = [
        f'{key}: got {tuple(got[key])}, expected {tuple(expected[key])}'
        for key in expected.keys() & got.keys()
        if tuple(got[key]) != tuple(expected[key])
    ]
    if missing or unexpected or misshaped:
        raise StateMismatchError(what, missing, unexpected, misshaped, hint)


def set_flat_params(model: nnx.Module, params: Mapping[str, np.ndarray], what: str = 'parameters') -> None:
    """Set every parameter of `model` from a flat dict, cast to the model's param dtypes.

    Checks first and changes nothing unless every key fits.
    """
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    check_shapes(what, {dotted_path(p): tuple(v.shape) for p, v in state}, {k: np.shape(v) for k, v in params.items()})
    updated = {path: var.replace(jnp.asarray(params[dotted_path(path)], dtype=var.dtype)) for path, var in state}
    nnx.update(model, nnx.from_flat_state(updated))
