"""The building blocks of normalizer-free networks, ported from timm's layers.

Arrays are NHWC and conv kernels HWIO. Every formula follows timm 1.0.31 (not DeepMind's
Haiku code) because the converted timm weights are only correct under timm's numerics;
where the two differ the docstring says so. Statistics (weight standardisation, pooling)
are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfnet_jax.models import initializers

Array = jax.Array
Dtype = Any  # a jnp dtype or None, as in flax.nnx layers
# The matmul/conv precision of every layer that does one: None (JAX's default, which follows
# `jax.default_matmul_precision`), 'default', 'high' or 'highest' (see docs/inference.md, "Precision").
Precision = str | None
PRECISIONS = (None, 'default', 'high', 'highest')


def check_precision(precision: Precision) -> Precision:
    """`precision` if it is one of PRECISIONS, else a ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f'unknown precision {precision!r}; choose one of {PRECISIONS}')
    return precision


# Gains that restore unit variance after each non-linearity (timm's `_nonlin_gamma`,
# measured by DeepMind for inputs drawn from N(0, 1)).
NONLIN_GAMMA: dict[str, float] = {
    'identity': 1.0,
    'celu': 1.270926833152771,
    'elu': 1.2716004848480225,
    'gelu': 1.7015043497085571,
    'leaky_relu': 1.70590341091156,
    'log_sigmoid': 1.9193484783172607,
    'log_softmax': 1.0002083778381348,
    'relu': 1.7139588594436646,
    'relu6': 1.7131484746932983,
    'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291,
    'silu': 1.7881293296813965,
    'softsign': 2.338853120803833,
    'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204,
}


def gelu(x: Array) -> Array:
    """PyTorch's exact GELU, `x * 0.5 * (1 + erf(x / sqrt(2)))`, term for term.

    jax.nn.gelu defaults to the tanh approximation, which moves dm_nfnet logits by ~3e-4; its
    exact form goes through erfc, which XLA:CPU expands into several costlier passes, for the same
    values within ~1e-7.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


# The PyTorch functions behind each name.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'identity': lambda x: x,
    'celu': jax.nn.celu,
    'elu': jax.nn.elu,
    'gelu': gelu,
    'leaky_relu': lambda x: jax.nn.leaky_relu(x, 0.01),
    'log_sigmoid': jax.nn.log_sigmoid,
    'log_softmax': jax.nn.log_softmax,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'selu': jax.nn.selu,
    'sigmoid': jax.nn.sigmoid,
    'silu': jax.nn.silu,
    'softsign': jax.nn.soft_sign,
    'softplus': jax.nn.softplus,
    'tanh': jnp.tanh,
}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of `divisor` exactly as timm does."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def symmetric_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """PyTorch-style padding on each side, as timm's `get_padding` computes it."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class GammaAct(nnx.Module):
    """An activation followed by a constant gain: `act(x) * gamma`.

    With gamma = 1 this is the plain activation used by the models that fold gamma
    into their convolutions instead (every NF model but the dm_ ones).
    """

    def __init__(self, act_type: str = 'relu', gamma: float = 1.0):
        if act_type not in ACTIVATIONS:
            raise ValueError(f'unknown activation {act_type!r}; known: {sorted(ACTIVATIONS)}')
        self.act_type = act_type
        self.gamma = gamma

    def __call__(self, x: Array) -> Array:
        x = ACTIVATIONS[self.act_type](x)
        return x if self.gamma == 1.0 else x * self.gamma


