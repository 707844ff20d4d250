"""An NFNet inside a model of the user's own: training, run checkpoints, sharding and inference take it.

test_nfnet at 32x32 under a user-defined NNX model (`Net`: an NFNet backbone without classifier
and a Linear head). Metric for the inference functions: max|a - b| / max|b| against the model's
own call, at most FP32_RTOL (1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FP32_RTOL, leaves, relative_error

import nfnet_jax
from nfnet_jax import inference
from nfnet_jax.parallel import create_sharded, make_mesh
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.train import (
    TrainCheckpointer,
    TrainState,
    adaptive_clip_grad,
    classifier_paths,
    eval_step,
    nfnet_optimizer,
    train_step,
)
from nfnet_jax.weights import CheckpointError, dotted_path, flat_params

SIZE = 32
TX = nfnet_optimizer(0.1, clip_factor=None)


class Net(nnx.Module):
    """What a user writes: an NFNet backbone (no classifier) and a head of their own."""

    def __init__(self, num_classes: int = 5, architecture: str = 'test_nfnet', *, rngs: nnx.Rngs):
        self.backbone = nfnet_jax.create_model(architecture, num_classes=0, rngs=rngs)
        self.head = nnx.Linear(self.backbone.head_hidden_size, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.backbone(x))


def batch(seed: int, n: int = 2) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, SIZE, SIZE, 3)), jnp.float32), jnp.asarray(rng.integers(0, 5, n))


HEAD_ONLY = nnx.All(nnx.Param, nnx.PathContains('head'))


def make_state(seed: int = 0, **net_kwargs) -> TrainState:
    """The head trained on a frozen backbone (its train step compiles in a fraction of a full one's time)."""
    state = TrainState(Net(rngs=nnx.Rngs(seed), **net_kwargs), TX, wrt=HEAD_ONLY, ema_decay=0.9)
    nnx.update(state, jax.device_put(nnx.state(state), jax.devices()[0]))
    return state


@pytest.fixture(scope='module')
def trained():
    state = make_state()
    before = flat_params(state.model)
    metrics = [train_step(state, *batch(step)) for step in range(2)]
    return state, before, metrics


def test_train_steps_take_a_user_model_and_leave_a_frozen_backbone_alone(trained):
    state, before, metrics = trained
    assert state.step == 2 and all(np.isfinite(float(m['loss'])) for m in metrics)
    after = flat_params(state.model)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert changed == {'head.kernel', 'head.bias'}


def test_run_checkpoints_of_a_user_model_resume_and_refuse_another_backbone(trained, tmp_path):
    state = trained[0]
    with TrainCheckpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(state)  # AttributeError: 'Net' object has no attribute 'num_classes', before
        run = checkpointer.read_run(2)
        assert run['model'] == 'Net'
        assert run['nfnets'] == {
            'backbone': {'architecture': 'test_nfnet', 'num_classes': 0, 'in_chans': 3, 'global_pool': 'avg'}
        }
        resumed = make_state(seed=7)
        assert checkpointer.restore(resumed) == 2
        for a, b in zip(leaves(nnx.state(resumed)), leaves(nnx.state(state)), strict=True):
            np.testing.assert_array_equal(a, b)

        other = nnx.eval_shape(lambda: make_state(architecture='nf_regnet_b0'))
        with pytest.raises(CheckpointError, match="nf_regnet_b0 at 'backbone'"):
            checkpointer.restore(other)
        bare = nnx.eval_shape(
            lambda: TrainState(nfnet_jax.create_model('test_nfnet', num_classes=5, rngs=nnx.Rngs(0)), TX, ema_decay=0.9)
        )
        refused = "test_nfnet at 'backbone' .*; this run has test_nfnet as the model with 5 classes"
        with pytest.raises(CheckpointError, match=refused):
            checkpointer.restore(bare)


@pytest.mark.slow
def test_sharded_training_and_creation_take_a_user_model():
    mesh = make_mesh(devices=jax.devices()[:1])
    net = create_sharded(lambda: Net(rngs=nnx.Rngs(0)), mesh)
    np.testing.assert_array_equal(net.head.kernel[...], Net(rngs=nnx.Rngs(0)).head.kernel[...])
    trainer = ShardedTrainer(TrainState(net, TX), mesh)
    x, labels = batch(0)
    sharded, plain = trainer.eval_step(np.asarray(x), np.asarray(labels)), eval_step(net, x, labels)
    assert float(sharded['loss_sum']) == pytest.approx(float(plain['loss_sum']), rel=1e-5)


@pytest.fixture(scope='module')
def net():
    return Net(rngs=nnx.Rngs(1))


def test_inference_functions_take_a_user_model_and_fold_its_nfnet(net):
    x, _ = batch(3)
    classify = inference.classifier(net)
    assert relative_error(classify(x), net(x)) <= FP32_RTOL  # the reference runs eagerly: one compilation less
    assert 'rsqrt' not in str(jax.make_jaxpr(classify.apply)(classify.state, x))  # standardisation folded
    backbone = net.backbone
    expected = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
    assert relative_error(inference.embedder(net)(x), expected) <= FP32_RTOL
    # The backbone's taps, traced only (the NFNet's own feature_extractor is tested against timm's).
    extract = inference.feature_extractor(net, indices=(1, 3))
    taps = jax.eval_shape(extract.apply, extract.state, x)
    assert [t.shape for t in taps] == [(2, 8, 8, 32), (2, 2, 2, 96)]


def test_feature_extractor_takes_a_features_only_model():
    model = nfnet_jax.create_model('test_nfnet', features_only=True, out_indices=(1, 2), rngs=nnx.Rngs(0))
    x, _ = batch(4)
    got = inference.feature_extractor(model)(x)  # AttributeError: no attribute 'forward_intermediates', before
    expected = model(x)
    assert len(got) == 2
    for ours, theirs in zip(got, expected, strict=True):
        assert relative_error(ours, theirs) <= FP32_RTOL
    with pytest.raises(ValueError, match='out_indices'):
        inference.feature_extractor(model, indices=(0,))


def test_a_model_without_one_nfnet_is_refused_by_embedder():
    with pytest.raises(ValueError, match='no NFNet'):
        inference.embedder(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------- AGC


def clipped_paths(tx, model: nnx.Module) -> set[str]:
    """The params whose huge gradient AGC changes."""
    params = nnx.state(model, nnx.Param)
    huge = jax.tree.map(lambda p: 1e3 * p + 1.0, params)
    clipped, _ = jax.jit(tx.update)(huge, tx.init(params), params)
    before, after = (
        {dotted_path(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
        for tree in (huge, clipped)
    )
    return {path for path in before if not np.array_equal(before[path], after[path])}


def test_agc_finds_the_head_of_a_user_model(net):
    everything = set(flat_params(net))
    assert clipped_paths(adaptive_clip_grad(0.01, model=net), net) == everything - {'head.kernel', 'head.bias'}
    recipe = nfnet_optimizer(-1.0, model=net, weight_decay=0, momentum=0)  # updates = the clipped gradients
    assert clipped_paths(recipe, net) == everything - {'head.kernel', 'head.bias'}
    # The NFNet default (head.fc) matches nothing here: an error, where before the head was clipped silently.
    with pytest.raises(ValueError, match=r"exclude=matches\('head.*none of the 93 params.*head\.kernel"):
        adaptive_clip_grad().init(nnx.state(net, nnx.Param))
    with pytest.raises(ValueError, match="matches\\('classifier'\\)"):
        nfnet_optimizer(0.1, agc_exclude='classifier').init(nnx.state(net, nnx.Param))
    assert clipped_paths(adaptive_clip_grad(0.01, exclude=r'head\..*|stem\..*'), net) == {
        p for p in everything if not p.startswith(('head.', 'backbone.stem.'))
    }


class MlpHeadFirst(nnx.Module):
    """The head assigned before the backbone, two linear layers: the last one is the classifier."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.head = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 3, rngs=rngs))
        self.backbone = nfnet_jax.create_model('test_nfnet', num_classes=0, rngs=rngs)


class ConvHead(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.backbone = nfnet_jax.create_model('test_nfnet', num_classes=0, rngs=rngs)
        self.out = nnx.Conv(4, 3, (1, 1), rngs=rngs)


def test_the_classifier_of_a_model():
    abstract = nnx.eval_shape  # structure only
    nfnet = abstract(lambda: nfnet_jax.create_model('test_nfnet'))
    assert classifier_paths(nfnet) == ['head.fc.bias', 'head.fc.kernel']
    assert classifier_paths(abstract(lambda: MlpHeadFirst(rngs=nnx.Rngs(0)))) == [
        'head.layers.2.bias',
        'head.layers.2.kernel',
    ]
    assert classifier_paths(abstract(lambda: nfnet_jax.create_model('test_nfnet', num_classes=0))) == []
    with pytest.raises(ValueError, match='no linear classifier in ConvHead.*exclude=None'):
        adaptive_clip_grad(model=abstract(lambda: ConvHead(rngs=nnx.Rngs(0))))
