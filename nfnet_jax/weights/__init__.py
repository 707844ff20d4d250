"""Weights: flat param paths and checks, nfnet_jax's safetensors file, and timm's state dicts and files."""

from nfnet_jax.weights.file import read_checkpoint, read_checkpoint_metadata, save_checkpoint
from nfnet_jax.weights.params import (
    CheckpointError,
    StateMismatchError,
    check_shapes,
    clone_with_own_arrays,
    dotted_path,
    flat_params,
    param_shapes,
    set_flat_params,
)
from nfnet_jax.weights.timm import (
    adapt_input_conv,
    convert_state_dict,
    expected_timm_shapes,
    hub_checkpoint,
    pretrained_params,
    read_timm_checkpoint,
    to_timm,
    unwrap_state_dict,
)

__all__ = [
    'CheckpointError',
    'StateMismatchError',
    'adapt_input_conv',
    'check_shapes',
    'clone_with_own_arrays',
    'convert_state_dict',
    'dotted_path',
    'expected_timm_shapes',
    'flat_params',
    'hub_checkpoint',
    'param_shapes',
    'pretrained_params',
    'read_checkpoint',
    'read_checkpoint_metadata',
    'read_timm_checkpoint',
    'save_checkpoint',
    'set_flat_params',
    'to_timm',
    'unwrap_state_dict',
]