class ScaledStdConv2d(nnx.Module):
    """Weight-standardised 2-D convolution (timm's ScaledStdConv2d / ScaledStdConv2dSame).

    `w_hat = (w - mean) / sqrt(var + eps) * gain * gamma / sqrt(fan_in)`, with the mean and
    the BIASED variance taken per output channel over (kh, kw, in/groups). This is timm's
    formula; DeepMind's `rsqrt(max(var * fan_in, 1e-4))` differs by ~3% on the logits.

    `same_padding=True` pads like TensorFlow's SAME (extra pixel bottom/right), which is what
    the dm_ models were trained with; otherwise padding is PyTorch's symmetric padding.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        same_padding: bool = False,
        gamma: float = 1.0,
        eps: float = 1e-6,
        gain_init: float = 1.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        precision: Precision = None,
        rngs: nnx.Rngs,
    ):
        if in_chs % groups or out_chs % groups:
            raise ValueError(f'channels ({in_chs} -> {out_chs}) must be divisible by groups ({groups})')
        kernel_shape = (kernel_size, kernel_size, in_chs // groups, out_chs)
        self.kernel = nnx.Param(initializers.kaiming_normal(rngs.params(), kernel_shape, param_dtype))
        self.bias = nnx.Param(initializers.zeros(None, (out_chs,), param_dtype))
        self.gain = nnx.Param(initializers.constant(gain_init)(None, (out_chs,), param_dtype))
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.folded = False  # see fold_standardization
        self.scale = gamma * initializers.fan_in(kernel_shape) ** -0.5
        self.eps = eps
        self.dtype = dtype
        self.precision = check_precision(precision)
        if same_padding:
            self.padding: str | tuple[tuple[int, int], tuple[int, int]] = 'SAME'
        else:
            pad = symmetric_padding(kernel_size, stride, dilation)
            self.padding = ((pad, pad), (pad, pad))

    def standardized_kernel(self) -> Array:
        """The effective HWIO kernel, computed in float32 from the raw parameters (stored as is once folded)."""
        if self.folded:
            return self.kernel[...]
        w = self.kernel[...].astype(jnp.float32)
        # The statistics run on a (kh * kw * in, out) view: on 4-D 1x1 kernels, the gradient's
        # reduction over the input channels alone hits a slow path of XLA:CPU (YNNPACK).
        rows = w.reshape(-1, w.shape[-1])
        mean = jnp.mean(rows, axis=0)
        var = jnp.var(rows, axis=0)
        scale = self.gain[...].astype(jnp.float32) * self.scale
        return ((rows - mean) * (jax.lax.rsqrt(var + self.eps) * scale)).reshape(w.shape)

    def fold_standardization(self) -> None:
        """Store the standardised kernel in place of the raw one, for inference.

        The standardisation depends only on the parameters, so an inference model computes it
        once here instead of on every call. The gain is folded in and removed: a folded layer
        is for inference only (training it would train the effective kernel, not timm's).
        """
        if self.folded:
            return
        self.kernel[...] = self.standardized_kernel().astype(self.kernel.dtype)
        del self.gain
        self.folded = True

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.standardized_kernel().astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=self.groups,
            precision=self.precision,
        )
        return y + self.bias[...].astype(dtype)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excitation (timm's SEModule): global mean, 1x1 conv, ReLU, 1x1 conv, sigmoid.

    The 1x1 convs are plain convolutions (no standardisation, no gamma), as in timm.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        precision: Precision = None,
        rngs: nnx.Rngs,
    ):
        rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        conv = dict(
            kernel_size=(1, 1),
            kernel_init=initializers.kaiming_normal,
            bias_init=initializers.zeros,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=check_precision(precision),
            rngs=rngs,
        )
        self.fc1 = nnx.Conv(channels, rd_channels, **conv)
        self.fc2 = nnx.Conv(rd_channels, channels, **conv)

    def __call__(self, x: Array) -> Array:
        x_se = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        x_se = self.fc2(jax.nn.relu(self.fc1(x_se)))
        return x * jax.nn.sigmoid(x_se).astype(x.dtype)


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's adaptive kernel size: the odd number nearest (log2(C) + beta) / gamma, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EcaModule(nnx.Module):
    """Efficient channel attention: a 1-D conv (no bias, zero padding) over the pooled channels."""

    def __init__(
        self,
        channels: int,
        gamma: float = 2,
        beta: float = 1,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        precision: Precision = None,
        rngs: nnx.Rngs,
    ):
        kernel_size = eca_kernel_size(channels, gamma, beta)
        pad = (kernel_size - 1) // 2
        self.conv = nnx.Conv(
            1,
            1,
            kernel_size=(kernel_size,),
            padding=((pad, pad),),
            use_bias=False,
            kernel_init=initializers.torch_conv_default,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=check_precision(precision),
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        y = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)  # (N, C)
        y = self.conv(y[:, :, None])[:, :, 0]  # the channels are the 1-D conv's spatial axis
        return x * jax.nn.sigmoid(y)[:, None, None, :].astype(x.dtype)


ATTENTION_LAYERS: dict[str, type[nnx.Module]] = {'se': SqueezeExcite, 'eca': EcaModule}


def avg_pool_ceil(x: Array, window: int = 2, stride: int = 2) -> Array:
    """torch AvgPool2d(window, stride, ceil_mode=True, count_include_pad=False) on NHWC.

    A window that hangs over the bottom or right edge averages only the pixels it covers;
    dividing by the full window size instead moves logits by ~0.3 on odd input sizes.
    """
    height, width = x.shape[1:3]
    pads = [(0, (-(-(size - window) // stride)) * stride + window - size) for size in (height, width)]
    padding = ((0, 0), pads[0], pads[1], (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    total = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, dims, strides, padding)
    counts = jax.lax.reduce_window(np.ones((1, height, width, 1), np.float32), 0.0, jax.lax.add, dims, strides, padding)
    return (total / counts).astype(x.dtype)


def max_pool_3x3_s2(x: Array) -> Array:
    """torch MaxPool2d(3, stride=2, padding=1): the ResNet stem pool, padding with -inf."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), padding)


class DownsampleAvg(nnx.Module):
    """The shortcut of a block that changes shape: 2x2 average pool (when strided), then a 1x1 conv."""

    def __init__(
        self, in_chs: int, out_chs: int, stride: int, conv_layer: Callable[..., ScaledStdConv2d], *, rngs: nnx.Rngs
    ):
        self.stride = stride
        self.conv = conv_layer(in_chs, out_chs, 1, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        if self.stride > 1:
            x = avg_pool_ceil(x, 2, self.stride)
        return self.conv(x)


class DropPath(nnx.Module):
    """Stochastic depth per sample, scaled by 1/keep like timm's DropPath(scale_by_keep=True).

    Active only in train mode, switched as `nnx.Dropout` is: `model.train()` / `model.eval()`,
    `nnx.view(model, deterministic=False)`, `set_attributes(deterministic=...)`, or the call's
    `deterministic`. The call's `rngs` (an `nnx.Rngs`, stream or key) take precedence over the
    stream forked at construction.
    """

    def __init__(self, rate: float, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs['dropout'].fork() if rngs is not None else nnx.data(None)

    def set_view(self, deterministic: bool | None = None) -> None:
        """What `nnx.view(model, deterministic=...)` calls: a view in train or eval mode."""
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(
        self, x: Array, *, deterministic: bool | None = None, rngs: nnx.Rngs | nnx.RngStream | Array | None = None
    ) -> Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self._key(rngs), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * (mask.astype(x.dtype) / keep)

    def _key(self, rngs: nnx.Rngs | nnx.RngStream | Array | None) -> Array:
        """The mask's key: from the call's `rngs` ('dropout' stream) if given, else from the layer's own stream."""
        if isinstance(rngs, nnx.Rngs):
            return rngs['dropout']()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if rngs is not None:
            return rngs
        if self.rngs is None:
            raise ValueError(
                'DropPath in train mode needs rngs: build the model with nnx.Rngs(..., dropout=seed) '
                'or call it with rngs=nnx.Rngs(dropout=seed)'
            )
        return self.rngs()


POOL_TYPES = ('avg', 'max', 'avgmax', 'catavgmax', '')


def global_pool(x: Array, pool_type: str) -> Array:
    """timm's SelectAdaptivePool2d with output size 1 on NHWC: (N, H, W, C) -> (N, C) or (N, 2C).

    `pool_type=''` keeps the map unpooled. timm's 'fast' prefixes name the same pools.
    """
    pool_type = pool_type.removeprefix('fast')
    x32 = x.astype(jnp.float32)
    if pool_type == 'avg':
        pooled = jnp.mean(x32, axis=(1, 2))
    elif pool_type == 'max':
        pooled = jnp.max(x32, axis=(1, 2))
    elif pool_type == 'avgmax':
        pooled = 0.5 * (jnp.mean(x32, axis=(1, 2)) + jnp.max(x32, axis=(1, 2)))
    elif pool_type == 'catavgmax':
        pooled = jnp.concatenate([jnp.mean(x32, axis=(1, 2)), jnp.max(x32, axis=(1, 2))], axis=-1)
    elif pool_type == '':
        return x
    else:
        raise ValueError(f'unknown global_pool {pool_type!r}; choose one of {POOL_TYPES}')
    return pooled.astype(x.dtype)


def pool_feature_multiplier(pool_type: str) -> int:
    """How many times the channel count the pooled vector has."""
    if pool_type.removeprefix('fast') not in POOL_TYPES:
        raise ValueError(f'unknown global_pool {pool_type!r}; choose one of {POOL_TYPES}')
    return 2 if pool_type.endswith('catavgmax') else 1


class ClassifierHead(nnx.Module):
    """Global pool, dropout, linear classifier (timm's ClassifierHead); `num_classes=0` drops the fc."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = 'avg',
        drop_rate: float = 0.0,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        precision: Precision = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.pool_type = pool_type
        self.num_features = in_features * pool_feature_multiplier(pool_type)
        self.drop = nnx.Dropout(drop_rate, deterministic=True, rngs=rngs)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = check_precision(precision)
        self.fc = self._make_fc(num_classes, rngs)

    def _make_fc(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Linear | None:
        # timm takes a negative count as 0; it is always a mistake, so it is refused here.
        if not hasattr(num_classes, '__index__') or num_classes < 0:
            raise ValueError(f'num_classes must be a whole number, 0 or more (0: no classifier), not {num_classes!r}')
        if num_classes == 0:
            return None
        return nnx.Linear(
            self.num_features,
            num_classes,
            kernel_init=initializers.normal(0.01),
            bias_init=initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            rngs=rngs,
        )

    def reset(self, num_classes: int, pool_type: str | None = None, *, rngs: nnx.Rngs) -> None:
        """Replace the classifier (freshly initialised) and optionally the pooling."""
        if pool_type is not None:
            self.num_features = self.in_features * pool_feature_multiplier(pool_type)
            self.pool_type = pool_type
        self.fc = self._make_fc(num_classes, rngs)

    def __call__(self, x: Array, pre_logits: bool = False, *, rngs: nnx.Rngs | None = None) -> Array:
        x = self.drop(global_pool(x, self.pool_type), rngs=rngs)
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: None takes all, an int n the last n, a sequence may be negative.

    Returns the sorted indices to take and the largest of them.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f'cannot take the last {indices} of {num_features} features')
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            index = num_features + i if i < 0 else i
            if not 0 <= index < num_features:
                raise ValueError(f'feature index {i} is out of range for {num_features} features')
            take.append(index)
    return take, max(take)
