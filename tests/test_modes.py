"""Train and eval modes as Flax switches them (nnx.view, train()/eval(), set_attributes), call-time rngs,
per-block gradient checkpointing, and the random initialisation drawn on the host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_params

import nfnet_jax
from nfnet_jax.models.layers import DropPath
from nfnet_jax.weights.params import flat_params, set_flat_params


@pytest.fixture(scope='module')
def model() -> nfnet_jax.NormFreeNet:
    """test_nfnet with drop path only (no head dropout) and random weights, so every residual branch speaks."""
    model = nfnet_jax.create_model('test_nfnet', drop_path_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    set_flat_params(model, random_params(flat_params(model)))
    return model


@pytest.fixture(scope='module')
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)


def test_view_in_train_mode_runs_drop_path(model, x):
    assert model.head.drop.rate == 0.0  # only drop path can change the output
    train = nnx.view(model, deterministic=False)
    assert all(not m.deterministic for _, m in nnx.iter_modules(train) if isinstance(m, DropPath))
    first, second = np.asarray(train(x)), np.asarray(train(x))
    assert not np.allclose(first, second)  # a new mask per call: the model's own streams advance
    evaluation = nnx.view(train, deterministic=True)
    np.testing.assert_array_equal(evaluation(x), evaluation(x))
    np.testing.assert_array_equal(evaluation(x), model(x))  # the model itself stayed in eval mode


def test_train_eval_and_set_attributes_switch_drop_path(x):
    model = nfnet_jax.create_model('test_nfnet', drop_path_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    drop_paths = [m for _, m in nnx.iter_modules(model) if isinstance(m, DropPath)]
    model.train()
    assert drop_paths and not any(m.deterministic for m in drop_paths)
    model.eval()
    assert all(m.deterministic for m in drop_paths)
    model.set_attributes(deterministic=False)
    assert not any(m.deterministic for m in drop_paths)


def test_call_time_rngs_are_reproducible(model, x):
    train = nnx.view(model, deterministic=False)
    once = np.asarray(train(x, rngs=nnx.Rngs(dropout=1)))
    np.testing.assert_array_equal(train(x, rngs=nnx.Rngs(dropout=1)), once)
    np.testing.assert_array_equal(train(x, rngs=jax.random.key(1)), once)  # a bare key seeds the 'dropout' stream
    assert not np.allclose(train(x, rngs=nnx.Rngs(dropout=2)), once)
    np.testing.assert_array_equal(model(x, rngs=nnx.Rngs(dropout=1)), model(x))  # eval mode ignores them


def test_drop_path_without_any_rngs_is_explained():
    drop = DropPath(0.5)
    with pytest.raises(ValueError, match=r'call it with rngs=nnx.Rngs\(dropout=seed\)'):
        drop(jnp.ones((2, 3)), deterministic=False)


def loss_and_grads(model: nnx.Module, x: np.ndarray, rngs_seed: int) -> tuple[jax.Array, nnx.State]:
    def loss(model: nnx.Module) -> jax.Array:
        return jnp.mean(model(x, rngs=nnx.Rngs(dropout=rngs_seed)) ** 2)

    return nnx.jit(nnx.value_and_grad(loss))(model)


def test_grad_checkpointing_keeps_the_gradients(model, x):
    train = nnx.view(model, deterministic=False)  # drop path on: the rematerialised masks must be the same
    plain_loss, plain = loss_and_grads(train, x, 3)
    remat = nnx.clone(train)
    remat.set_grad_checkpointing(True)
    remat_loss, grads = loss_and_grads(remat, x, 3)
    step = jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(x, rngs=nnx.Rngs(dropout=3)))))(remat)
    assert 'remat' in str(step)  # jax.checkpoint's primitive: the blocks are rematerialised
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_grad_checkpointing_keeps_less_for_the_backward_pass():
    """What the training step's backward pass holds from the forward (jax.vjp's residuals, shapes only)."""
    from benchmarks.remat_memory import abstract_training, residual_bytes

    plain, remat = (residual_bytes(*abstract_training('test_nfnet', 96, 8, remat)) for remat in (False, True))
    assert remat < 0.8 * plain, (remat, plain)  # test_nfnet has one block per stage; dm_nfnet_f3 keeps 1/6


def test_create_model_takes_grad_checkpointing():
    model = nfnet_jax.create_model('test_nfnet', grad_checkpointing=True)
    assert model.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def test_random_init_compiles_no_draw_and_is_deterministic():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kwargs: (
            compiles.append(event) if event == '/jax/core/compile/backend_compile_duration' else None
        )
    )
    first = nfnet_jax.create_model('test_nfnet', num_classes=13, rngs=nnx.Rngs(5))  # a head no other test compiled
    assert len(compiles) <= 5, len(compiles)  # at most the rng streams' key updates, no draw per weight shape
    again = flat_params(nfnet_jax.create_model('test_nfnet', num_classes=13, rngs=nnx.Rngs(5)))
    other = flat_params(nfnet_jax.create_model('test_nfnet', num_classes=13, rngs=nnx.Rngs(6)))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(first)))  # on the device
    for path, value in flat_params(first).items():
        np.testing.assert_array_equal(again[path], value)
    kernel = 'stages.1.0.conv2.kernel'
    assert not np.array_equal(other[kernel], again[kernel])
    fan_in = np.prod(again[kernel].shape[:-1])
    assert np.std(again[kernel]) == pytest.approx(fan_in**-0.5, rel=0.1)  # kaiming normal, fan in, as timm
    assert np.std(again['head.fc.kernel']) == pytest.approx(0.01, rel=0.1)  # timm's classifier init
    assert not np.any(again['stages.1.0.conv3.gain'])  # every residual branch starts silent


def test_host_and_traced_draws_follow_the_same_distributions():
    """The numpy draws of `init_model` and the jax.random draws of a traced build: the same laws, per initialiser."""
    from nfnet_jax.models import initializers

    shape = (3, 3, 64, 256)
    cases = {
        'kaiming_normal': (initializers.kaiming_normal, (0.0, (3 * 3 * 64) ** -0.5)),
        'torch_conv_default': (initializers.torch_conv_default, (0.0, (3 * 3 * 64) ** -0.5 / np.sqrt(3))),
        'normal(0.01)': (initializers.normal(0.01), (0.0, 0.01)),
    }
    for name, (init, (mean, std)) in cases.items():
        traced = np.asarray(jax.jit(lambda key, init=init: init(key, shape, jnp.float32))(jax.random.key(0)))
        with initializers.drawing_on_host(np.random.default_rng(0)):
            host = init(None, shape, jnp.float32)
            assert init(None, (2,), jnp.bfloat16).dtype == jnp.bfloat16, name
        assert isinstance(host, np.ndarray), name
        for sample in (traced, host):
            assert abs(sample.mean() - mean) < 0.01 * std, name
            assert sample.std() == pytest.approx(std, rel=0.01), name
        if name == 'torch_conv_default':
            bound = (3 * 3 * 64) ** -0.5
            assert host.max() <= bound and traced.min() >= -bound, name
    with initializers.drawing_on_host(np.random.default_rng(0)):
        assert isinstance(initializers.constant(0.5)(None, (4,), jnp.float32), np.ndarray)
    assert isinstance(initializers.constant(0.5)(None, (4,), jnp.float32), jax.Array)  # the block restored jax draws


def test_linen_grad_checkpointing_keeps_the_gradients(model, x):
    from nfnet_jax.linen import NFNet, linen_variables

    params = linen_variables(model)['params']

    def grads(module: NFNet) -> dict:
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x, train=False))))(params)
        grad = jax.jit(jax.grad(lambda p: jnp.mean(module.apply({'params': p}, x, train=False) ** 2)))(params)
        return grad, str(jaxpr)

    plain, plain_jaxpr = grads(NFNet('test_nfnet', drop_path_rate=0.5))
    remat, remat_jaxpr = grads(NFNet('test_nfnet', drop_path_rate=0.5, grad_checkpointing=True))
    assert 'remat' in remat_jaxpr and 'remat' not in plain_jaxpr
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
