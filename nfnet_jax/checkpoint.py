"""Deprecated: the weights file and flat params moved to `nfnet_jax.weights`; this alias goes in the next release."""

import warnings

from nfnet_jax.weights import (
    CheckpointError,
    StateMismatchError,
    check_shapes,
    flat_params,
    param_shapes,
    read_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from nfnet_jax.weights import dotted_path as flat_path
from nfnet_jax.weights import set_flat_params as load_flat_params

warnings.warn('nfnet_jax.checkpoint moved to nfnet_jax.weights', DeprecationWarning, stacklevel=2)

__all__ = [
    'CheckpointError',
    'StateMismatchError',
    'check_shapes',
    'flat_params',
    'flat_path',
    'load_flat_params',
    'param_shapes',
    'read_checkpoint',
    'read_checkpoint_metadata',
    'save_checkpoint',
]
