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
from nfnet_jax.features import FeatureListNet, OutIndices
from nfnet_jax.layers import Dtype, pool_feature_multiplier
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
    pretrained: bool = False,
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
    features_only: bool = False,
    out_indices: OutIndices = (0, 1, 2, 3, 4),
    **cfg_overrides: Any,
) -> NormFreeNet | FeatureListNet:
    """Build a model by timm name (`dm_nfnet_f0`, or `dm_nfnet_f0.dm_in1k` for its data settings).

    `pretrained=True` loads timm's weights for the tag (a bare name: timm's default tag) from the
    Hugging Face hub through huggingface_hub's cache (`HF_HUB_OFFLINE=1`: the cache only) and
    converts them on the way in. A `num_classes` or `global_pool` that does not fit the
    checkpoint's classifier gets a freshly initialised one; `in_chans` other than 3 adapts the
    first conv as timm does. With `checkpoint_path` (a file written by `python -m convert.from_timm`)
    or `params` (flat param paths to arrays, as `convert.convert_state_dict` returns) the weights
    are loaded without a random init first. `cfg_overrides` replace NfCfg fields, as in timm.

    `features_only=True` returns a FeatureListNet whose call gives the NHWC maps at the taps in
    `out_indices` (a tuple, negatives from the end, or an int n for the last n).
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
    fresh_head = None
    if pretrained:
        if checkpoint_path is not None or params is not None:
            raise ValueError('pass pretrained=True, checkpoint_path or params, not more than one')
        # The checkpoint is converted with its own classifier; one that does not fit is replaced below.
        if num_classes != pretrained_cfg.num_classes or pool_feature_multiplier(global_pool) != 1:
            fresh_head = (num_classes, global_pool)
            kwargs.update(num_classes=pretrained_cfg.num_classes, global_pool='avg')
        params = pretrained_params(pretrained_cfg, **kwargs)
        what = f'{pretrained_cfg.name} weights'
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
    if fresh_head is not None:
        model.reset_classifier(*fresh_head, rngs=rngs)
    model.pretrained_cfg = pretrained_cfg
    if features_only:
        return FeatureListNet(model, out_indices)
    return model


def pretrained_params(cfg: PretrainedCfg, **model_kwargs: Any) -> dict[str, np.ndarray]:
    """timm's hub weights for a tag as flat Flax params, for a model built with `model_kwargs`."""
    # convert imports nfnet_jax, so it is imported here, not at the top.
    from convert.from_timm import adapt_input_conv, convert_state_dict, hub_checkpoint, read_timm_checkpoint

    state_dict = read_timm_checkpoint(hub_checkpoint(cfg))
    in_chans = model_kwargs.get('in_chans', 3)
    if in_chans != 3:
        first_conv = f'{cfg.first_conv}.weight'
        state_dict[first_conv] = adapt_input_conv(in_chans, state_dict[first_conv])
    return convert_state_dict(state_dict, cfg.architecture, **model_kwargs)


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
