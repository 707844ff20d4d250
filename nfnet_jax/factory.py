"""Model names to models, as timm's `create_model` and `list_models` do."""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfnet_jax.checkpoint import CheckpointError, load_flat_params, read_checkpoint, read_checkpoint_metadata
from nfnet_jax.configs import model_cfgs
from nfnet_jax.layers import Dtype
from nfnet_jax.model import NormFreeNet, abstract_model
from nfnet_jax.pretrained import PretrainedCfg, default_cfg, pretrained_cfgs, tags_of


def list_models(pattern: str = '*', pretrained: bool = False) -> list[str]:
    """Architecture names matching a shell pattern; with `pretrained=True`, the `arch.tag` names that have weights."""
    if pretrained:
        names = [name for name, cfg in pretrained_cfgs.items() if cfg.has_weights]
    else:
        names = list(model_cfgs)
    return sorted(name for name in names if fnmatch.fnmatch(name, pattern))


def resolve_name(name: str) -> tuple[str, PretrainedCfg]:
    """Split `arch[.tag]` and check both, with errors that say what exists."""
    architecture, _, tag = name.partition('.')
    if architecture not in model_cfgs:
        close = difflib.get_close_matches(architecture, model_cfgs, n=5, cutoff=0.5)
        suggestion = f'; did you mean {", ".join(close)}?' if close else '; see nfnet_jax.list_models()'
        raise ValueError(f'unknown model {architecture!r}{suggestion}')
    if not tag:
        return architecture, default_cfg(architecture)
    if name not in pretrained_cfgs:
        raise ValueError(f'unknown tag {tag!r} for {architecture}; it has: {", ".join(tags_of(architecture))}')
    return architecture, pretrained_cfgs[name]


def create_model(
    name: str,
    *,
    rngs: nnx.Rngs | None = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    global_pool: str = 'avg',
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    dtype: Dtype = None,
    param_dtype: Dtype = jnp.float32,
    checkpoint_path: str | os.PathLike | None = None,
    params: Mapping[str, np.ndarray] | None = None,
    **cfg_overrides: Any,
) -> NormFreeNet:
    """Build a model by timm name (`dm_nfnet_f0`, or `dm_nfnet_f0.dm_in1k` for its data settings).

    With `checkpoint_path` (a file written by `python -m convert.from_timm`) or `params` (flat
    param paths to arrays, as `convert.convert_state_dict` returns) the weights are loaded
    without a random init first. `cfg_overrides` replace NfCfg fields, as in timm.
    The model starts in eval mode; `model.train()` enables dropout and drop path.
    """
    architecture, pretrained_cfg = resolve_name(name)
    kwargs = dict(
        num_classes=num_classes,
        in_chans=in_chans,
        global_pool=global_pool,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
        dtype=dtype,
        param_dtype=param_dtype,
        **cfg_overrides,
    )
    rngs = rngs or nnx.Rngs(0)
    what = 'parameters'
    if checkpoint_path is not None:
        if params is not None:
            raise ValueError('pass either checkpoint_path or params, not both')
        params, metadata = read_checkpoint(checkpoint_path)
        what = str(checkpoint_path)
        if metadata['architecture'] != architecture:
            raise CheckpointError(
                f'{checkpoint_path} holds {metadata["architecture"]}, not {architecture}; '
                'use nfnet_jax.load_checkpoint(path) to build whatever it holds'
            )
    if params is None:
        model = NormFreeNet(model_cfgs[architecture], rngs=rngs, **kwargs)
    else:
        # No random init: an abstract model is filled from the params, so big models load fast.
        model = abstract_model(model_cfgs[architecture], **kwargs)
        load_flat_params(model, params, what=what)
        # The abstract model's dropout keys are shapes only: give them real keys from `rngs`.
        nnx.reseed(model, dropout=rngs['dropout']())
    model.pretrained_cfg = pretrained_cfg
    return model


def load_checkpoint(path: str | os.PathLike, **kwargs: Any) -> NormFreeNet:
    """Build whatever model a converted checkpoint holds: architecture and head from its metadata."""
    metadata = read_checkpoint_metadata(path)
    kwargs = (
        dict(
            num_classes=int(metadata['num_classes']),
            global_pool=metadata['global_pool'],
            in_chans=int(metadata.get('in_chans', 3)),
        )
        | kwargs
    )
    return create_model(metadata.get('model_name') or metadata['architecture'], checkpoint_path=path, **kwargs)
