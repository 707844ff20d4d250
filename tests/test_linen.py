"""The Linen adapter: the same outputs and gradients as the NNX model, converted weights, use as a submodule.

Metric: max|linen - nnx| / max|nnx|, at most 1e-6 (the same computation, jitted differently).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx, serialization, traverse_util
from helpers import relative_error

import nfnet_jax
from nfnet_jax.linen import NFNet, linen_variables
from nfnet_jax.train import adaptive_clip_grad, cross_entropy_loss
from nfnet_jax.weights import StateMismatchError, dotted_path, flat_params, param_shapes, save_checkpoint

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
    evaluated = module.apply(variables, images, train=False)
    np.testing.assert_array_equal(module.apply(variables, images, train=False), evaluated)
    # train=True is the default (Flax's example models): a trainer that does not pass it trains.
    first = module.apply(variables, images, rngs={'dropout': jax.random.key(1)})
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
    with pytest.raises(ValueError, match="needs a 'dropout' RNG.*pass train=False to evaluate"):
        module.apply(variables, images)  # train mode, the default
    # No dropout and no drop path: nothing to draw, no RNG needed.
    shapes = jax.eval_shape(lambda v: NFNet('test_nfnet', num_classes=10).apply(v, images, train=True), variables)
    assert shapes.shape == (2, 10)


@pytest.mark.parametrize('name', ['dm_nfnet_f0', 'eca_nfnet_l0', 'nf_regnet_b0', 'nf_seresnet26'])
def test_every_family_has_the_nnx_param_tree(name, images):
    """Abstract init (shapes only): the Linen params are the NNX model's, path for path."""
    shapes = jax.eval_shape(NFNet(name).init, jax.random.key(0), images)['params']
    got = {dotted_path(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert got == param_shapes(nfnet_jax.models.nfnet.abstract_model(nfnet_jax.model_cfgs[name]))


def shapes_of(module: NFNet, images: jax.Array) -> dict:
    """The params a module defines, as ShapeDtypeStructs (abstract init)."""
    return jax.eval_shape(module.init, jax.random.key(0), images)['params']


def apply_error(module: NFNet, params: dict, images: jax.Array) -> str:
    """The StateMismatchError message of applying `params` (traced abstractly: the check runs at trace time)."""
    with pytest.raises(StateMismatchError) as error:
        jax.eval_shape(lambda p: module.apply({'params': p}, images, train=False), params)
    return str(error.value)


def test_a_1000_class_head_into_a_10_class_module_raises_naming_the_head(images):
    """Before, it ran and returned (2, 1000): the pretrained head trained on 10 labels."""
    message = apply_error(NFNet('test_nfnet', num_classes=10), shapes_of(NFNet('test_nfnet'), images), images)
    assert '0 missing, 0 unexpected, 2 mis-shaped' in message
    assert 'head.fc.kernel: got (192, 1000), expected (192, 10)' in message
    assert 'head.fc.bias: got (1000,), expected (10,)' in message
    assert 'load_checkpoint(path, num_classes=10)' in message  # how to get a fresh head


def test_a_wrong_kernel_and_missing_or_extra_params_raise_one_error_naming_each(images):
    """Before: a 5x5 stem kernel ran; a missing or extra param failed with errors naming nothing."""
    module = NFNet('test_nfnet', num_classes=10)
    params = shapes_of(module, images)
    flat = traverse_util.flatten_dict(params, sep='.')
    stem_kernel = next(path for path in flat if path.startswith('stem.') and path.endswith('kernel'))
    kernel = flat[stem_kernel]
    flat[stem_kernel] = jax.ShapeDtypeStruct((5, 5, *kernel.shape[2:]), kernel.dtype)
    del flat['stages.0.0.conv1.bias']
    flat['stages.0.0.extra.kernel'] = kernel
    message = apply_error(module, traverse_util.unflatten_dict(flat, sep='.'), images)
    assert '1 missing, 1 unexpected, 1 mis-shaped' in message
    assert f'{stem_kernel}: got (5, 5, {kernel.shape[2]}, {kernel.shape[3]}), expected {kernel.shape}' in message
    assert 'missing: stages.0.0.conv1.bias' in message
    assert 'unexpected: stages.0.0.extra.kernel' in message
    assert 'head.fc' not in message  # no head hint where the head fits


@pytest.fixture(scope='module')
def module_outputs(converted, images):
    """The 10-class module's params (string keys) and its eval logits."""
    module = NFNet('test_nfnet', num_classes=10)
    params = linen_variables(converted[1])['params']
    return module, params, jax.jit(lambda p: module.apply({'params': p}, images, train=False))


def test_params_have_string_keys_and_any_linen_round_trip_applies(module_outputs, images, tmp_path):
    """Before: integer keys; flatten_dict(sep='/') raised and a to_state_dict tree was refused ('Invalid key: 0')."""
    module, params, apply = module_outputs
    flat = traverse_util.flatten_dict(params, sep='/')
    assert all(isinstance(part, str) for key in traverse_util.flatten_dict(params) for part in key)
    assert 'stages/0/0/conv1/kernel' in flat
    expected = apply(params)
    legacy = {'stages': {int(k): {int(b): v for b, v in s.items()} for k, s in params['stages'].items()}}
    trees = {
        'unflatten_dict': traverse_util.unflatten_dict(flat, sep='/'),
        'to_state_dict': serialization.to_state_dict(params),
        'msgpack': serialization.msgpack_restore(serialization.msgpack_serialize(params)),
        'integer keys (earlier versions)': params | legacy,
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / 'params', params)
    with ocp.StandardCheckpointer() as checkpointer:
        trees['orbax, restored without a target'] = checkpointer.restore(tmp_path / 'params')
    for how, tree in trees.items():
        np.testing.assert_array_equal(apply(tree), expected, err_msg=how)


def test_output_all_is_each_output_in_one_pass(converted, images):
    module = NFNet('test_nfnet', num_classes=10, out_indices=(1, 3))
    variables = linen_variables(converted[1])

    def every_output(v):
        separate = {
            name: module.apply(v, images, train=False, output=name)
            for name in ('logits', 'pre_logits', 'features', 'taps')
        }
        return module.apply(v, images, train=False, output='all'), separate

    together, separate = jax.jit(every_output)(variables)
    assert together.keys() == separate.keys()
    for name in separate:
        for got, expected in zip(jax.tree.leaves(together[name]), jax.tree.leaves(separate[name]), strict=True):
            assert relative_error(got, expected) <= RTOL, name
    assert len(together['taps']) == 2


def test_agc_finds_the_head_of_a_linen_nfnet_and_of_a_linen_params_tree(images):
    """Before, model= took NNX modules only: a Linen user wrote a regex for the head."""

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
            return nn.Dense(3, name='head')(NFNet('test_nfnet', num_classes=0, name='backbone')(x, train=train))

    nfnet = NFNet('test_nfnet', num_classes=10)
    tree = {'params': jax.tree.map(jnp.ones_like, shapes_of(nfnet, images))}
    user = {
        'params': jax.tree.map(jnp.ones_like, jax.eval_shape(Classifier().init, jax.random.key(0), images)['params'])
    }
    for model, params, head in ((nfnet, tree, 'head.fc'), (user['params'], user, 'head')):
        agc = adaptive_clip_grad(model=model)
        grads = jax.tree.map(lambda p: 1e3 * p, params)
        clipped, _ = agc.update(grads, agc.init(params), params)
        kept = {
            path
            for path, (g, c) in traverse_util.flatten_dict(jax.tree.map(lambda *x: x, grads, clipped), sep='.').items()
            if np.array_equal(g, c)
        }
        assert kept == {f'params.{head}.kernel', f'params.{head}.bias'}
    with pytest.raises(ValueError, match='found no linear classifier'):
        adaptive_clip_grad(model=NFNet('test_nfnet', num_classes=0))
    with pytest.raises(ValueError, match='pass its params tree'):
        adaptive_clip_grad(model=Classifier())
