"""Selecting parameters by dotted path, so masks and exclusions read like checkpoint keys.

A parameter of a model, of `nnx.state(model)`, of an optax state or of a Linen `params`
dict gets the same flat path (`stages.2.3.conv2b.kernel`, see `nfnet_jax.weights.params.dotted_path`),
whatever container holds it. Prefixes added by a parent (a Linen `backbone.`, a train state's
`model.`) are kept: predicates match suffixes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from nfnet_jax.weights.params import dotted_path

PathPredicate = Callable[[str], bool]


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
