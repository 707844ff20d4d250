"""Each building block against its timm counterpart, on odd sizes, with random weights (fp32, rtol 1e-5)."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.layers as tl
import torch
import torch.nn.functional as F
from flax import nnx
from helpers import FP32_RTOL, nchw, nhwc, randomize_, relative_error
from timm.models import nfnet as timm_nfnet

from nfnet_jax.models import layers
from nfnet_jax.models.nfnet import Stem, drop_path_rates
from nfnet_jax.weights.table import CONV2D, ECA_CONV1D, GAIN


def load_ws_conv(ours: layers.ScaledStdConv2d, theirs) -> None:
    ours.kernel[...] = jnp.asarray(CONV2D.to_flax(theirs.weight.detach().numpy()))
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())
    ours.gain[...] = jnp.asarray(GAIN.to_flax(theirs.gain.detach().numpy()))


def load_plain_conv(ours: nnx.Conv, theirs) -> None:
    ours.kernel[...] = jnp.asarray(CONV2D.to_flax(theirs.weight.detach().numpy()))
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())


def assert_matches_timm(ours: nnx.Module, theirs: torch.nn.Module, x: np.ndarray) -> None:
    """Our layer on NHWC `x` gives timm's output on it (NCHW), in the same shape, within float32 tolerance."""
    expected = nhwc(theirs(nchw(x)))
    out = np.asarray(ours(jnp.asarray(x)))
    assert out.shape == expected.shape
    assert relative_error(out, expected) < FP32_RTOL


def timm_conv(same_padding: bool):
    return tl.ScaledStdConv2dSame if same_padding else tl.ScaledStdConv2d


@pytest.mark.parametrize(
    'same_padding,kernel_size,stride,groups,gamma,size',
    [
        (False, 3, 1, 1, 1.0, (13, 9)),
        (False, 3, 2, 2, 1.7139588594436646, (13, 9)),
        (False, 7, 2, 1, 1.0, (15, 12)),
        (False, 1, 1, 1, 1.7881293296813965, (7, 5)),
        (True, 3, 2, 4, 1.0, (13, 9)),
        (True, 3, 2, 1, 1.0, (12, 11)),
        (True, 3, 1, 2, 1.7015043497085571, (9, 13)),
        (True, 1, 1, 1, 1.0, (7, 5)),
    ],
)
def test_scaled_std_conv_matches_timm(same_padding, kernel_size, stride, groups, gamma, size, rng):
    theirs = timm_conv(same_padding)(8, 16, kernel_size, stride=stride, groups=groups, gamma=gamma, eps=1e-5)
    randomize_(theirs)
    ours = layers.ScaledStdConv2d(
        8,
        16,
        kernel_size,
        stride=stride,
        groups=groups,
        same_padding=same_padding,
        gamma=gamma,
        eps=1e-5,
        rngs=nnx.Rngs(0),
    )
    load_ws_conv(ours, theirs)
    x = rng.standard_normal((2, *size, 8)).astype(np.float32)
    assert_matches_timm(ours, theirs, x)


def test_standardisation_uses_biased_variance_and_eps():
    """Per output channel: mean 0, biased variance 1/(1+eps/var) of the scaled kernel."""
    conv = layers.ScaledStdConv2d(4, 6, 3, eps=0.0, rngs=nnx.Rngs(1))
    w = np.asarray(conv.standardized_kernel()) * np.sqrt(4 * 9)  # undo the fan-in scale (gamma = gain = 1)
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)), 1.0, rtol=1e-5)


