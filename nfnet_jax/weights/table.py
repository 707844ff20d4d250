"""The one table that maps timm state-dict keys to nfnet_jax param paths, and back.

Module paths are identical on both sides (nfnet_jax mirrors timm's names); only the leaf
name and the layout change, by a named transform per kind of tensor. Every key must match
exactly one rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    """A layout change between timm (torch) and nfnet_jax (flax), exact in both directions."""

    name: str
    timm_rank: int
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_timm: Callable[[np.ndarray], np.ndarray]


CONV2D = Transform('conv2d OIHW->HWIO', 4, lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
LINEAR = Transform('linear (out,in)->(in,out)', 2, lambda w: w.T, lambda w: w.T)
GAIN = Transform('gain (O,1,1,1)->(O,)', 4, lambda g: g.reshape(-1), lambda g: g.reshape(-1, 1, 1, 1))
ECA_CONV1D = Transform('eca conv1d (1,1,K)->(K,1,1)', 3, lambda w: w.reshape(-1, 1, 1), lambda w: w.reshape(1, 1, -1))
SCALAR = Transform('0-d skip gain', 0, lambda s: s, lambda s: s)
VECTOR = Transform('bias', 1, lambda b: b, lambda b: b)

_BLOCK = r'stages\.\d+\.\d+'
_WS_CONV = rf'stem\.conv[1-4]?|{_BLOCK}\.(?:conv1|conv2|conv2b|conv3|downsample\.conv)|final_conv'
_SE_FC = rf'{_BLOCK}\.attn(?:_last)?\.fc[12]'
_ECA = rf'{_BLOCK}\.attn(?:_last)?\.conv'
_HEAD = r'head\.fc'


@dataclass(frozen=True)
class Rule:
    module: str  # regex on the module path, the same on both sides
    timm_leaf: str
    flax_leaf: str
    transform: Transform


RULES: tuple[Rule, ...] = (
    Rule(_WS_CONV, 'weight', 'kernel', CONV2D),  # weight-standardised convs
    Rule(_WS_CONV, 'gain', 'gain', GAIN),
    Rule(_WS_CONV, 'bias', 'bias', VECTOR),
    Rule(_SE_FC, 'weight', 'kernel', CONV2D),  # squeeze-excite 1x1 convs (plain)
    Rule(_SE_FC, 'bias', 'bias', VECTOR),
    Rule(_ECA, 'weight', 'kernel', ECA_CONV1D),
    Rule(_BLOCK, 'skipinit_gain', 'skipinit_gain', SCALAR),
    Rule(_HEAD, 'weight', 'kernel', LINEAR),
    Rule(_HEAD, 'bias', 'bias', VECTOR),
)


def _match(key: str, leaf_of: Callable[[Rule], str]) -> tuple[str, Rule] | None:
    module, _, leaf = key.rpartition('.')
    matches = [rule for rule in RULES if leaf_of(rule) == leaf and re.fullmatch(rule.module, module)]
    if len(matches) > 1:
        raise AssertionError(f'{key} matches {len(matches)} conversion rules; the table must be unambiguous')
    return (module, matches[0]) if matches else None


def timm_rule(timm_key: str) -> tuple[str, Rule] | None:
    """The flax path and rule for a timm key, or None if no rule takes it."""
    found = _match(timm_key, lambda rule: rule.timm_leaf)
    return (f'{found[0]}.{found[1].flax_leaf}', found[1]) if found else None


def flax_rule(flax_path: str) -> tuple[str, Rule] | None:
    """The timm key and rule for a flax path, or None if no rule takes it."""
    found = _match(flax_path, lambda rule: rule.flax_leaf)
    return (f'{found[0]}.{found[1].timm_leaf}', found[1]) if found else None
