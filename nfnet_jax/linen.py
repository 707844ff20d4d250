"""Every NFNet as a Flax Linen module that runs the NNX model's own computation.

    backbone = nfnet_jax.linen.NFNet('dm_nfnet_f0', num_classes=0, name='backbone')  # a Linen module
    variables = backbone.init(jax.random.key(0), images)               # random init, or:
    variables = nfnet_jax.linen.linen_variables(nfnet_jax.load_checkpoint('dm_nfnet_f0.safetensors'))
    logits = backbone.apply(variables, images, rngs={'dropout': key})  # train mode (the default)
    features = backbone.apply(variables, images, train=False)          # eval mode
    out = backbone.apply(variables, images, train=False, output='all')  # logits, pre-logits, map, taps

Train mode: `train: bool = True`, the convention of Flax's example models (examples/imagenet's
ResNet), so a trainer that does not pass it trains; evaluation passes `train=False`. A module
with dropout or drop path raises in train mode without a 'dropout' RNG, so an evaluation that
forgets `train=False` fails loudly instead of drawing masks.

Params: the NNX model's paths as nested dicts with string keys, `params['stages']['0']['1']['conv2']
['kernel']` for `stages.0.1.conv2.kernel`. Keeping the NNX path (not Linen's `stages_0` list names)
keeps one name per parameter for checkpoints, AGC and weight-decay masks; string keys are what
Linen trees hold, so `flax.serialization.to_state_dict`, orbax restores without a target and
`flax.traverse_util.flatten_dict(params, sep='/')` give trees that apply unchanged. The integer
keys of earlier versions (`params['stages'][0][1]`) are read too: both name the same dotted path.

Every apply checks the params against the module's definition (the abstract NNX model's shapes)
and raises one `StateMismatchError` naming each missing, unexpected and mis-shaped path.

Why not `flax.nnx.bridge.ToLinen`: it rebuilds the model abstractly on each apply and writes in
whatever arrays arrive, unchecked, under integer keys. This module merges the same NNX model
with the params itself, so it can check them and keep string keys; the computation is the NNX model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from nfnet_jax.factory import create_model
from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.features import FeatureListNet
from nfnet_jax.models.nfnet import NormFreeNet, abstract_model
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.weights.params import (
    check_shapes,
    dotted_path,
    flat_params,
    flat_state,
    nested,
    param_shapes,
    set_flat_params,
)

OUTPUTS = ('logits', 'pre_logits', 'features', 'taps', 'all')
CLASSIFIER = 'head.fc.'


def params_tree(model: nnx.Module) -> dict[str, Any]:
    """The model's parameters as a Linen params tree (string keys); traceable, for init."""
    return nested({path: var.get_value() for path, var in flat_state(model, nnx.Param)})


def _forward(model: NormFreeNet | FeatureListNet, x: jax.Array, output: str, indices: Any) -> Any:
    """The NNX model's outputs, one pass for output='all'."""
    if isinstance(model, FeatureListNet):
        return model(x)
    if output == 'taps':
        return model.forward_intermediates(x, indices, intermediates_only=True)
    if output == 'all':
        features, taps = model.forward_intermediates(x, indices)
        pre_logits = model.forward_head(features, pre_logits=True)
        logits = pre_logits if model.head.fc is None else model.head.fc(pre_logits)
        return {'logits': logits, 'pre_logits': pre_logits, 'features': features, 'taps': taps}
    features = model.forward_features(x)
    if output == 'features':
        return features
    return model.forward_head(features, pre_logits=output == 'pre_logits')


