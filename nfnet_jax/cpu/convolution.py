"""How `jax.lax.conv_general_dilated` is lowered for XLA:CPU once the CPU backend is on.

`register` installs a CPU lowering rule for the convolution primitive. Lowering comes after
differentiation, so the rule sees the forward convolutions and the two convolutions of each
gradient (the input's: the kernel transposed and reversed; the kernel's: batch and features swapped),
and rewrites each into what XLA:CPU (or oneDNN) runs fast, in plain JAX lowered in its place:

- a grouped convolution of any layout as one convolution per group, concatenated: XLA:CPU's
  grouped convolutions, and their gradients, take a slow path;
- a 1x1 convolution as a matmul over the channels, and a kernel gradient that sums over the whole
  image (a 1x1 convolution's) as one matmul; always so on a 1x1 image (squeeze-excite's dense layers);
- in bfloat16, a kxk convolution as one matmul per kernel row (XLA:CPU has bfloat16 matmuls but no
  bfloat16 convolutions), products summed in float32 and rounded once; on a CPU without bfloat16
  arithmetic every bfloat16 convolution runs in float32 between two conversions instead;
- with the `onednn` extra, on a program for one device: convolutions and both their gradients in
  oneDNN's kernels (its forward, backward-data and backward-weights calls), float32, and bfloat16
  where the CPU has it (bfloat16 1x1 ones stay matmuls).

Anything else, programs for several devices (XLA cannot partition oneDNN's calls) and programs
lowered for `jax.export` keep XLA's own lowering. The results equal XLA's up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax._src.interpreters import mlir as jax_mlir  # the rule XLA:CPU would use, our fallback
from jax.interpreters import mlir

from nfnet_jax.cpu import onednn

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

CONV = jax.lax.conv_general_dilated_p
# ConvDimensionNumbers' specs: the (batch, feature, *spatial) axes of an image, the (out, in, *spatial) of a kernel.
NHWC = (0, 3, 1, 2)
HWIO = (3, 2, 0, 1)
HWOI = (2, 3, 0, 1)  # the kernel of an input gradient: in and out swapped
CNHW = (3, 0, 1, 2)  # an image of a kernel gradient: batch and features swapped
BFLOAT16_CPU_FLAGS = frozenset({'avx512_bf16', 'amx_bf16', 'bf16'})  # x86 AVX512_BF16 and AMX-BF16, Arm's BF16


@dataclass(frozen=True)
class Kernels:
    """What this process's convolutions may run on: decided once, by `register`."""

    onednn: bool  # oneDNN's convolutions are built and loaded
    bfloat16: bool  # the CPU has bfloat16 arithmetic


_kernels: Kernels | None = None  # None: programs lowered now get XLA's own convolutions
_xla_rule: Callable[..., Any] | None = None


def register(use_onednn: bool = True, bfloat16: bool | None = None) -> Kernels:
    """Install the CPU lowering rule (once per process) and decide the kernels: builds oneDNN's bridge if asked.

    `bfloat16`: whether the CPU has bfloat16 arithmetic; None reads it from the machine.
    """
    global _kernels, _xla_rule
    if _xla_rule is None:
        _xla_rule = jax_mlir._platform_specific_lowerings['cpu'][CONV].rule
        mlir.register_lowering(CONV, _lower, platform='cpu')
    _kernels = Kernels(
        onednn=use_onednn and onednn.enabled(), bfloat16=cpu_has_bfloat16() if bfloat16 is None else bfloat16
    )
    return _kernels


def unregister() -> None:
    """Programs lowered from now on get XLA's own convolutions (the rule stays installed, and passes them on)."""
    global _kernels
    _kernels = None


def kernels() -> Kernels | None:
    """The kernels `register` decided; None when off."""
    return _kernels


def cpu_has_bfloat16() -> bool:
    """Whether the CPU has bfloat16 arithmetic (BFLOAT16_CPU_FLAGS), from Linux's /proc/cpuinfo; True elsewhere."""
    try:
        return cpuinfo_has_bfloat16(Path('/proc/cpuinfo').read_text())
    except OSError:
        return True


