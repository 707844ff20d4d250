"""nfnet_jax params back to a timm state dict: the exact inverse of `convert_state_dict`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from convert.table import flax_rule
from nfnet_jax.checkpoint import StateMismatchError, flat_params


def to_timm(params: Mapping[str, np.ndarray] | nnx.Module) -> dict[str, np.ndarray]:
    """Flat Flax params (or a model) as a timm state dict of numpy arrays, bit for bit.

    Load it into timm with `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.
    """
    if isinstance(params, nnx.Module):
        params = flat_params(params)
    state_dict, unknown = {}, []
    for path, value in params.items():
        found = flax_rule(path)
        if found is None:
            unknown.append(path)
            continue
        key, rule = found
        state_dict[key] = np.array(rule.transform.to_timm(np.asarray(value)), order='C')  # writable, for torch
    if unknown:
        raise StateMismatchError('Flax params with no timm equivalent', [], unknown, [])
    return state_dict