def test_standardisation_gradient_reduces_rows_of_the_kernel():
    """The gradient of a 1x1 kernel's standardisation reduces a 2-D (kh * kw * in, out) view.

    On the 4-D kernel, the gradient of the broadcast mean reduces the input-channel axis alone,
    a slow path of XLA:CPU's reductions (change 7 in docs/performance.md).
    """
    conv = layers.ScaledStdConv2d(48, 64, 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(conv)

    def gradient(params, cotangent):
        _, pullback = jax.vjp(lambda params: nnx.merge(graphdef, params).standardized_kernel(), params)
        return pullback(cotangent)

    text = jax.jit(gradient).lower(params, jnp.ones((1, 1, 48, 64))).as_text()
    reduced = re.findall(r'stablehlo\.reduce\(.*across dimensions = \[[\d, ]+\] : \(tensor<([\dx]+)xf32>', text)
    assert reduced, text
    assert all(shape.count('x') == 1 for shape in reduced), reduced


def test_same_padding_pads_bottom_right_like_tensorflow():
    """A 3x3 stride-2 SAME conv on an even size reads no pixel above/left of the image."""
    conv = layers.ScaledStdConv2d(1, 1, 3, stride=2, same_padding=True, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
    symmetric = layers.ScaledStdConv2d(1, 1, 3, stride=2, rngs=nnx.Rngs(0))
    # SAME: output (0, 0) sees rows/cols 0..2 with the pixel under kernel tap (0, 0).
    k = np.asarray(conv.standardized_kernel())[:, :, 0, 0]
    assert np.isclose(float(conv(x)[0, 0, 0, 0] - conv.bias[...][0]), k[0, 0], atol=1e-6)
    # Symmetric padding: the same pixel sits under tap (1, 1).
    assert np.isclose(float(symmetric(x)[0, 0, 0, 0] - symmetric.bias[...][0]), k[1, 1], atol=1e-6)


@pytest.mark.parametrize('channels,rd_ratio,rd_divisor', [(64, 0.5, 8), (96, 0.25, 8), (256, 1 / 16, 8), (40, 0.5, 8)])
def test_squeeze_excite_matches_timm(channels, rd_ratio, rd_divisor, rng):
    theirs = tl.SEModule(channels, rd_ratio=rd_ratio, rd_divisor=rd_divisor)
    randomize_(theirs)
    ours = layers.SqueezeExcite(channels, rd_ratio=rd_ratio, rd_divisor=rd_divisor, rngs=nnx.Rngs(0))
    assert ours.fc1.out_features == theirs.fc1.out_channels
    load_plain_conv(ours.fc1, theirs.fc1)
    load_plain_conv(ours.fc2, theirs.fc2)
    x = rng.standard_normal((2, 5, 7, channels)).astype(np.float32)
    assert_matches_timm(ours, theirs, x)


@pytest.mark.parametrize('channels', [16, 64, 256, 1536, 3072])
def test_eca_matches_timm(channels, rng):
    theirs = tl.EcaModule(channels)
    randomize_(theirs)
    ours = layers.EcaModule(channels, rngs=nnx.Rngs(0))
    assert ours.conv.kernel.shape[0] == theirs.conv.kernel_size[0]
    ours.conv.kernel[...] = jnp.asarray(ECA_CONV1D.to_flax(theirs.conv.weight.detach().numpy()))
    x = rng.standard_normal((2, 3, 5, channels)).astype(np.float32)
    assert_matches_timm(ours, theirs, x)


@pytest.mark.parametrize('stride,size', [(2, (13, 9)), (2, (12, 12)), (2, (1, 3)), (1, (7, 5))])
def test_downsample_avg_matches_timm_on_odd_sizes(stride, size, rng):
    theirs = timm_nfnet.DownsampleAvg(8, 16, stride=stride, conv_layer=partial(tl.ScaledStdConv2d, eps=1e-5))
    randomize_(theirs)
    conv_layer = partial(layers.ScaledStdConv2d, eps=1e-5)
    ours = layers.DownsampleAvg(8, 16, stride, conv_layer, rngs=nnx.Rngs(0))
    load_ws_conv(ours.conv, theirs.conv)
    x = rng.standard_normal((2, *size, 8)).astype(np.float32)
    assert_matches_timm(ours, theirs, x)


def test_avg_pool_ceil_averages_only_covered_pixels():
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    out = np.asarray(layers.avg_pool_ceil(x))[0, :, :, 0]
    np.testing.assert_allclose(out, [[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8.0]])


@pytest.mark.parametrize(
    'stem_type,act,gamma_in_act,same_padding,size',
    [
        ('deep_quad', 'gelu', True, True, (67, 53)),
        ('deep_quad', 'silu', False, False, (67, 53)),
        ('3x3', 'silu', False, False, (33, 30)),
        ('7x7_pool', 'relu', False, False, (67, 53)),
        ('deep', 'relu', False, False, (21, 18)),
        ('deep_tiered', 'relu', False, False, (21, 18)),
        ('deep_pool', 'relu', False, False, (21, 18)),
    ],
)
def test_stems_match_timm_with_feature_tap(stem_type, act, gamma_in_act, same_padding, size, rng):
    gamma = layers.NONLIN_GAMMA[act]
    timm_conv_layer = partial(timm_conv(same_padding), eps=1e-5, gamma=1.0 if gamma_in_act else gamma)
    timm_act = timm_nfnet.act_with_gamma(act, gamma) if gamma_in_act else tl.get_act_layer(act)
    theirs, stride, feature = timm_nfnet.create_stem(3, 64, stem_type, conv_layer=timm_conv_layer, act_layer=timm_act)
    randomize_(theirs)
    conv_layer = partial(
        layers.ScaledStdConv2d, same_padding=same_padding, eps=1e-5, gamma=1.0 if gamma_in_act else gamma
    )
    act_layer = partial(layers.GammaAct, act, gamma if gamma_in_act else 1.0)
    ours = Stem(3, 64, stem_type, conv_layer, act_layer, rngs=nnx.Rngs(0))
    for name, module in theirs.named_children():
        if isinstance(module, tl.ScaledStdConv2d | tl.ScaledStdConv2dSame):
            load_ws_conv(getattr(ours, name), module)
    assert ours.stride == stride
    assert f'stem.{ours.feature_layer}' == feature['module'] and ours.feature_chs == feature['num_chs']

    x = rng.standard_normal((2, *size, 3)).astype(np.float32)
    t = nchw(x)
    tap = None
    for name, module in theirs.named_children():
        t = module(t)
        if f'stem.{name}' == feature['module']:
            tap = t
    out, out_tap = ours(jnp.asarray(x))
    assert relative_error(out, nhwc(t)) < FP32_RTOL
    assert relative_error(out_tap, nhwc(tap)) < FP32_RTOL


TORCH_ACTIVATIONS = {
    'identity': lambda x: x,
    'celu': F.celu,
    'elu': F.elu,
    'gelu': F.gelu,
    'leaky_relu': F.leaky_relu,
    'log_sigmoid': F.logsigmoid,
    'log_softmax': lambda x: F.log_softmax(x, dim=1),  # over channels: the last axis in NHWC
    'relu': F.relu,
    'relu6': F.relu6,
    'selu': F.selu,
    'sigmoid': torch.sigmoid,
    'silu': F.silu,
    'softsign': F.softsign,
    'softplus': F.softplus,
    'tanh': torch.tanh,
}


def test_every_gamma_has_an_activation():
    assert layers.ACTIVATIONS.keys() == layers.NONLIN_GAMMA.keys() == TORCH_ACTIVATIONS.keys()


@pytest.mark.parametrize('act', sorted(layers.ACTIVATIONS))
def test_activations_match_torch(act, rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32) * 3
    expected = nhwc(TORCH_ACTIVATIONS[act](nchw(x)))
    np.testing.assert_allclose(layers.GammaAct(act)(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('pool_type', ['avg', 'max', 'avgmax', 'catavgmax', 'fastavg'])
def test_global_pool_matches_timm(pool_type, rng):
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    theirs = tl.SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
    ours = layers.global_pool(jnp.asarray(x), pool_type)
    assert relative_error(ours, theirs(nchw(x)).numpy()) < FP32_RTOL
    assert ours.shape[-1] == 8 * layers.pool_feature_multiplier(pool_type)


def test_global_pool_rejects_unknown_type():
    with pytest.raises(ValueError, match='unknown global_pool'):
        layers.global_pool(jnp.zeros((1, 2, 2, 3)), 'median')


def test_make_divisible_matches_timm():
    for v in np.linspace(1, 3000, 997):
        for divisor, round_limit in ((8, 0.9), (8, 0.0), (1, 0.9)):
            assert layers.make_divisible(v, divisor, round_limit=round_limit) == tl.make_divisible(
                v, divisor, round_limit=round_limit
            )


@pytest.mark.parametrize('indices', [None, 1, 3, 5, (0, 2), (-1,), (-2, -1), [0, 1, 2, 3, 4]])
def test_feature_take_indices_matches_timm(indices):
    from timm.models._features import feature_take_indices

    take, max_index = feature_take_indices(5, indices)
    assert layers.feature_take_indices(5, indices) == (list(take), max_index)


@pytest.mark.parametrize('rate,depths', [(0.0, (1, 2, 6, 3)), (0.25, (1, 2, 6, 3)), (0.1, (8, 16, 48, 24))])
def test_drop_path_rates_match_timm(rate, depths):
    ours = drop_path_rates(rate, depths)
    theirs = tl.calculate_drop_path_rates(rate, list(depths), stagewise=True)
    assert [len(stage) for stage in ours] == [len(stage) for stage in theirs]
    for our_stage, their_stage in zip(ours, theirs, strict=True):  # torch.linspace rounds some last bits differently
        assert our_stage == pytest.approx(their_stage, rel=1e-6, abs=1e-9)


def test_drop_path_is_identity_in_eval_and_scales_by_keep_in_train():
    drop = layers.DropPath(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((4096, 2, 2, 3))
    assert drop(x) is x  # eval mode (the default)
    drop.deterministic = False
    out = np.asarray(drop(x))
    per_sample = out.reshape(4096, -1)
    assert set(np.unique(per_sample)) == {0.0, 2.0}  # whole samples dropped, survivors scaled by 1/keep
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    assert 0.45 < (per_sample[:, 0] > 0).mean() < 0.55