def cpuinfo_has_bfloat16(cpuinfo: str) -> bool:
    """Whether the text of a /proc/cpuinfo lists a flag of BFLOAT16_CPU_FLAGS (x86 'flags', Arm 'Features')."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, values = line.partition(':')
        if key.strip() in ('flags', 'Features'):
            flags.update(values.split())
    return not flags.isdisjoint(BFLOAT16_CPU_FLAGS)


@dataclass(frozen=True)
class Conv:
    """One convolution as the primitive holds it: its operands' shapes and dtype, and its parameters."""

    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: Any
    params: dict[str, Any]

    @property
    def specs(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        lhs, rhs, out = self.params['dimension_numbers']
        return tuple(lhs), tuple(rhs), tuple(out)

    @property
    def groups(self) -> int:
        return max(self.params['feature_group_count'], self.params['batch_group_count'])

    def unit(self, name: str) -> bool:
        return all(v == 1 for v in self.params[name])

    @property
    def unpadded(self) -> bool:
        return all(pair == (0, 0) for pair in self.params['padding'])

    @property
    def out_dtype(self) -> Any:
        return self.params['preferred_element_type'] or self.dtype


def _lower(ctx: Any, lhs: Any, rhs: Any, **params: Any) -> Any:
    kernels = _kernels
    (lhs_aval, rhs_aval), (out_aval,) = ctx.avals_in, ctx.avals_out
    conv = Conv(lhs_aval.shape, rhs_aval.shape, out_aval.shape, lhs_aval.dtype, params)
    usable = kernels is not None and not ctx.module_context.lowering_parameters.for_export
    rewrite = _rewrite(conv, kernels, _one_device(ctx)) if usable else None
    if rewrite is None:
        return _xla_rule(ctx, lhs, rhs, **params)
    return mlir.lower_fun(rewrite, multiple_results=False)(ctx, lhs, rhs)


def _one_device(ctx: Any) -> bool:
    """Whether the program being lowered runs on one device (oneDNN's calls cannot be partitioned)."""
    axis_context = ctx.module_context.axis_context
    devices = getattr(axis_context, 'num_devices', None)
    if devices is None:
        devices = getattr(getattr(axis_context, 'mesh', None), 'size', None)
    return devices == 1


def _rewrite(conv: Conv, kernels: Kernels, one_device: bool) -> Callable[[Array, Array], Array] | None:
    """The function of (lhs, rhs) that computes `conv` fast on XLA:CPU; None: XLA's own lowering."""
    if len(conv.lhs_shape) != 4 or conv.dtype not in (jnp.float32, jnp.bfloat16):
        return None
    bfloat16 = conv.dtype == jnp.bfloat16
    if bfloat16 and not kernels.bfloat16:
        return partial(_in_float32, conv)
    in_onednn = kernels.onednn and one_device
    lhs_spec, rhs_spec, out_spec = conv.specs
    undilated = conv.unit('lhs_dilation') and conv.unit('rhs_dilation')
    dense = conv.lhs_shape[1:3] == (1, 1)  # an image of 1x1 (squeeze-excite's dense layers): nothing to convolve
    if lhs_spec == out_spec == NHWC and rhs_spec in (HWIO, HWOI) and conv.params['batch_group_count'] == 1:
        groups = conv.params['feature_group_count']
        pointwise = conv.rhs_shape[:2] == (1, 1) and conv.unit('window_strides') and conv.unpadded
        if undilated and pointwise and groups == 1 and (bfloat16 or dense or not in_onednn):
            return partial(_pointwise_matmul, conv)
        input_gradient = rhs_spec == HWOI and conv.unit('window_strides') and conv.unit('rhs_dilation')
        if input_gradient and in_onednn and _forward_padding(conv) is not None:
            return partial(_onednn_input_gradient, conv)
        if rhs_spec == HWIO and undilated and in_onednn:
            return partial(_onednn_forward, conv)
        if undilated and bfloat16 and groups == 1:
            return partial(_row_matmuls, conv)
    if lhs_spec == CNHW and rhs_spec == CNHW and out_spec == HWOI and conv.params['feature_group_count'] == 1:
        whole_image = conv.out_shape[:2] == (1, 1) and conv.unpadded and undilated and conv.unit('window_strides')
        whole_image = whole_image and conv.params['batch_group_count'] == 1
        onednn_geometry = conv.unit('window_strides') and conv.unit('lhs_dilation')
        onednn_geometry = onednn_geometry and all(high >= 0 for _, high in conv.params['padding'])
        if in_onednn and onednn_geometry and not ((bfloat16 or dense) and whole_image):
            return partial(_onednn_kernel_gradient, conv)
        if whole_image:
            return partial(_whole_image_matmul, conv)
    if conv.groups > 1:
        return partial(_per_group, conv)
    return None


def _bind(conv: Conv, lhs: Array, rhs: Array, **changes: Any) -> Array:
    """The convolution `conv` with some parameters changed, as a primitive again (lowered by this rule too)."""
    return CONV.bind(lhs, rhs, **{**conv.params, **changes})


def _in_float32(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """A bfloat16 convolution on a CPU without bfloat16 arithmetic: in float32, rounded once."""
    out = _bind(conv, lhs.astype(jnp.float32), rhs.astype(jnp.float32), preferred_element_type=None)
    return out.astype(conv.out_dtype)


def _per_group(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """A grouped convolution as one ungrouped convolution per group, concatenated over the output's features."""
    lhs_spec, rhs_spec, out_spec = conv.specs
    by_features = conv.params['feature_group_count'] > 1
    lhs_parts = jnp.split(lhs, conv.groups, axis=lhs_spec[1] if by_features else lhs_spec[0])
    rhs_parts = jnp.split(rhs, conv.groups, axis=rhs_spec[0])
    ungrouped = partial(_bind, conv, feature_group_count=1, batch_group_count=1)
    parts = [ungrouped(x, k) for x, k in zip(lhs_parts, rhs_parts, strict=True)]
    return jnp.concatenate(parts, axis=out_spec[1])


def _hwio(conv: Conv, rhs: Array) -> Array:
    return rhs if conv.specs[1] == HWIO else jnp.swapaxes(rhs, 2, 3)


def _dot(conv: Conv, x: Array, y: Array, contracting: tuple[Sequence[int], Sequence[int]]) -> Array:
    """`dot_general` with the convolution's precision; bfloat16 products summed in float32, then rounded once."""
    dims = (tuple(map(tuple, contracting)), ((), ()))
    accumulation = jnp.float32 if x.dtype == jnp.bfloat16 else None
    summed = jax.lax.dot_general(x, y, dims, precision=conv.params['precision'], preferred_element_type=accumulation)
    return summed.astype(conv.out_dtype)


def _pointwise_matmul(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """A 1x1 convolution (NHWC) as a matmul over the channels."""
    return _dot(conv, lhs, _hwio(conv, rhs)[0, 0], ((3,), (0,)))


def _whole_image_matmul(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """A 1x1 convolution's kernel gradient (its window the whole image) as one matmul: x^T dy over N, H, W."""
    return _dot(conv, lhs, rhs, ((0, 1, 2), (0, 1, 2)))[None, None]


def _row_matmuls(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """An undilated bfloat16 convolution (NHWC) as one matmul per kernel row, that row's taps side by side."""
    kernel = _hwio(conv, rhs)
    kh, kw, cin, cout = kernel.shape
    sh, sw = conv.params['window_strides']
    padded = jnp.pad(lhs, ((0, 0), *conv.params['padding'], (0, 0)))
    height, width = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    rows = jnp.concatenate([padded[:, :, j : j + sw * (width - 1) + 1 : sw] for j in range(kw)], axis=-1)
    taps = [
        jax.lax.dot_general(
            rows[:, i : i + sh * (height - 1) + 1 : sh],
            kernel[i].reshape(kw * cin, cout),
            (((3,), (0,)), ((), ())),
            precision=conv.params['precision'],
            preferred_element_type=jnp.float32,
        )
        for i in range(kh)
    ]
    return sum(taps).astype(conv.out_dtype)


def _onednn_forward(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """A convolution (NHWC, groups included) as one oneDNN call; float32 sums, rounded to the output's dtype."""
    kernel = _hwio(conv, rhs).astype(lhs.dtype)
    padding = tuple(tuple(pair) for pair in conv.params['padding'])
    out = onednn.conv2d(lhs, kernel, conv.params['feature_group_count'], tuple(conv.params['window_strides']), padding)
    return out.astype(conv.out_dtype)


def _forward_padding(conv: Conv) -> Padding | None:
    """The padding of the forward convolution whose input gradient `conv` is; None if oneDNN cannot take it.

    JAX pads the output's gradient by k - 1 - low before the (input-dilated) convolution; the high
    side is the forward's trimmed to what its output reaches.
    """
    padding = []
    strides = conv.params['lhs_dilation']
    sizes = zip(
        conv.params['padding'], conv.rhs_shape[:2], conv.lhs_shape[1:3], conv.out_shape[1:3], strides, strict=True
    )
    for (before, _), size, out, x, stride in sizes:
        low = size - 1 - before
        high = (out - 1) * stride + size - x - low
        padding.append((low, high))
    return None if min(min(pair) for pair in padding) < 0 else tuple(padding)


def _onednn_input_gradient(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """An input gradient as oneDNN's backward-data call, given dy and the reversed, regrouped kernel.

    JAX holds the kernel of a grouped convolution's input gradient as (kh, kw, groups * in, out / groups),
    reversed in space; this undoes both to the forward's HWIO kernel.
    """
    groups = conv.params['feature_group_count']
    kh, kw, cin, out_per_group = rhs.shape
    kernel = jnp.flip(rhs, (0, 1)).reshape(kh, kw, groups, cin // groups, out_per_group)
    kernel = kernel.transpose(0, 1, 3, 2, 4).reshape(kh, kw, cin // groups, groups * out_per_group)
    strides = tuple(conv.params['lhs_dilation'])
    dx = onednn.conv2d_input_gradient(
        lhs, kernel.astype(lhs.dtype), conv.out_shape, groups, strides, _forward_padding(conv)
    )
    return dx.astype(conv.out_dtype)


def _onednn_kernel_gradient(conv: Conv, lhs: Array, rhs: Array) -> Array:
    """The kernel gradient of a convolution as oneDNN's backward-weights call.

    The primitive holds it as x (N, H, W, C, read as C, N, H, W) convolved with dy: the forward's
    strides are its kernel dilation, and its padding the forward's, the high side trimmed to what the
    output reaches (the geometry oneDNN checks).
    """
    padding = tuple(tuple(pair) for pair in conv.params['padding'])
    strides = tuple(conv.params['rhs_dilation'])
    dy = rhs.astype(lhs.dtype)
    out = onednn.conv2d_kernel_gradient(lhs, dy, conv.out_shape, conv.params['batch_group_count'], strides, padding)
    return out.astype(conv.out_dtype)
