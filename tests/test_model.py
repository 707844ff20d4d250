"""The model's public surface: names, jit, heads against timm, dtypes and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from helpers import FP32_RTOL, nchw, randomize_, relative_error

import nfnet_jax
from nfnet_jax.factory import from_timm


@pytest.fixture(scope='module')
def model() -> nfnet_jax.NormFreeNet:
    return nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0))


@pytest.fixture
def x(rng) -> np.ndarray:
    return rng.standard_normal((2, 35, 29, 3)).astype(np.float32)


def test_list_models_filters_like_timm():
    assert nfnet_jax.list_models('eca_nfnet_*') == ['eca_nfnet_l0', 'eca_nfnet_l1', 'eca_nfnet_l2', 'eca_nfnet_l3']
    assert nfnet_jax.list_models('dm_*', pretrained=True) == [f'dm_nfnet_f{i}.dm_in1k' for i in range(7)]
    assert len(nfnet_jax.list_models(pretrained=True)) == 14


def test_unknown_names_get_suggestions():
    with pytest.raises(ValueError, match=r"unknown model 'dm_nfnet_f9'.*dm_nfnet_f"):
        nfnet_jax.create_model('dm_nfnet_f9')
    with pytest.raises(ValueError, match=r"unknown tag 'in22k' for eca_nfnet_l0.*eca_nfnet_l0.ra2_in1k"):
        nfnet_jax.create_model('eca_nfnet_l0.in22k')


def test_tag_sets_the_pretrained_config():
    assert nfnet_jax.create_model('test_nfnet.r160_in1k').pretrained_cfg.mean == (0.5, 0.5, 0.5)
    assert nfnet_jax.create_model('test_nfnet').pretrained_cfg.name == 'test_nfnet.r160_in1k'


def test_jit_through_nnx_and_split_merge_equals_eager(model, x):
    eager = np.asarray(model(x))
    jitted = nnx.jit(lambda m, images: m(images))(model, x)
    graphdef, state = nnx.split(model)
    pure = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))(state, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pure, eager, rtol=1e-5, atol=1e-6)
    features = nnx.jit(lambda m, images: m.forward_features(images))(model, x)
    assert features.shape == (2, 2, 1, model.num_features)


@pytest.mark.parametrize(
    'global_pool,num_classes,in_chans', [('avg', 7, 3), ('max', 5, 1), ('avgmax', 0, 3), ('catavgmax', 11, 2)]
)
def test_heads_and_input_channels_match_timm(global_pool, num_classes, in_chans, rng):
    theirs = timm.create_model('test_nfnet', global_pool=global_pool, num_classes=num_classes, in_chans=in_chans)
    randomize_(theirs.eval())
    ours = from_timm(theirs)
    assert (ours.num_classes, ours.global_pool, ours.in_chans) == (num_classes, global_pool, in_chans)
    x = rng.standard_normal((2, 40, 33, in_chans)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(nchw(x)).numpy()
    out = ours(x)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= FP32_RTOL


def test_unpooled_head_keeps_the_map(x):
    model = nfnet_jax.create_model('test_nfnet', num_classes=0, global_pool='')
    assert model(x).shape == (2, 2, 1, model.num_features)


def test_reset_classifier_replaces_the_head(x):
    model = nfnet_jax.create_model('test_nfnet')
    model.reset_classifier(3, 'catavgmax', rngs=nnx.Rngs(1))
    assert model(x).shape == (2, 3)
    assert model.head.fc.kernel.shape == (2 * model.num_features, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 2 * model.num_features)


def test_bfloat16_compute_keeps_float32_params(x):
    model = nfnet_jax.create_model('test_nfnet', dtype=jnp.bfloat16)
    assert model(x).dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype('float32')}


def test_drop_path_rates_follow_timm():
    model = nfnet_jax.create_model('test_nfnet', drop_path_rate=0.3)
    theirs = timm.create_model('test_nfnet', drop_path_rate=0.3)
    ours_rates = [block.drop_path.rate if block.drop_path else 0.0 for stage in model.stages for block in stage]
    timm_rates = [getattr(block.drop_path, 'drop_prob', 0.0) for stage in theirs.stages for block in stage]
    assert ours_rates == pytest.approx(timm_rates, rel=1e-6)  # torch.linspace rounds differently in the last bit


@pytest.mark.parametrize(
    'shape,dtype,error,message',
    [
        ((2, 3, 35, 29), np.float32, ValueError, 'looks like NCHW'),
        ((2, 35, 29, 4), np.float32, ValueError, 'with 3 channels'),
        ((35, 29, 3), np.float32, ValueError, '4-D NHWC'),
        ((2, 35, 29, 3), np.uint8, TypeError, 'floating-point'),
    ],
)
def test_bad_input_is_explained(model, shape, dtype, error, message):
    bad = np.zeros(shape, dtype)
    for call in (model, model.forward_features, model.forward_intermediates):
        with pytest.raises(error, match=message):
            call(bad)


def test_a_list_or_a_negative_class_count_is_explained(model):
    with pytest.raises(TypeError, match='got a list; convert it with jnp.asarray'):
        model(np.zeros((1, 32, 32, 3), np.float32).tolist())
    with pytest.raises(ValueError, match='num_classes must be a whole number, 0 or more'):
        nfnet_jax.create_model('test_nfnet', num_classes=-5)


def test_forward_intermediates_indices_and_stop_early(model, x):
    final, taps = model.forward_intermediates(x)
    assert [t.shape[-1] for t in taps] == [info['num_chs'] for info in model.feature_info]
    np.testing.assert_array_equal(final, model.forward_features(x))
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    np.testing.assert_array_equal(last_two[0], taps[3])
    early_x, early = model.forward_intermediates(x, indices=[0, -4], stop_early=True)
    np.testing.assert_array_equal(early[1], taps[1])
    assert early_x.shape == taps[1].shape  # stopped after stage 0, before the final activation
