"""The Linen adapter: the same outputs and gradients as the NNX model, converted weights, use as a submodule.

Metric: max|linen - nnx| / max|nnx|, at most 1e-6 (the same computation, jitted differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import relative_error

import nfnet_jax
from nfnet_jax.linen import NFNet, linen_variables
from nfnet_jax.train import cross_entropy_loss
from nfnet_jax.weights import dotted_path, flat_params, param_shapes, save_checkpoint

RTOL = 1e-6


@pytest.fixture(scope='module')
def images():
    return jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """A converted-weights file of test_nfnet (random weights) and the NNX model loaded from it."""
    source = nfnet_jax.create_model('test_nfnet', num_classes=10, rngs=nnx.Rngs(3))
    path = tmp_path_factory.mktemp('weights') / 'test_nfnet.safetensors'
    save_checkpoint(path, flat_params(source), architecture='test_nfnet', num_classes=10, global_pool='avg')
    return path, nfnet_jax.load_checkpoint(path)


def test_converted_weights_give_the_nnx_outputs_and_gradients(converted, images):
    path, model = converted
    module = NFNet('test_nfnet', num_classes=10)
    variables = linen_variables(nfnet_jax.load_checkpoint(path))
    labels = jnp.array([1, 7])

    # Everything jitted: eager gradients of a whole network take many times longer than compiling.
    logits, pooled = jax.jit(lambda v: (module.apply(v, images), module.apply(v, images, output='pre_logits')))(
        variables
    )
    expected_logits, expected_pooled = nnx.jit(
        lambda m: (m(images), m.forward_head(m.forward_features(images), pre_logits=True))
    )(model)
    assert relative_error(logits, expected_logits) <= RTOL
    assert relative_error(pooled, expected_pooled) <= RTOL

    linen_grads = jax.jit(jax.grad(lambda v: cross_entropy_loss(module.apply(v, images), labels)))(variables)['params']
    nnx_grads = nnx.jit(nnx.grad(lambda m: cross_entropy_loss(m(images), labels)))(model)
    expected = {dotted_path(p): v.get_value() for p, v in nnx.to_flat_state(nnx_grads)}
    got = {dotted_path(p): g for p, g in jax.tree_util.tree_flatten_with_path(linen_grads)[0]}
    assert got.keys() == expected.keys()
    errors = {key: relative_error(got[key], expected[key]) for key in expected}
    assert max(errors.values()) <= RTOL, max(errors.items(), key=lambda kv: kv[1])


def test_train_mode_draws_from_the_dropout_rng(converted, images):
    module = NFNet('test_nfnet', num_classes=10, drop_rate=0.5, drop_path_rate=0.5)
    variables = linen_variables(converted[1])
    evaluated = module.apply(variables, images)
    np.testing.assert_array_equal(module.apply(variables, images), evaluated)
    first = module.apply(variables, images, train=True, rngs={'dropout': jax.random.key(1)})
    again = module.apply(variables, images, train=True, rngs={'dropout': jax.random.key(1)})
    other = module.apply(variables, images, train=True, rngs={'dropout': jax.random.key(2)})
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first, evaluated)


def test_a_submodule_of_a_linen_model(converted, images):
    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            features = NFNet('test_nfnet', num_classes=0, name='backbone')(x, train=train)
            return nn.Dense(3)(features)

    model = Classifier()
    variables = model.init(jax.random.key(0), images)
    assert set(variables['params']) == {'backbone', 'Dense_0'}
    # Converted weights go in under the submodule's name; the classifier-less backbone has no head.fc.
    backbone = {k: v for k, v in flat_params(converted[1]).items() if not k.startswith('head.fc')}
    variables = {'params': variables['params'] | {'backbone': linen_variables(backbone)['params']}}
    embedding = converted[1].forward_head(converted[1].forward_features(images), pre_logits=True)
    dense = variables['params']['Dense_0']
    expected = embedding @ dense['kernel'] + dense['bias']
    assert relative_error(model.apply(variables, images), expected) <= RTOL


def test_features_and_taps_are_the_nnx_models(converted, images):
    path, model = converted
    module = NFNet('test_nfnet', num_classes=10, out_indices=(1, 3))
    variables = linen_variables(model)
    features, taps = jax.jit(
        lambda v: (module.apply(v, images, output='features'), module.apply(v, images, output='taps'))
    )(variables)
    expected_features, expected_taps = nnx.jit(
        lambda m: (m.forward_features(images), m.forward_intermediates(images, (1, 3), intermediates_only=True))
    )(model)
    assert relative_error(features, expected_features) <= RTOL
    assert len(taps) == 2
    for got, expected in zip(taps, expected_taps, strict=True):
        assert relative_error(got, expected) <= RTOL
    with pytest.raises(ValueError, match='output must be one of'):
        module.apply(variables, images, output='embedding')


def test_a_features_only_module_has_the_nnx_param_tree_and_returns_taps(images):
    module = NFNet('test_nfnet', features_only=True, out_indices=(1, 2))
    shapes = jax.eval_shape(module.init, jax.random.key(0), images)['params']
    got = {dotted_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    nnx_model = nnx.eval_shape(lambda: nfnet_jax.create_model('test_nfnet', features_only=True, out_indices=(1, 2)))
    assert got == param_shapes(nnx_model)
    taps = jax.eval_shape(module.apply, {'params': shapes}, images)
    assert [t.shape for t in taps] == [(2, 8, 8, 32), (2, 4, 4, 64)]
    with pytest.raises(ValueError, match='features_only'):
        jax.eval_shape(lambda v: module.apply(v, images, output='logits'), {'params': shapes})


def test_name_is_linens():
    assert NFNet('test_nfnet', name='backbone').name == 'backbone'  # TypeError: multiple values for 'name', before


def test_train_mode_without_a_dropout_rng_is_an_error(converted, images):
    """Before, the masks silently came from key(0): the same at every step."""
    module = NFNet('test_nfnet', num_classes=10, drop_path_rate=0.2)
    variables = linen_variables(converted[1])
    with pytest.raises(ValueError, match="needs a 'dropout' RNG"):
        module.apply(variables, images, train=True)
    # No dropout and no drop path: nothing to draw, no RNG needed.
    shapes = jax.eval_shape(lambda v: NFNet('test_nfnet', num_classes=10).apply(v, images, train=True), variables)
    assert shapes.shape == (2, 10)


@pytest.mark.parametrize('name', ['dm_nfnet_f0', 'eca_nfnet_l0', 'nf_regnet_b0', 'nf_seresnet26'])
def test_every_family_has_the_nnx_param_tree(name, images):
    """Abstract init (shapes only): the Linen params are the NNX model's, path for path."""
    shapes = jax.eval_shape(NFNet(name).init, jax.random.key(0), images)['params']
    got = {dotted_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert got == param_shapes(nfnet_jax.models.nfnet.abstract_model(nfnet_jax.model_cfgs[name]))
