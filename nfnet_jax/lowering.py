"""How NFNet computations are lowered for each backend: the convolution per platform and XLA's compiler options.

Performance work lives here, so the layers and the model keep timm's plain formulas. Every
jit in nfnet_jax that runs the model (the inference functions, the train and eval steps, the
sharded ones) goes through `jit`, which passes `compiler_options(platform)`. Code that jits
the model itself can do the same:

    forward = jax.jit(apply, compiler_options=nfnet_jax.compiler_options('cpu'))

XLA:CPU hands convolutions to YNNPACK by default. On NFNets' 3x3 convolutions (one per group,
see `conv2d`) XLA's own Eigen convolutions are faster: 110-140 GFLOP/s against YNNPACK's
95-120 on the shapes of dm_nfnet_f0 at batch 8 on an AVX2 machine, 7-8% more images/s for the
whole network. So on CPU the list of op kinds given to YNNPACK is XLA's default without
convolutions: matmuls and reductions stay there. Training steps on CPU also take XLA's
memory-optimised scheduler: measured on dm_nfnet_f0's step (batch 8, 160 px, an AVX-512 Xeon) it
cuts the step's temporary memory from 810 to 552 MiB and runs 1.10x faster, with the same
results bit for bit. Inference keeps the default scheduler (-13 to -29% memory, but 2-4% slower).
Other platforms compile with XLA's defaults.

Inference on CPU runs a large batch a chunk of images at a time (`in_chunks`): the throughput of
XLA:CPU's and oneDNN's kernels stops growing once a chunk holds about 8 images of 256 x 256 pixels,
while memory grows with the whole batch.

With the optional oneDNN kernels installed (`nfnet_jax.onednn`), `jit` also has the convolutions of a
single-device CPU program run in oneDNN instead of XLA's Eigen and matmuls (`onednn_convolutions`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from functools import cache, partial, wraps
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from nfnet_jax import onednn
from nfnet_jax.onednn import Padding

Array = jax.Array

CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
CPU_TRAINING_OPTIONS = {**CPU_OPTIONS, 'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
CPU_CHUNK = 8  # the fewest images per chunk of a CPU inference batch (`in_chunks`)
CPU_CHUNK_PIXELS = CPU_CHUNK * 256 * 256  # the pixels a chunk holds at least, in images of 256 x 256 or smaller
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')  # the layouts of every convolution's input, kernel and output
BFLOAT16_CPU_FLAGS = frozenset({'avx512_bf16', 'amx_bf16', 'bf16'})  # x86 AVX512_BF16 and AMX-BF16, Arm's BF16
SHARDING_KEYWORDS = ('in_shardings', 'out_shardings')  # a jit's shardings, whose devices XLA partitions it over

# Inside `onednn_convolutions`: whether 1x1 convolutions run in oneDNN too (None outside it).
_onednn_pointwise: contextvars.ContextVar[bool | None] = contextvars.ContextVar('onednn_pointwise', default=None)


def compiler_options(platform: str | None, training: bool = False) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=)` on `platform` ('cpu', 'gpu', 'tpu'); None: XLA's defaults.

    `training`: the options for a training step (forward, backward and update in one program).
    """
    if platform != 'cpu':
        return None
    return dict(CPU_TRAINING_OPTIONS if training else CPU_OPTIONS)


def platform_of(tree: Any) -> str | None:
    """The platform of the first placed array in `tree`; the default backend if there is none.

    None inside a trace: a jit nested in another one may not take compiler options (those of
    the outermost jit apply to the whole program).
    """
    leaves = jax.tree.leaves(tree)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return None
    placed = (leaf for leaf in leaves if isinstance(leaf, jax.Array))
    first = next(placed, None)
    return jax.default_backend() if first is None else next(iter(first.devices())).platform


