"""Model names to models, as timm's `create_model` and `list_models` do: one construction path for all weights."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.features import FeatureListNet, OutIndices
from nfnet_jax.models.layers import pool_feature_multiplier
from nfnet_jax.models.nfnet import NormFreeNet, abstract_model, init_model
from nfnet_jax.models.pretrained import pretrained_cfgs, resolve_name
from nfnet_jax.weights.file import read_checkpoint, read_checkpoint_metadata
from nfnet_jax.weights.params import CheckpointError, set_flat_params
from nfnet_jax.weights.table import CONV2D
from nfnet_jax.weights.timm import adapt_input_conv, convert_state_dict, pretrained_params


def list_models(pattern: str = '*', pretrained: bool = False) -> list[str]:
    """Architecture names matching a shell pattern; with `pretrained=True`, the `arch.tag` names that have weights."""
    if pretrained:
        names = [name for name, cfg in pretrained_cfgs.items() if cfg.has_weights]
    else:
        names = list(model_cfgs)
    return sorted(name for name in names if fnmatch.fnmatch(name, pattern))


def checkpoint_head(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The head and input a weights file was saved with, as `create_model` keywords."""
    try:
        return dict(
            num_classes=int(metadata['num_classes']),
            global_pool=metadata['global_pool'],
            in_chans=int(metadata.get('in_chans', 3)),
        )
    except (KeyError, ValueError) as err:
        raise CheckpointError(f'the checkpoint metadata has no valid head description ({err!r})') from None


def create_model(
    name: str,
    pretrained: bool = False,
    *,
    rngs: nnx.Rngs | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    params: Mapping[str, np.ndarray] | None = None,
    features_only: bool = False,
    out_indices: OutIndices = (0, 1, 2, 3, 4),
    **model_kwargs: Any,
) -> NormFreeNet | FeatureListNet:
    """Build a model by timm name (`dm_nfnet_f0`, or `dm_nfnet_f0.dm_in1k` for its data settings).

    `model_kwargs` are NormFreeNet's: `num_classes` (1000), `in_chans` (3), `global_pool`
    ('avg'), `drop_rate`, `drop_path_rate`, `dtype` (compute), `param_dtype`, `precision` (of
    every conv and matmul: None for JAX's default, 'default', 'high' or 'highest'; see
    docs/inference.md, "Precision"), and NfCfg field overrides, as in timm.

    Weights come from one of: `pretrained=True`, timm's weights for the tag (a bare name:
    timm's default tag) from the Hugging Face hub through huggingface_hub's cache
    (`HF_HUB_OFFLINE=1`: the cache only), converted on the way in; `checkpoint_path`, a file
    written by `python -m convert.from_timm` or `save_checkpoint`; `params`, flat param paths to
    arrays (as `convert_state_dict` returns) for exactly the model `model_kwargs` describe. With
    the first two, a `num_classes` or `global_pool` that does not fit the saved classifier gets a
    freshly initialised one (`num_classes=0`: none), and an `in_chans` other than the saved one
    adapts the first conv, as timm does. No random init is done before loading weights.

    `features_only=True` returns a FeatureListNet whose call gives the NHWC maps at the taps in
    `out_indices` (a tuple, negatives from the end, or an int n for the last n).
    The model starts in eval mode; `model.train()` enables dropout and drop path.
    """
    architecture, pretrained_cfg = resolve_name(name)
    if sum((bool(pretrained), checkpoint_path is not None, params is not None)) > 1:
        raise ValueError('pass at most one of pretrained=True, checkpoint_path and params')
    rngs = rngs or nnx.Rngs(0)
    cfg = model_cfgs[architecture]
    saved_head, what = None, 'parameters'
    if pretrained:
        saved_head = dict(num_classes=pretrained_cfg.num_classes, global_pool='avg', in_chans=3)
        params = pretrained_params(pretrained_cfg, **(model_kwargs | saved_head))
        what = f'{pretrained_cfg.name} weights'
    elif checkpoint_path is not None:
        params, metadata = read_checkpoint(checkpoint_path)
        what = str(checkpoint_path)
        if metadata['architecture'] != architecture:
            raise CheckpointError(
                f'{checkpoint_path} holds {metadata["architecture"]}, not {architecture}; '
                'use nfnet_jax.load_checkpoint(path) to build whatever it holds'
            )
        saved_head = checkpoint_head(metadata)

    if params is None:
        model = init_model(cfg, rngs=rngs, pretrained_cfg=pretrained_cfg, **model_kwargs)
    else:
        wanted = dict(num_classes=1000, global_pool='avg', in_chans=3) | model_kwargs
        if saved_head is not None:
            params = adapt_first_conv(params, pretrained_cfg.first_conv, saved_head['in_chans'], wanted['in_chans'])
            # Built with the saved classifier (its pooling width), which is replaced below if it does not fit.
            fits = pool_feature_multiplier(wanted['global_pool']) == pool_feature_multiplier(saved_head['global_pool'])
            model_kwargs = model_kwargs | dict(
                num_classes=saved_head['num_classes'],
                global_pool=wanted['global_pool'] if fits else saved_head['global_pool'],
            )
        # No random init: an abstract model is filled from the params, so big models load fast.
        model = abstract_model(cfg, pretrained_cfg=pretrained_cfg, **model_kwargs)
        set_flat_params(model, params, what=what)
        # The abstract model's dropout keys are shapes only: give them real keys from `rngs`.
        nnx.reseed(model, dropout=rngs['dropout']())
        if (model.num_classes, model.global_pool) != (wanted['num_classes'], wanted['global_pool']):
            model.reset_classifier(wanted['num_classes'], wanted['global_pool'], rngs=rngs)
    if features_only:
        return FeatureListNet(model, out_indices)
    return model


