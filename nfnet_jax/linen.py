"""Every NFNet as a Flax Linen module, through `flax.nnx.bridge.ToLinen`.

    backbone = nfnet_jax.linen.NFNet('dm_nfnet_f0', num_classes=0, name='backbone')  # a Linen module
    variables = backbone.init(jax.random.key(0), images)               # random init, or:
    variables = nfnet_jax.linen.linen_variables(nfnet_jax.load_checkpoint('dm_nfnet_f0.safetensors'))
    features = backbone.apply(variables, images)                       # eval mode
    logits = backbone.apply(variables, images, train=True, rngs={'dropout': key})
    taps = backbone.apply(variables, images, output='taps')            # the NHWC maps at timm's taps

Inside a Linen model it is an ordinary submodule; its params sit under the submodule's name
with the NNX model's paths (`stem.conv1.kernel`, `stages.0.1.conv2.kernel`, with integer keys for
the stage and block indices). The computation is the NNX model's own, so outputs and gradients
are identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict

from nfnet_jax.factory import create_model
from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.features import FeatureListNet
from nfnet_jax.models.nfnet import NormFreeNet, abstract_model
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.weights.params import flat_params, nested

OUTPUTS = ('logits', 'pre_logits', 'features', 'taps')


def _build(
    name: str, *, rngs: nnx.Rngs, features_only: bool, out_indices: Any, **model_kwargs: Any
) -> NormFreeNet | FeatureListNet:
    """The NNX model for ToLinen, which builds it at init and again at every apply.

    At apply (no 'params' RNG stream) the params come from the Linen variables right after, so
    the model is built abstractly (no random init traced); only its dropout keys are real. Without
    a 'dropout' stream (eval mode, or a model without dropout: `NFNet.__call__` checks) the keys
    are a placeholder that nothing draws from.
    """
    dropout_key = rngs['dropout']() if 'dropout' in rngs else jax.random.key(0)
    if 'params' in rngs:
        rngs = nnx.Rngs(params=rngs['params'](), dropout=dropout_key)
        return create_model(name, rngs=rngs, features_only=features_only, out_indices=out_indices, **model_kwargs)
    model = abstract_model(model_cfgs[resolve_name(name)[0]], **model_kwargs)
    nnx.reseed(model, dropout=dropout_key)
    return FeatureListNet(model, out_indices) if features_only else model


def _forward(
    model: NormFreeNet | FeatureListNet, x: jax.Array, train: bool, output: str, indices: Any
) -> jax.Array | list[jax.Array]:
    model.train() if train else model.eval()
    if isinstance(model, FeatureListNet):
        return model(x)
    if output == 'taps':
        return model.forward_intermediates(x, indices, intermediates_only=True)
    features = model.forward_features(x)
    if output == 'features':
        return features
    return model.forward_head(features, pre_logits=output == 'pre_logits')


class NFNet(nn.Module):
    """The NFNet `model_name` (as `nfnet_jax.create_model` takes it) as a Linen module.

    The fields are `create_model`'s options; `model_kwargs` holds any other (`param_dtype`,
    NfCfg overrides). Call it as `module(x, train=False, output=None)`, where `output` is
    'logits' (the default), 'pre_logits' (the pooled features), 'features' (the unpooled final
    map) or 'taps' (the list of NHWC maps at timm's taps `out_indices`). A `features_only`
    model has only its taps. `train=True` runs dropout and drop path, drawing from the 'dropout'
    RNG: `apply(..., rngs={'dropout': key})` with a new key every step.
    """

    model_name: str
    num_classes: int = 1000
    global_pool: str = 'avg'
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None
    features_only: bool = False
    out_indices: int | tuple[int, ...] = (0, 1, 2, 3, 4)
    model_kwargs: Mapping[str, Any] | None = None

    def setup(self) -> None:
        kwargs = dict(
            num_classes=self.num_classes,
            global_pool=self.global_pool,
            in_chans=self.in_chans,
            drop_rate=self.drop_rate,
            drop_path_rate=self.drop_path_rate,
            dtype=self.dtype,
            features_only=self.features_only,
            out_indices=self.indices,
            **(self.model_kwargs or {}),
        )
        self.model = nnx.bridge.ToLinen(_build, args=(self.model_name,), kwargs=FrozenDict(kwargs))
        nn.share_scope(self, self.model)  # the NNX model's params directly under this module's name

    @property
    def indices(self) -> int | tuple[int, ...]:
        return self.out_indices if isinstance(self.out_indices, int) else tuple(self.out_indices)

    def __call__(self, x: jax.Array, train: bool = False, output: str | None = None) -> jax.Array | list[jax.Array]:
        if self.features_only and output not in (None, 'taps'):
            raise ValueError(f"a features_only NFNet returns its taps only (output='taps'), not {output!r}")
        output = output or ('taps' if self.features_only else 'logits')
        if output not in OUTPUTS:
            raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
        if train and (self.drop_rate > 0 or self.drop_path_rate > 0) and not self.has_rng('dropout'):
            raise ValueError(
                f'{self.model_name} has dropout (drop_rate={self.drop_rate}) or drop path '
                f"(drop_path_rate={self.drop_path_rate}): train=True needs a 'dropout' RNG, a new key each "
                "step: apply(variables, x, train=True, rngs={'dropout': key})"
            )
        return self.model(x, train, output, self.indices, nnx_method=_forward)


def linen_variables(params: nnx.Module | Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Converted weights (an NNX model or its flat params) as the `{'params': ...}` of `NFNet`.

    Load a converted checkpoint with `linen_variables(nfnet_jax.load_checkpoint(path))`; to
    place it inside a parent model, put `linen_variables(...)['params']` under the submodule's name.
    """
    if isinstance(params, nnx.Module):
        params = flat_params(params)
    return {'params': nested({path: jax.numpy.asarray(value) for path, value in params.items()})}
