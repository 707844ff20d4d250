"""Every NFNet as a Flax Linen module, through `flax.nnx.bridge.ToLinen`.

    backbone = nfnet_jax.linen.NFNet('dm_nfnet_f0', num_classes=0)     # a Linen module
    variables = backbone.init(jax.random.key(0), images)               # random init, or:
    variables = nfnet_jax.linen.linen_variables(nfnet_jax.load_checkpoint('dm_nfnet_f0.safetensors'))
    features = backbone.apply(variables, images)                       # eval mode
    logits = backbone.apply(variables, images, train=True, rngs={'dropout': key})

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
from flax import nnx
from flax.core import FrozenDict

from nfnet_jax.configs import model_cfgs
from nfnet_jax.factory import create_model
from nfnet_jax.model import NormFreeNet, abstract_model
from nfnet_jax.pretrained import resolve_name
from nfnet_jax.weights.params import flat_params, nested


def _build(name: str, *, rngs: nnx.Rngs, **model_kwargs: Any) -> NormFreeNet:
    """The NNX model for ToLinen, which builds it at init and again at every apply.

    At apply (no 'params' RNG stream) the params come from the Linen variables right after, so
    the model is built abstractly (no random init traced); only its dropout keys are real.
    """
    dropout_key = rngs['dropout']() if 'dropout' in rngs or 'default' in rngs else jax.random.key(0)
    if 'params' in rngs:
        return create_model(name, rngs=nnx.Rngs(params=rngs['params'](), dropout=dropout_key), **model_kwargs)
    model = abstract_model(model_cfgs[resolve_name(name)[0]], **model_kwargs)
    nnx.reseed(model, dropout=dropout_key)
    return model


def _forward(model: NormFreeNet, x: jax.Array, train: bool = False, pre_logits: bool = False) -> jax.Array:
    model.train() if train else model.eval()
    features = model.forward_features(x)
    return model.forward_head(features, pre_logits=pre_logits)


def NFNet(name: str, *, module_name: str | None = None, **model_kwargs: Any) -> nnx.bridge.ToLinen:  # noqa: N802 (a class-like factory)
    """A Linen module for architecture `name`; `model_kwargs` as `nfnet_jax.create_model` takes them.

    Call it as `module(x, train=False, pre_logits=False)`; `train=True` needs a 'dropout' RNG
    when the model has dropout or drop path. `module_name` names it inside a parent module.
    """
    return _LinenNFNet(_build, args=(name,), kwargs=FrozenDict(model_kwargs), name=module_name)


class _LinenNFNet(nnx.bridge.ToLinen):
    """ToLinen with the Linen calling convention: `(x, train=False, pre_logits=False)`."""

    def __call__(self, x: jax.Array, train: bool = False, pre_logits: bool = False) -> jax.Array:
        return super().__call__(x, train=train, pre_logits=pre_logits, nnx_method=_forward)


def linen_variables(params: NormFreeNet | Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Converted weights (an NNX model or its flat params) as the `{'params': ...}` of `NFNet`.

    Load a converted checkpoint with `linen_variables(nfnet_jax.load_checkpoint(path))`; to
    place it inside a parent model, put `linen_variables(...)['params']` under the submodule's name.
    """
    if isinstance(params, NormFreeNet):
        params = flat_params(params)
    return {'params': nested({path: jax.numpy.asarray(value) for path, value in params.items()})}