def jit(fn: Callable[..., Any], platform: str | None, training: bool = False, **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, **jit_kwargs)` with the compiler options of `platform` (a top-level jit only).

    On CPU, a jit on one device traces `fn` inside `onednn_convolutions()`. XLA cannot partition
    oneDNN's calls, so a jit whose shardings span several devices keeps XLA's convolutions.
    """
    options = compiler_options(platform, training)
    shardings = [jit_kwargs.get(key) for key in SHARDING_KEYWORDS]
    spanned = {len(s.device_set) for s in jax.tree.leaves(shardings) if isinstance(s, jax.sharding.Sharding)}
    if platform != 'cpu' or max(spanned, default=1) > 1:
        return jax.jit(fn, compiler_options=options, **jit_kwargs)

    @wraps(fn)
    def traced_with_onednn(*args: Any, **kwargs: Any) -> Any:
        with onednn_convolutions(pointwise=not training):
            return fn(*args, **kwargs)

    inner = fn
    while isinstance(inner, partial):
        inner = inner.func
    traced_with_onednn.__name__ = getattr(inner, '__name__', traced_with_onednn.__name__)  # the program's name
    return jax.jit(traced_with_onednn, compiler_options=options, **jit_kwargs)


@contextlib.contextmanager
def onednn_convolutions(pointwise: bool = True) -> Iterator[None]:
    """Within it, `conv2d` lowers convolutions for CPU to oneDNN where `onednn.enabled()`.

    float32 ones, and bfloat16 ones on a CPU with bfloat16 instructions (`cpu_has_bfloat16`); the
    bfloat16 products are summed, and the bias added, in float32, then rounded once, as on the
    matmul path. `pointwise`: 1x1 convolutions too, not only the larger ones. `jit` leaves them out
    of training steps: there the matmuls were as fast (float32) or faster (bfloat16), as XLA fuses
    their gradients with the work around them; only a float32 one's kernel gradient runs in oneDNN
    (`_matmul_onednn_kernel_gradient`). It acts when the computation is traced: a function
    jitted with `jax.jit` and traced inside it runs oneDNN's kernels too (and cannot be exported).
    Speeds: docs/performance.md.
    """
    token = _onednn_pointwise.set(pointwise)
    try:
        yield
    finally:
        _onednn_pointwise.reset(token)


@cache
def cpu_has_bfloat16() -> bool:
    """Whether this machine's CPU has bfloat16 arithmetic (BFLOAT16_CPU_FLAGS), read from Linux's /proc/cpuinfo.

    It decides how `conv2d` lowers a bfloat16 convolution for XLA:CPU, when the function is traced:
    a program exported for CPU keeps the choice of the machine that traced it. True where the flags
    cannot be read (not Linux).
    """
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


def images_per_chunk(height: int, width: int) -> int:
    """CPU_CHUNK images, doubled until the chunk holds CPU_CHUNK_PIXELS pixels.

    Small images need more of them per chunk to keep the kernels busy: below 256 px, dm_nfnet_f0
    runs faster in these chunks than in chunks of 8 (docs/performance.md, "Chunks by pixels").
    """
    images = CPU_CHUNK
    while images * height * width < CPU_CHUNK_PIXELS:
        images *= 2
    return images


def in_chunks(fn: Callable[[Any, Array], Any], platform: str | None) -> Callable[[Any, Array], Any]:
    """`fn(state, images)` that on CPU runs a batch of two chunks or more a chunk at a time (`images_per_chunk`).

    The chunks run one after another (a `lax.scan`), so only one chunk's activations are alive
    at a time; a batch that the chunk does not divide runs its last images as one more call. Measured
    on dm_nfnet_f0 at batch 32, 256 px, on an AVX-512 Xeon: XLA's temporary memory falls from 830
    to 256 MiB, at the same speed (0.98x median, 1.06x best of 12 calls), with the same logits
    bit for bit. `fn` must compute every image on its own, as every NFNet does in eval mode. Other
    platforms, and a batch or image size that is symbolic (`jax.export`), run the batch whole.
    """
    if platform != 'cpu':
        return fn

    @wraps(fn)  # the jit keeps fn's name (in profiles and XLA dumps)
    def chunked(state: Any, images: Array) -> Any:
        n, height, width = images.shape[:3]
        if not all(isinstance(d, int) for d in (n, height, width)):
            return fn(state, images)
        chunk = images_per_chunk(height, width)
        if n < 2 * chunk:
            return fn(state, images)
        whole = n - n % chunk
        chunks = images[:whole].reshape(whole // chunk, chunk, *images.shape[1:])
        _, outputs = jax.lax.scan(lambda _, chunk_images: (None, fn(state, chunk_images)), None, chunks)
        outputs = jax.tree.map(lambda y: y.reshape(whole, *y.shape[2:]), outputs)
        if whole == n:
            return outputs
        return jax.tree.map(lambda head, tail: jnp.concatenate([head, tail]), outputs, fn(state, images[whole:]))

    return chunked


def conv2d(x: Array, kernel: Array, groups: int = 1, *, bias: Array | None = None, **conv_kwargs: Any) -> Array:
    """`conv(x, kernel) + bias`, NHWC x HWIO (`jax.lax.conv_general_dilated` keywords), lowered per backend.

    On XLA:CPU, measured on dm_nfnet_f0: a grouped convolution takes a slow path, ~6x slower than
    the same work as one ordinary convolution per group plus a concat, so that is what runs (with
    jax 0.10.2 the forward has caught up, but a training step with native grouped convolutions is
    still 3.8x slower: their gradients); and a 1x1 convolution runs faster as a matmul over the
    channels (10-50% per conv, ~10% on the whole network). Each group's bias is added before the
    concat. The block's activation before a grouped conv is computed once and sliced per group:
    applying it per group slice instead (so XLA fuses it into the slicing) was measured on
    dm_nfnet_f0's group shapes at batch 8 on an AVX-512 EPYC at 1.01-1.05x the time of this form, so
    the model keeps timm's order, activation then conv.

    In bfloat16, XLA:CPU has native matmuls (YNNPACK: bfloat16 products summed in float32) but no
    bfloat16 convolutions (it converts to float32 and back around its float32 ones). So there every
    undilated conv runs as matmuls, per group: a 1x1 conv as one, a kxk conv as one per kernel row
    (`_conv_as_row_matmuls`); the products are summed and the bias added in float32, then rounded to
    bfloat16 once. The gradients of an ungrouped 1x1 conv are bfloat16 matmuls of the same kind
    (`_bfloat16_matmul`); those of every other conv are XLA's convolutions (`_bfloat16_row_conv`).
    Measured on dm_nfnet_f0 on a Xeon with AVX512_BF16 and AMX: inference (batch 8, 256 px) 1.6x the
    images/s of bfloat16 convolutions and 1.5x those of float32; a training step (batch 8, 160 px)
    1.35x float32's with every gradient as matmuls, 1.19x faster again with the kxk gradients as
    convolutions. That needs bfloat16 arithmetic in the CPU (`cpu_has_bfloat16`). Without it the
    bfloat16 matmuls are slow too, so every conv runs in float32 between conversions, rounded to
    bfloat16 once: on an AVX2 EPYC, inference at 256 px ran 1.35x (batch 8) and 1.47x (batch 1) the
    images/s of the matmuls and a training step 1.08x their speed, though all still slower than float32.

    Inside `onednn_convolutions`, with oneDNN installed, a convolution on CPU in float32 (or in
    bfloat16 on a CPU with bfloat16 instructions) is instead one oneDNN call, groups included (a
    1x1 one only where the scope says so).

    cuDNN and TPUs keep the convolution as written (native grouped kernels). A `precision=` keyword
    reaches every path, the matmuls too. The choice is made when the computation is lowered for its
    platform (`jax.lax.platform_dependent`), not from the default backend, so a jit placed on a GPU
    by a CPU-default process still gets cuDNN's kernels.
    """
    conv = partial(jax.lax.conv_general_dilated, dimension_numbers=DIMENSION_NUMBERS, **conv_kwargs)
    biased = (lambda y, _: y) if bias is None else (lambda y, b: y + b)
    pointwise = kernel.shape[:2] == (1, 1) and set(conv_kwargs.get('window_strides', (1, 1))) == {1}
    pointwise = pointwise and conv_kwargs.get('padding', 'SAME') in ('SAME', ((0, 0), (0, 0)))
    undilated = all(set(conv_kwargs.get(key) or (1,)) == {1} for key in ('lhs_dilation', 'rhs_dilation'))

    def native_conv(x: Array, kernel: Array, bias: Array | None) -> Array:
        return biased(conv(x, kernel, feature_group_count=groups), bias)

    def in_onednn(x: Array, kernel: Array) -> bool:  # see `onednn_convolutions`
        supported = x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and cpu_has_bfloat16())
        scope = _onednn_pointwise.get()
        wanted = scope is not None and (scope or not pointwise) and supported and x.dtype == kernel.dtype
        return wanted and undilated and onednn.enabled()

    def kernel_gradient_in_onednn(x: Array, kernel: Array) -> bool:  # a 1x1 conv left to XLA's matmuls
        float32 = x.dtype == kernel.dtype == jnp.float32
        return _onednn_pointwise.get() is False and pointwise and float32 and onednn.enabled()

    if groups == 1 and not pointwise and not (x.dtype == jnp.bfloat16 and undilated) and not in_onednn(x, kernel):
        return native_conv(x, kernel, bias)

    def cpu_conv(x: Array, kernel: Array, bias: Array | None) -> Array:
        bfloat16 = x.dtype == jnp.bfloat16
        if bfloat16 and not cpu_has_bfloat16():  # float32 between conversions, rounded once
            upcast = partial(jax.tree.map, lambda a: a.astype(jnp.float32))
            return cpu_conv(*upcast((x, kernel, bias))).astype(x.dtype)

        def finish(y: Array, b: Array | None) -> Array:  # the bias added in the accumulation dtype, then one rounding
            return biased(y, None if b is None else b.astype(y.dtype)).astype(x.dtype)

        strides = tuple(conv_kwargs.get('window_strides', (1, 1)))
        padding = explicit_padding(conv_kwargs.get('padding', 'SAME'), x.shape, kernel.shape, strides)
        if in_onednn(x, kernel):
            return finish(onednn.conv2d(x, kernel, groups, strides, padding), bias)
        as_matmuls = bfloat16 and undilated
        if groups == 1 and pointwise:
            matmul = _bfloat16_matmul if bfloat16 else _channel_matmul
            matmul = _matmul_onednn_kernel_gradient if kernel_gradient_in_onednn(x, kernel) else matmul
            return finish(matmul(x, kernel[0, 0], precision=conv_kwargs.get('precision')), bias)
        group_conv = conv
        if as_matmuls:
            group_conv = partial(
                _bfloat16_row_conv, strides=strides, padding=padding, precision=conv_kwargs.get('precision')
            )
        biases = [None] * groups if bias is None else jnp.split(bias, groups)
        parts = zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1), biases, strict=True)
        return jnp.concatenate([finish(group_conv(x_g, kernel_g), bias_g) for x_g, kernel_g, bias_g in parts], axis=-1)

    return jax.lax.platform_dependent(x, kernel, bias, cpu=cpu_conv, default=native_conv)


def explicit_padding(
    padding: str | Padding, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides: tuple[int, int]
) -> Padding:
    """`padding` as `jax.lax.conv_general_dilated` takes it ('SAME', 'VALID' or pairs) as explicit int pairs.

    `conv2d` resolves it once for its CPU paths: oneDNN's calls and the bfloat16 row matmuls take pairs.
    """
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding)
    else:
        pads = padding
    (top, bottom), (left, right) = ((int(a), int(b)) for a, b in pads)
    return (top, bottom), (left, right)


def _channel_matmul(x: Array, kernel: Array, **dot_kwargs: Any) -> Array:
    """`x` (..., C) times `kernel` (C, D) over the channels: a 1x1 convolution as a matmul."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **dot_kwargs)


@partial(jax.custom_vjp, nondiff_argnames=('precision',))
def _matmul_onednn_kernel_gradient(x: Array, kernel: Array, precision: Any = None) -> Array:
    """`_channel_matmul` in float32 whose kernel gradient is one oneDNN matmul (`onednn.matmul_kernel_gradient`).

    The forward and the input gradient stay XLA's matmuls (YNNPACK). The kernel gradient, which
    contracts the rows of both operands, is one that XLA:CPU gives to Eigen instead, which packs it
    into many small blocks; as one oneDNN call the training step runs faster (docs/performance.md,
    change 11).
    """
    return _channel_matmul(x, kernel, precision=precision)


def _matmul_onednn_kernel_gradient_forward(
    x: Array, kernel: Array, precision: Any = None
) -> tuple[Array, tuple[Array, Array]]:
    return _matmul_onednn_kernel_gradient(x, kernel, precision), (x, kernel)


def _matmul_onednn_kernel_gradient_backward(
    precision: Any, residuals: tuple[Array, Array], g: Array
) -> tuple[Array, Array]:
    x, kernel = residuals
    return _channel_matmul(g, kernel.T, precision=precision), onednn.matmul_kernel_gradient(x, g)


_matmul_onednn_kernel_gradient.defvjp(_matmul_onednn_kernel_gradient_forward, _matmul_onednn_kernel_gradient_backward)


@partial(jax.custom_vjp, nondiff_argnames=('precision',))
def _bfloat16_matmul(x: Array, kernel: Array, precision: Any = None) -> Array:
    """`_channel_matmul` of bfloat16 operands with a float32 result; its gradients are matmuls of the same kind.

    Without the custom gradient, the float32 cotangent would make both gradient matmuls float32
    ones (XLA:CPU converting the bfloat16 operand), so a bfloat16 training step would run its
    backward pass at float32 speed. Here the cotangent is rounded to bfloat16 first, as under
    PyTorch's autocast, and the gradients are summed in float32 and rounded once. The price: JAX
    has no forward-mode derivative (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) of a custom-VJP
    function, so those need float32 on CPU. (A custom JVP whose tangent is a
    `jax.custom_derivatives.linear_call` with this backward as its transpose would give both, the
    same gradients bit for bit, but in jax 0.10.2 `linear_call` has no vmap rule and fails an
    assertion when transposed with a residual computed inside the differentiated function.)
    """
    return _channel_matmul(x, kernel, precision=precision, preferred_element_type=jnp.float32)


def _bfloat16_matmul_forward(x: Array, kernel: Array, precision: Any = None) -> tuple[Array, tuple[Array, Array]]:
    return _bfloat16_matmul(x, kernel, precision), (x, kernel)


def _bfloat16_matmul_backward(precision: Any, residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    g = g.astype(x.dtype)
    dx = _channel_matmul(g, kernel.T, precision=precision, preferred_element_type=jnp.float32)
    rows = tuple(range(x.ndim - 1))
    dims = ((rows, rows), ((), ()))
    dkernel = jax.lax.dot_general(x, g, dims, precision=precision, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_bfloat16_matmul.defvjp(_bfloat16_matmul_forward, _bfloat16_matmul_backward)


@partial(jax.custom_vjp, nondiff_argnames=('strides', 'padding', 'precision'))
def _bfloat16_row_conv(
    x: Array,
    kernel: Array,
    strides: tuple[int, ...],
    padding: Padding,
    precision: Any = None,
) -> Array:
    """A bfloat16 kxk convolution as row matmuls with a float32 result; its gradients are XLA's convolutions.

    The gradients of the row matmuls would be matmuls too, but summing their shifted, padded
    pieces back into the input's gradient costs more than the matmuls save: measured on
    dm_nfnet_f0's training step (batch 8, 160 px, a Xeon with AVX512_BF16 and AMX), XLA's
    convolution gradients (float32 between conversions) made the step 1.19x faster. The forward
    stays as row matmuls: inference ran 1.6x faster than with XLA's bfloat16 convolutions.
    """
    matmul = partial(_bfloat16_matmul, precision=precision)
    return _conv_as_row_matmuls(x, kernel, matmul=matmul, strides=strides, padding=padding)


def _bfloat16_row_conv_forward(
    x: Array, kernel: Array, strides: tuple[int, ...], padding: Any, precision: Any = None
) -> tuple[Array, tuple[Array, Array]]:
    return _bfloat16_row_conv(x, kernel, strides, padding, precision), (x, kernel)


def _bfloat16_row_conv_backward(
    strides: tuple[int, ...], padding: Any, precision: Any, residuals: tuple[Array, Array], g: Array
) -> tuple[Array, Array]:
    x, kernel = residuals
    conv = partial(
        jax.lax.conv_general_dilated,
        window_strides=strides,
        padding=padding,
        dimension_numbers=DIMENSION_NUMBERS,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    dx, dkernel = jax.vjp(conv, x, kernel)[1](g)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_bfloat16_row_conv.defvjp(_bfloat16_row_conv_forward, _bfloat16_row_conv_backward)


def _conv_as_row_matmuls(
    x: Array,
    kernel: Array,
    *,
    matmul: Callable[[Array, Array], Array],
    strides: tuple[int, int],
    padding: Padding,
) -> Array:
    """An undilated convolution as one matmul per kernel row, that row's taps side by side in the channels.

    For bfloat16 on XLA:CPU, where a matmul runs natively and a convolution does not: measured on
    dm_nfnet_f0's 3x3 group shapes (128 channels, batch 8) on a Xeon with AVX512_BF16 and AMX,
    1.05x XLA's bfloat16 convolution at 64x64, 1.9-2.2x at 32x32 to 8x8.
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    height, width = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    rows = jnp.concatenate([padded[:, :, j : j + sw * (width - 1) + 1 : sw] for j in range(kw)], axis=-1)
    taps = (matmul(rows[:, i : i + sh * (height - 1) + 1 : sh], kernel[i].reshape(kw * cin, cout)) for i in range(kh))
    return sum(taps)
