"""Dotted paths of pytree leaves, so masks and exclusions read like checkpoint keys.

A parameter of a model, of `nnx.state(model)`, of an optax state or of a Linen `params`
dict gets the same flat path that `nfnet_jax.checkpoint.flat_params` uses
(`stages.2.3.conv2b.kernel`), whatever container holds it. Prefixes added by a parent
(a Linen `backbone.`, a train state's `model.`) are kept: predicates match suffixes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

PathPredicate = Callable[[str], bool]

# nnx.Variable flattens to one child named 'value'; it is the variable, not a level of the tree.
_VARIABLE_FIELDS = ('value', 'raw_value')


def dotted_path(keypath: tuple[Any, ...]) -> str:
    """'stages.0.1.conv1.kernel' for a jax key path, skipping the Variable's own 'value' key."""
    parts = []
    for key in keypath:
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


def path_mask(predicate: PathPredicate, tree: Any) -> Any:
    """A pytree of bools shaped like `tree`: `predicate(dotted path)` for every leaf (an optax mask)."""
    return jax.tree_util.tree_map_with_path(lambda keypath, _: predicate(dotted_path(keypath)), tree)


def matches(pattern: str) -> PathPredicate:
    """A predicate true for paths where the regex `pattern` matches at a dot boundary (`re.search`)."""
    compiled = re.compile(rf'(?:^|\.)(?:{pattern})$')
    return lambda path: compiled.search(path) is not None


# The classifier, wherever the model sits: timm's --clip-mode agc leaves exactly these unclipped.
is_classifier = matches(r'head\.fc\.(?:kernel|bias)')
# timm's gains are (O, 1, 1, 1) tensors: AGC treats each element as a unit. skipinit_gain is 0-d.
is_gain = matches(r'gain|skipinit_gain')
# No weight decay on these (DeepMind's recipe): biases, conv gains, skip gains.
is_bias_or_gain = matches(r'bias|gain|skipinit_gain')
