"""oneDNN's convolutions on CPU (`nfnet_jax.onednn`): the values and gradients of the other paths, where they may run.

The test extra installs oneDNN, so these tests build the kernels (once per machine) and fail if
they cannot. Metric: relative error max|a - b| / max|b|, in float32 against XLA's convolutions (at
most FP32_RTOL = 1e-5), in bfloat16 against the bfloat16 matmul path (at most 2**-7).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FP32_RTOL, relative_error
from jax.sharding import NamedSharding, PartitionSpec
from multihost import child_env

from nfnet_jax import inference, lowering, onednn
from nfnet_jax.factory import create_model

TARGET = onednn.TARGETS['forward'][0]


def lowered_text(fn, *args) -> str:
    return fn.lower(*args).as_text()


def conv_loss(groups: int, strides: tuple[int, int], padding):
    """(x, kernel, bias) -> (a loss of the conv's output, the output), through `lowering.conv2d`."""

    def loss(x, kernel, bias):
        y = lowering.conv2d(x, kernel, groups, bias=bias, window_strides=strides, padding=padding)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


@pytest.mark.parametrize(
    'x_shape,kernel_size,out,groups,strides,padding',
    [
        ((2, 9, 7, 12), 3, 18, 3, (1, 1), 'SAME'),  # grouped, odd sizes
        ((2, 9, 8, 8), 3, 16, 1, (2, 2), ((0, 1), (0, 1))),  # timm's stride-2 stem padding
        ((3, 11, 10, 4), 5, 6, 2, (2, 2), 'VALID'),  # rows and columns left over by the stride
        ((1, 8, 8, 6), 3, 6, 6, (1, 2), ((1, 1), (2, 0))),  # depthwise, uneven strides and padding
        ((2, 6, 5, 8), 1, 12, 1, (1, 1), 'SAME'),  # 1x1 (in oneDNN outside training steps)
        ((2, 9, 9, 8), 1, 12, 2, (2, 2), 'SAME'),  # a strided, grouped 1x1
    ],
)
def test_onednn_convolutions_and_gradients_match_xla(x_shape, kernel_size, out, groups, strides, padding):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, x_shape[-1] // groups, out)).astype(np.float32)
    bias = rng.standard_normal(out).astype(np.float32)
    step = conv_loss(groups, strides, padding)
    ours = lowering.jit(step, 'cpu')
    assert TARGET in lowered_text(ours, x, kernel, bias)  # the values below are oneDNN's
    expected = jax.tree.leaves(jax.jit(step)(x, kernel, bias))
    got = jax.tree.leaves(ours(x, kernel, bias))
    for a, b in zip(got, expected, strict=True):  # loss, output, and the gradients of x, kernel and bias
        assert relative_error(a, b) <= FP32_RTOL


@pytest.mark.parametrize('x_shape', [(2, 6, 5, 8), (0, 6, 5, 8)])  # the second: no rows to sum, a zero gradient
def test_a_training_step_s_1x1_kernel_gradient_in_onednn_matches_xla(x_shape):
    """In training a 1x1 conv stays XLA's matmul; only its kernel gradient is oneDNN's (float32)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal((1, 1, 8, 12)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    step = conv_loss(1, (1, 1), 'SAME')
    ours = lowering.jit(step, 'cpu', training=True)
    text = lowered_text(ours, x, kernel, bias)
    assert onednn.TARGETS['matmul_kernel_gradient'][0] in text and TARGET not in text
    expected = jax.tree.leaves(jax.jit(step)(x, kernel, bias))
    got = jax.tree.leaves(ours(x, kernel, bias))
    for a, b in zip(got, expected, strict=True):  # loss, output, and the gradients of x, kernel and bias
        assert a.shape == b.shape and (a.size == 0 or relative_error(a, b) <= FP32_RTOL)
    assert x_shape[0] > 0 or not np.any(got[3])  # the kernel's gradient of an empty batch: zeros


def test_bfloat16_onednn_convolutions_match_the_matmul_path(monkeypatch):
    """With bfloat16 arithmetic in the CPU: the values and gradients of the matmul path, within its rounding."""
    monkeypatch.setattr(lowering, 'cpu_has_bfloat16', lambda: True)
    rng = np.random.default_rng(1)
    x, kernel, bias = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in ((2, 9, 7, 12), (3, 3, 4, 18), (18,))
    )
    step = conv_loss(3, (2, 2), 'SAME')
    ours = lowering.jit(step, 'cpu')
    assert TARGET in lowered_text(ours, x, kernel, bias)
    expected = jax.tree.leaves(jax.jit(step)(x, kernel, bias))
    got = jax.tree.leaves(ours(x, kernel, bias))
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        assert relative_error(a, b) <= 2**-7  # both sum in float32 and round to bfloat16 (8 significant bits)


def test_which_convolutions_run_in_onednn(monkeypatch):
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)

    def conv(x, kernel):
        return lowering.conv2d(x, kernel, window_strides=(1, 1), padding='SAME')

    assert TARGET in lowered_text(lowering.jit(conv, 'cpu'), x, kernel)
    assert TARGET not in lowered_text(jax.jit(conv), x, kernel)  # exportable: XLA's convolutions
    assert TARGET not in lowered_text(lowering.jit(conv, 'gpu'), x, kernel)
    pointwise = jax.ShapeDtypeStruct((1, 1, 4, 4), jnp.float32)
    assert TARGET in lowered_text(lowering.jit(conv, 'cpu'), x, pointwise)
    assert TARGET in lowered_text(lowering.jit(conv, 'cpu', training=True), x, kernel)
    assert TARGET not in lowered_text(lowering.jit(conv, 'cpu', training=True), x, pointwise)  # a matmul
    as_bfloat16 = [jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) for a in (x, kernel)]
    for cpu_has_bfloat16, dtype in ((True, 'bf16'), (False, 'f32')):  # without bfloat16 arithmetic: float32 inside
        monkeypatch.setattr(lowering, 'cpu_has_bfloat16', lambda answer=cpu_has_bfloat16: answer)
        text = lowered_text(lowering.jit(conv, 'cpu'), *as_bfloat16)
        assert re.findall(rf'@{TARGET}\(.*: \(tensor<2x8x8x4x(\w+)>', text) == [dtype]
    one_device = NamedSharding(jax.make_mesh((1,), ('data',)), PartitionSpec('data'))
    sharded = lowering.jit(conv, 'cpu', in_shardings=(one_device, None), out_shardings=one_device)
    assert TARGET in lowered_text(sharded, x, kernel)  # a mesh of one device, as the commands make on one CPU
    monkeypatch.setenv('NFNET_JAX_ONEDNN', '0')
    assert TARGET not in lowered_text(lowering.jit(conv, 'cpu'), x, kernel)


SHARDED_CHILD = """
import json, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from nfnet_jax import lowering, onednn
x, kernel = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)
batch = NamedSharding(jax.make_mesh((2,), ('data',)), PartitionSpec('data'))
conv = lowering.jit(lambda x, k: lowering.conv2d(x, k, window_strides=(1, 1), padding='SAME'), 'cpu',
                    in_shardings=(batch, None), out_shardings=batch)
