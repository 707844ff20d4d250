"""Selecting parameters by dotted path, so masks and exclusions read like checkpoint keys.

A parameter of a model, of `nnx.state(model)`, of an optax state or of a Linen `params`
dict gets the same flat path (`stages.2.3.conv2b.kernel`, see `nfnet_jax.weights.params.dotted_path`),
whatever container holds it. Prefixes added by a parent (a Linen `backbone.`, a train state's
`model.`) are kept: predicates match suffixes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from nfnet_jax.linen import NFNet as LinenNFNet
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.weights.params import dotted_path, flat_state

PathPredicate = Callable[[str], bool]
# What a classifier is found in: an NNX model, a Linen NFNet, or a Linen model's params tree (`classifier_of`).
ClassifierSource = nnx.Module | nn.Module | Mapping[str, Any]


def path_mask(predicate: PathPredicate, tree: Any) -> Any:
    """A pytree of bools shaped like `tree`: `predicate(dotted path)` for every leaf (an optax mask)."""
    return jax.tree_util.tree_map_with_path(lambda keypath, _: predicate(dotted_path(keypath)), tree)


class PathPattern:
    """A path predicate from a regex that must match a whole trailing part of the path (see `matches`)."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self._compiled = re.compile(rf'(?:^|\.)(?:{pattern})$')

    def __call__(self, path: str) -> bool:
        return self._compiled.search(path) is not None

    def __repr__(self) -> str:
        return f'matches({self.pattern!r})'


def matches(pattern: str) -> PathPattern:
    """A predicate true for paths where the regex `pattern` matches at a dot boundary (`re.search`)."""
    return PathPattern(pattern)


def as_predicate(selection: PathPredicate | str) -> PathPredicate:
    """A predicate as given, or one from a regex pattern (`matches`)."""
    return matches(selection) if isinstance(selection, str) else selection


LINEAR_LAYERS = (nnx.Linear, nnx.LinearGeneral)


def _modules_in_definition_order(module: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every submodule with its path, depth first, children in the order their attributes were assigned."""
    yield path, module
    if isinstance(module, NormFreeNet):
        return  # its layers are the backbone's; only its classifier counts (see `classifier_paths`)
    if isinstance(module, (list, tuple)):
        children = enumerate(module)
    elif isinstance(module, dict):
        children = module.items()
    else:
        children = ((k, v) for k, v in vars(module).items() if not k.startswith('_'))
    for key, child in children:
        if isinstance(child, (nnx.Module, list, tuple, dict)) and not isinstance(child, nnx.Variable):
            yield from _modules_in_definition_order(child, (*path, str(key)))


def classifier_paths(model: nnx.Module) -> list[str]:
    """The dotted param paths of `model`'s final classifier, the layer AGC leaves unclipped by default.

    An NFNet's is its `head.fc`. In a model of your own it is the last linear layer (`nnx.Linear`
    or `nnx.LinearGeneral`, an NFNet's `head.fc` included) in the order the attributes were
    assigned, depth first: the head a user defines after the backbone. This mirrors timm's
    `--clip-mode agc`, which leaves out the last two parameters registered (the final layer's
    weight and bias). An NFNet's other layers never count. An empty list: no linear layer
    (an NFNet without classifier, a convolutional head).
    """
    last: tuple[tuple[str, ...], nnx.Module] | None = None
    for path, module in _modules_in_definition_order(model):
        if isinstance(module, NormFreeNet):
            if module.head.fc is not None:
                last = ((*path, 'head', 'fc'), module.head.fc)
        elif isinstance(module, LINEAR_LAYERS):
            last = (path, module)
    if last is None:
        return []
    prefix, layer = last
    return ['.'.join([*prefix, p]) for p, _ in flat_state(layer, nnx.Param)]


def linen_classifier_paths(params: Mapping[str, Any]) -> list[str]:
    """The dotted paths of the last Dense layer (a 2-D `kernel`) of a Linen params tree, depth first.

    The tree's own order is the one used: for a tree from `init`, the order the layers were
    defined in, so a head defined after the backbone is last. Empty: no Dense layer.
    """
    last: list[str] = []

    def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        nonlocal last
        if len(getattr(node.get('kernel'), 'shape', ())) == 2:
            last = ['.'.join((*path, str(name))) for name in node if not isinstance(node[name], Mapping)]
        for key, child in node.items():
            if isinstance(child, Mapping):
                visit(child, (*path, str(key)))

    visit(params, ())
    return last


def classifier_of(model: ClassifierSource) -> PathPattern:
    """A predicate true for `model`'s final classifier, wherever its params sit.

    `model` is an NNX module (`classifier_paths`), a Linen `nfnet_jax.linen.NFNet` (its `head.fc`),
    or the params tree of a Linen model (`linen_classifier_paths`: its last Dense layer). A Linen
    model of your own is defined by its call, so its params tree is what names the head.
    """
    if isinstance(model, LinenNFNet):
        paths = model.classifier_paths()
    elif isinstance(model, nn.Module):
        raise ValueError(
            f'a Linen {type(model).__name__} shows its layers only once initialised: pass its params tree as '
            "model= (its last Dense layer is left unclipped), or name the head's params with exclude="
        )
    elif isinstance(model, nnx.Module):
        paths = classifier_paths(model)
    else:
        paths = linen_classifier_paths(model)
    if not paths:
        raise ValueError(
            f'found no linear classifier in {type(model).__name__} to leave unclipped: name the params to '
            "leave out with exclude= (a regex such as r'fpn\\.out\\..*' or a predicate of the dotted path), "
            'or pass exclude=None to clip every parameter'
        )
    return matches('|'.join(map(re.escape, paths)))


# The classifier, wherever the model sits: timm's --clip-mode agc leaves exactly these unclipped.
is_classifier = matches(r'head\.fc\.(?:kernel|bias)')
# timm's gains are (O, 1, 1, 1) tensors: AGC treats each element as a unit. skipinit_gain is 0-d.
is_gain = matches(r'gain|skipinit_gain')
# No weight decay on these (DeepMind's recipe): biases, conv gains, skip gains.
is_bias_or_gain = matches(r'bias|gain|skipinit_gain')