class NFNet(nn.Module):
    """The NFNet `model_name` (as `nfnet_jax.create_model` takes it) as a Linen module.

    The fields are `create_model`'s options; `model_kwargs` holds any other (`param_dtype`,
    NfCfg overrides); `grad_checkpointing=True` rematerialises each block in the backward pass.
    Call it as `module(x, train=True, output=None)`:

    - `train` (default True, as Flax's example models): dropout and drop path on, drawing from
      the 'dropout' RNG (`apply(..., rngs={'dropout': key})`, a new key every step); pass
      `train=False` to evaluate. `init` without a 'dropout' RNG traces eval mode.
    - `output`: 'logits' (the default), 'pre_logits' (the pooled features), 'features' (the
      unpooled final map), 'taps' (the list of NHWC maps at timm's taps `out_indices`), or 'all':
      a dict of the four from one pass (as big_vision models return `(logits, out)`). A
      `features_only` model has only its taps.
    """

    model_name: str
    num_classes: int = 1000
    global_pool: str = 'avg'
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None
    grad_checkpointing: bool = False
    features_only: bool = False
    out_indices: int | tuple[int, ...] = (0, 1, 2, 3, 4)
    model_kwargs: Mapping[str, Any] | None = None

    @property
    def indices(self) -> int | tuple[int, ...]:
        return self.out_indices if isinstance(self.out_indices, int) else tuple(self.out_indices)

    def nnx_kwargs(self) -> dict[str, Any]:
        """NormFreeNet's keyword arguments for this module's fields."""
        return dict(
            num_classes=self.num_classes,
            global_pool=self.global_pool,
            in_chans=self.in_chans,
            drop_rate=self.drop_rate,
            drop_path_rate=self.drop_path_rate,
            dtype=self.dtype,
            grad_checkpointing=self.grad_checkpointing,
            **(self.model_kwargs or {}),
        )

    def classifier_paths(self) -> list[str]:
        """The dotted paths of the classifier's params (AGC leaves them unclipped); none without one."""
        return [] if self.features_only or self.num_classes == 0 else [f'{CLASSIFIER}kernel', f'{CLASSIFIER}bias']

    def _abstract(self) -> NormFreeNet | FeatureListNet:
        """The module's definition: the NNX model's structure and shapes, no weight allocated."""
        model = abstract_model(model_cfgs[resolve_name(self.model_name)[0]], **self.nnx_kwargs())
        return FeatureListNet(model, self.indices) if self.features_only else model

    def _initialised(self, dropout_key: jax.Array) -> NormFreeNet | FeatureListNet:
        rngs = nnx.Rngs(params=self.make_rng('params'), dropout=dropout_key)
        model = create_model(
            self.model_name, rngs=rngs, features_only=self.features_only, out_indices=self.indices, **self.nnx_kwargs()
        )
        for key, value in params_tree(model).items():
            self.put_variable('params', key, value)
        return model

    def _with_params(self, params: Any, dropout_key: jax.Array) -> NormFreeNet | FeatureListNet:
        """The definition with `params` in it, after checking that every one fits."""
        model = self._abstract()
        flat = {dotted_path(path): value for path, value in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]}
        expected = param_shapes(model)
        got = {path: tuple(jnp.shape(value)) for path, value in flat.items()}
        head_wrong = any(
            path.startswith(CLASSIFIER) and expected.get(path) != got.get(path) for path in expected.keys() | got.keys()
        )
        hint = ''
        if head_wrong:
            hint = (
                f'The classifier (head.fc) does not fit num_classes={self.num_classes}. For a fresh head load the '
                f'weights with it, linen_variables(nfnet_jax.load_checkpoint(path, num_classes={self.num_classes})), '
                "or put this module's own initialised head.fc params in place of the saved ones; num_classes=0 "
                'for no head (then drop the head.fc params).'
            )
        check_shapes(f'{type(self).__name__}({self.model_name!r}) params', expected, got, hint)
        set_flat_params(model, flat)
        nnx.reseed(model, dropout=dropout_key)
        return model

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True, output: str | None = None) -> Any:
        if self.features_only and output not in (None, 'taps'):
            raise ValueError(f"a features_only NFNet returns its taps only (output='taps'), not {output!r}")
        output = output or ('taps' if self.features_only else 'logits')
        if output not in OUTPUTS:
            raise ValueError(f'output must be one of {OUTPUTS}, got {output!r}')
        stochastic = self.drop_rate > 0 or self.drop_path_rate > 0
        has_dropout_rng = self.has_rng('dropout')
        initialising = self.is_initializing() and not self.has_variable('params', 'stem')
        if initialising and not has_dropout_rng:
            train = False  # init's output only shows the shapes; it needs no masks
        if train and stochastic and not has_dropout_rng:
            raise ValueError(
                f'{self.model_name} has dropout (drop_rate={self.drop_rate}) or drop path '
                f"(drop_path_rate={self.drop_path_rate}): train mode needs a 'dropout' RNG, a new key each "
                "step: apply(variables, x, rngs={'dropout': key}); pass train=False to evaluate"
            )
        # Without a 'dropout' RNG nothing draws (eval mode, or no dropout): the key is a placeholder.
        dropout_key = self.make_rng('dropout') if has_dropout_rng else jax.random.key(0)
        if initialising:
            model = self._initialised(dropout_key)
        else:
            model = self._with_params(self.variables.get('params', {}), dropout_key)
        model.train() if train else model.eval()
        return _forward(model, x, output, self.indices)


def linen_variables(params: nnx.Module | Mapping[str, Any]) -> dict[str, Any]:
    """Converted weights (an NNX model or its flat params) as the `{'params': ...}` of `NFNet`, string keys.

    Load a converted checkpoint with `linen_variables(nfnet_jax.load_checkpoint(path))`; to
    place it inside a parent model, put `linen_variables(...)['params']` under the submodule's name.
    """
    if isinstance(params, nnx.Module):
        params = flat_params(params)  # copies: a step that donates these must not delete the model's arrays
    return {'params': nested({path: jnp.asarray(value) for path, value in params.items()})}