used = onednn.TARGETS['forward'][0] in conv.lower(x, kernel).as_text()
print(json.dumps({'devices': jax.device_count(), 'onednn': used}))
"""


def test_jits_sharded_over_several_devices_keep_xla_convolutions():
    """XLA cannot partition oneDNN's custom calls: a jit whose shardings span two devices does without them."""
    done = subprocess.run(
        [sys.executable, '-c', SHARDED_CHILD], env=child_env(2), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {'devices': 2, 'onednn': False}


def test_inference_runs_onednn_and_exports_xla_convolutions():
    """The compiled classifier calls oneDNN; its export, even after that, has XLA's convolutions and the same logits."""
    fn = inference.classifier(create_model('test_nfnet', rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    assert TARGET in lowered_text(fn.compiled, fn.state, x)
    logits = fn(x)
    exported = jax.export.deserialize(fn.export(x.shape).serialize())
    assert TARGET not in exported.mlir_module()
    assert relative_error(exported.call(x), logits) <= FP32_RTOL


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """`onednn.load` and `enabled` as in a new process, building into an empty cache folder; reset afterwards."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    onednn.load.cache_clear()
    yield tmp_path
    onednn.load.cache_clear()


def test_without_the_extra_xla_convolutions_run_and_the_error_says_what_to_install(fresh_load, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, 'distribution', not_installed)
    with pytest.raises(onednn.OnednnUnavailable, match=r"pip install 'nfnet-jax\[onednn\]'"):
        onednn.load()
    assert not onednn.enabled()
    conv = lowering.jit(lambda x, k: lowering.conv2d(x, k, window_strides=(1, 1), padding='SAME'), 'cpu')
    assert TARGET not in lowered_text(conv, np.zeros((1, 4, 4, 2), np.float32), np.zeros((3, 3, 2, 2), np.float32))


def test_a_failed_build_leaves_no_library_and_says_why(fresh_load, monkeypatch):
    monkeypatch.setenv('CXX', 'false')  # a compiler that always fails
    with pytest.raises(onednn.OnednnUnavailable, match='building the oneDNN kernels failed: false exited with 1'):
        onednn.load()
    assert not onednn.enabled()
    assert list((fresh_load / 'nfnet_jax').iterdir()) == []  # no half-written library under its name


def test_a_damaged_cached_library_is_built_again(fresh_load):
    library = onednn.library_path(importlib.metadata.version(onednn.LIBRARY_DISTRIBUTION))
    assert library.parent == fresh_load / 'nfnet_jax'
    library.parent.mkdir()
    library.write_bytes(b'not a shared library')
    assert onednn.load() == library and onednn.enabled()
    assert library.read_bytes().startswith(b'\x7fELF')
