"""NNX modules kept split between jitted calls, so a step costs the host almost nothing.

`nnx.split` walks the whole graph of a module (every Variable, every attribute) and builds a
hashable `GraphDef`; `nnx.update` walks it again. A training state has hundreds of Variables, and
doing both around every step costs the host more than a fast accelerator takes to run the step.
`SplitModule` splits once and keeps the module's Variables in the order of the state's leaves, so
a call hands jit a flat list of arrays and writes the new arrays straight back into the same
Variables: the module is still updated in place, as NNX users expect.

It re-splits (and the jit is looked up again by the new `GraphDef`) only when the module's
structure changed since: a Variable or sub-module replaced, or a mode switched by `.train()` /
`.eval()`. That check follows the cached edges of the graph by identity, which is a small part of
what a split costs.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from flax.nnx import graphlib

# The attributes NNX's `Module.train()` / `Module.eval()` set: switching them changes the GraphDef.
MODE_ATTRIBUTES = ('deterministic', 'use_running_average')


def _child(parent: Any, key: Any) -> Any:
    """What `key` names in `parent`: an item of a dict, State or list, a field of a module or named tuple."""
    if isinstance(parent, nnx.State):
        return parent.raw_mapping[key]  # its items are wrapped anew on each access
    return getattr(parent, key) if isinstance(key, str) and not isinstance(parent, Mapping) else parent[key]


class SplitModule:
    """`module` split once: its GraphDef, its Variables (in the order of the state's leaves) and the state's treedef.

    `arrays()` are the values to pass to a jitted function of the state, which rebuilds the state
    with `jax.tree.unflatten(treedef, arrays)` and returns the new one's `jax.tree.leaves`;
    `update(new_arrays)` writes those back into the module's Variables.
    """

    def __init__(self, module: Any):
        self.graphdef, state = nnx.split(module)
        self.variables: list[nnx.Variable] = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.treedef = jax.tree.structure(state)
        arrays = self.arrays()
        if not all(getattr(array, 'committed', True) for array in arrays):
            # A fresh model's arrays are not committed to their device, a jitted step's outputs are: the
            # second step would compile a second program. Committed here, once, both steps run one.
            self.update(jax.device_put(arrays, [array.sharding for array in arrays]))
        graph = list(nnx.iter_graph(module))
        # The root is kept as None (`unchanged` is given it), so that a cache can hold the module weakly.
        nodes = {path: value if path else None for path, value in graph}
        self._edges = [
            (nodes[path[:-1]], path[-1], value)
            for path, value in graph
            if path
            and not str(path[-1]).startswith('_pytree__')
            and (isinstance(value, nnx.Variable) or graphlib.is_node(value))
        ]
        self._modes = [
            (nodes[path], name, getattr(value, name))
            for path, value in graph
            if isinstance(value, nnx.Module)
            for name in MODE_ATTRIBUTES
            if hasattr(value, name)
        ]
        self.jitted: Callable[..., Any] | None = None  # set by `SplitCache`

    def unchanged(self, module: Any) -> bool:
        """Whether `module` (the one split) still has its structure: the same Variables, sub-modules and modes."""
        for parent, key, value in self._edges:
            if _child(module if parent is None else parent, key) is not value:
                return False
        return all(getattr(module if owner is None else owner, name) is value for owner, name, value in self._modes)

    def arrays(self) -> list[jax.Array]:
        return [variable.get_raw_value() for variable in self.variables]

    def update(self, arrays: Sequence[jax.Array]) -> None:
        """Write a step's results into the Variables (the one trace-level check NNX's own graph update skips too)."""
        for variable, value in zip(self.variables, arrays, strict=True):
            variable.set_raw_value(value, _unsafe_bypass_check=True)


class SplitCache:
    """Per module, its `SplitModule` and the jitted function `build` made for its structure.

    `build(graphdef, treedef)` returns the jitted function of (arrays, ...); it runs once per
    structure (a module switching between train and eval mode keeps both compiled functions).
    Modules are held weakly: the cache keeps no model alive.
    """

    def __init__(self, build: Callable[[nnx.GraphDef, Any], Callable[..., Any]]):
        self.build = build
        self._splits: weakref.WeakKeyDictionary[Any, SplitModule] = weakref.WeakKeyDictionary()
        self._built: dict[Any, Callable[..., Any]] = {}

    def __call__(self, module: Any) -> tuple[SplitModule, Callable[..., Any]]:
        """The module's split (made again if its structure changed) and the jitted function for it."""
        split = self._splits.get(module)
        if split is None or not split.unchanged(module):
            split = SplitModule(module)
            key = (split.graphdef, split.treedef)  # hashing a GraphDef walks it: once per split, not per call
            if key not in self._built:
                self._built[key] = self.build(*key)
            split.jitted = self._built[key]
            self._splits[module] = split
        return split, split.jitted


def on_arrays(
    pure: Callable[..., Any], graphdef: nnx.GraphDef, treedef: Any, returns_state: bool, **keywords: Any
) -> Callable:
    """`pure(graphdef, state, *args, **keywords)` as a function of (the state's flat arrays, *args), for `jax.jit`
    over a `SplitModule`.

    With `returns_state`, `pure` returns (new state, output) and the result is (new arrays, output),
    the arrays in the order `SplitModule.update` writes them back. The result keeps `pure`'s name
    (profiles and XLA dumps show it).
    """

    @functools.wraps(pure)
    def on_flat_state(arrays: Sequence[jax.Array], *args: Any) -> Any:
        result = pure(graphdef, jax.tree.unflatten(treedef, arrays), *args, **keywords)
        if not returns_state:
            return result
        new_state, output = result
        leaves, new_treedef = jax.tree.flatten(new_state)
        if new_treedef != treedef:
            raise ValueError('a step changed the structure of the state it was given; keep it fixed inside a step')
        return leaves, output

    return on_flat_state