def adapt_first_conv(
    params: Mapping[str, np.ndarray], first_conv: str, saved_chans: int, in_chans: int
) -> Mapping[str, np.ndarray]:
    """Params whose first conv takes `in_chans` channels instead of the saved 3 (timm's `adapt_input_conv`)."""
    if in_chans == saved_chans:
        return params
    if saved_chans != 3:
        raise CheckpointError(f'the checkpoint takes {saved_chans} input channels; only RGB weights can be adapted')
    key = f'{first_conv}.kernel'
    adapted = CONV2D.to_flax(adapt_input_conv(in_chans, CONV2D.to_timm(np.asarray(params[key]))))
    return {**params, key: adapted}


def load_checkpoint(path: str | os.PathLike, **kwargs: Any) -> NormFreeNet | FeatureListNet:
    """Build whatever model a weights file holds: architecture and head from its metadata (and the input
    size it was trained at, when the metadata has one).

    `kwargs` are `create_model`'s: another `num_classes` or `global_pool` gets a fresh classifier.
    """
    metadata = read_checkpoint_metadata(path)
    if 'architecture' not in metadata:
        raise CheckpointError(f'{path}: its metadata names no architecture (was it edited?)')
    if metadata['architecture'] not in model_cfgs:
        raise CheckpointError(f'{path}: its metadata names an unknown architecture {metadata["architecture"]!r}')
    name = metadata.get('model_name') or metadata['architecture']
    model = create_model(name, checkpoint_path=path, **(checkpoint_head(metadata) | kwargs))
    if 'input_size' in metadata and isinstance(model, NormFreeNet) and model.pretrained_cfg is not None:
        size = tuple(int(v) for v in json.loads(metadata['input_size']))  # trained at another size (finetune)
        model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, input_size=size, test_input_size=None)
    return model


def from_timm(timm_model: Any) -> NormFreeNet:
    """A live timm NFNet as an nfnet_jax model: same architecture, head, pooling, drop rates, weights."""
    architecture = timm_model.pretrained_cfg['architecture']
    tag = timm_model.pretrained_cfg.get('tag')
    drop_paths = [m.drop_prob for m in timm_model.modules() if type(m).__name__ == 'DropPath']
    model_kwargs = dict(
        num_classes=timm_model.num_classes,
        in_chans=timm_model.in_chans,
        global_pool=timm_model.head.global_pool.pool_type,
        drop_rate=timm_model.drop_rate,
        drop_path_rate=max(drop_paths, default=0.0),
    )
    params = convert_state_dict(timm_model.state_dict(), architecture, **model_kwargs)
    name = f'{architecture}.{tag}' if tag and f'{architecture}.{tag}' in pretrained_cfgs else architecture
    return create_model(name, params=params, **model_kwargs)
