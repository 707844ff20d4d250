"""The CPU backend (`nfnet_jax.cpu`): off, the model is one plain program; on, its convolutions are rewritten.

Every rewrite is checked against XLA's own convolution (backend off) for values and both
gradients. Metric: relative error max|a - b| / max|b|; float32 at most FP32_RTOL = 1e-5, bfloat16
within its rounding (2**-7 of a float32 reference computed from the same bfloat16 inputs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FP32_RTOL, cpu_backend, relative_error
from jax._src import xla_bridge
from jax.sharding import NamedSharding, PartitionSpec
from multihost import FAST_COMPILE_FLAGS, child_env

import nfnet_jax
from nfnet_jax import cpu, inference
from nfnet_jax.cpu import convolution, onednn

REPO = Path(__file__).resolve().parent.parent
ONEDNN = onednn.TARGETS['forward'][0]
ONEDNN_INPUT_GRADIENT = onednn.TARGETS['backward_data'][0]
ONEDNN_KERNEL_GRADIENT = onednn.TARGETS['backward_weights'][0]


@pytest.fixture(params=['xla', 'onednn'])
def backend(request):
    """The backend on for one test, with XLA:CPU's kernels only or with oneDNN's (built by the test extra)."""
    with cpu_backend(onednn=request.param == 'onednn') as kernels:
        assert kernels.onednn is (request.param == 'onednn'), 'the test extra installs oneDNN: its kernels must build'
        yield kernels


def conv_and_gradients(groups: int, **conv_kwargs):
    """(x, kernel) -> (output, d loss/dx, d loss/dkernel) of one NHWC x HWIO convolution.

    The loss weighs the output with fixed random numbers, so the output's gradient is those
    numbers whatever the output's rounding.
    """

    def conv(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups, **conv_kwargs
        )

    def loss(x, kernel):
        y = conv(x, kernel).astype(jnp.float32)
        return jnp.sum(y * jax.random.normal(jax.random.key(0), y.shape))

    return lambda x, kernel: (conv(x, kernel), *jax.grad(loss, argnums=(0, 1))(x, kernel))


# name: (x shape, kernel size, output channels, groups, conv keywords). 'left-over-by-stride' and 'depthwise-uneven'
# have no gradients in oneDNN (the high padding they would need is negative: the output skips input rows), nor has
# 'dilated' anything.
CONVS = {
    'grouped': ((2, 9, 7, 12), 3, 18, 3, dict(window_strides=(1, 1), padding='SAME')),
    'stem-stride-2': ((2, 9, 8, 8), 3, 16, 1, dict(window_strides=(2, 2), padding=((0, 1), (0, 1)))),
    'left-over-by-stride': ((3, 11, 10, 4), 5, 6, 2, dict(window_strides=(2, 2), padding='VALID')),
    'depthwise-uneven': ((1, 8, 8, 6), 3, 6, 6, dict(window_strides=(1, 2), padding=((1, 1), (2, 0)))),
    '1x1': ((2, 6, 5, 8), 1, 12, 1, dict(window_strides=(1, 1), padding='SAME')),
    '1x1-strided-grouped': ((2, 9, 9, 8), 1, 12, 2, dict(window_strides=(2, 2), padding='SAME')),
    'dilated': ((2, 11, 11, 8), 3, 8, 2, dict(window_strides=(1, 1), padding='SAME', rhs_dilation=(2, 2))),
}


def conv_inputs(name: str, dtype=jnp.float32, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    x_shape, size, out, groups, _ = CONVS[name]
    rng = np.random.default_rng(seed)
    kernel_shape = (size, size, x_shape[-1] // groups, out)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for shape in (x_shape, kernel_shape))


@pytest.mark.parametrize('name', CONVS)
def test_float32_convolutions_and_gradients_equal_xla_s(name, backend):
    _, _, _, groups, kwargs = CONVS[name]
    x, kernel = conv_inputs(name)
    fn = conv_and_gradients(groups, **kwargs)
    ours = jax.jit(fn)
    text = ours.lower(x, kernel).as_text()
    if backend.onednn and name != 'dilated':  # the values below are oneDNN's
        assert ONEDNN in text
        gradients = name not in ('left-over-by-stride', 'depthwise-uneven')
        assert (ONEDNN_INPUT_GRADIENT in text) is gradients and (ONEDNN_KERNEL_GRADIENT in text) is gradients
    if not backend.onednn:  # every group its own convolution
        assert 'custom_call' not in text and set(re.findall(r'(?:feature|batch)_group_count = (\d+)', text)) <= {'1'}
    got = ours(x, kernel)
    cpu.disable()
    expected = jax.jit(fn)(x, kernel)
    for a, b in zip(got, expected, strict=True):  # the output, and the gradients of x and of the kernel
        assert a.shape == b.shape and relative_error(a, b) <= FP32_RTOL


@pytest.mark.parametrize('name', ['grouped', '1x1', 'stem-stride-2'])
@pytest.mark.parametrize('bfloat16_cpu', [True, False], ids=['bf16-cpu', 'no-bf16-cpu'])
def test_bfloat16_convolutions_and_gradients_round_float32_s_once(name, bfloat16_cpu, backend):
    """With bfloat16 arithmetic: matmuls (or oneDNN) summing in float32; without it: float32 between two conversions."""
    convolution.register(use_onednn=backend.onednn, bfloat16=bfloat16_cpu)
    _, _, _, groups, kwargs = CONVS[name]
    x, kernel = conv_inputs(name, jnp.bfloat16, seed=1)
    fn = conv_and_gradients(groups, **kwargs)
    ours = jax.jit(fn)
    text = ours.lower(x, kernel).as_text()
    bf16_ops = re.findall(r'stablehlo\.(?:convolution|dot_general)[^\n]*bf16', text)
    assert bool(bf16_ops) is bfloat16_cpu or (backend.onednn and bfloat16_cpu and ONEDNN in text)
    got = ours(x, kernel)
    cpu.disable()
    expected = jax.jit(conv_and_gradients(groups, **kwargs))(x.astype(jnp.float32), kernel.astype(jnp.float32))
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == jnp.bfloat16
        assert relative_error(a, b) <= 2**-7  # the output's, and the cotangent's, rounding to bfloat16


def test_a_1x1_convolution_of_a_1x1_image_is_a_dense_layer(backend):
    """Squeeze-excite's 1x1 convolutions of the pooled vector: matmuls and their gradients, never oneDNN's calls."""
    x, kernel = jnp.ones((4, 1, 1, 16)), jnp.ones((1, 1, 16, 8))
    text = jax.jit(conv_and_gradients(1, window_strides=(1, 1), padding='SAME')).lower(x, kernel).as_text()
    assert 'custom_call' not in text and 'stablehlo.convolution' not in text and text.count('dot_general') == 3


def test_the_model_is_one_plain_program_without_the_backend():
    """Off: a user's `jax.jit` of the folded model and the library's classifier lower to the same program,
    with grouped convolutions as written and no custom call."""
    assert not cpu.enabled()
    model = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0))
    fn = inference.classifier(model)
    graphdef, _ = nnx.split(inference.inference_model(model))

    def apply(state, images):
        return nnx.merge(graphdef, state)(images)

    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    users = jax.jit(apply).lower(fn.state, x).as_text()
    assert users == fn.compiled.lower(fn.state, x).as_text()
    assert 'custom_call' not in users and 'stablehlo.while' not in users


@pytest.mark.slow
def test_with_the_backend_a_plain_jit_of_the_model_runs_the_fast_convolutions(backend):
    model = nfnet_jax.create_model('dm_nfnet_f0', rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    forward = jax.jit(lambda m, x: m(x))
    text = forward.lower(model, x).as_text()
    groups = set(re.findall(r'feature_group_count = (\d+)', text))
    assert (ONEDNN in text) is backend.onednn
    assert groups == set() if backend.onednn else groups == {'1'}  # every group its own convolution
    got = forward(model, x)
    cpu.disable()
    assert relative_error(got, jax.jit(lambda m, x: m(x))(model, x)) <= FP32_RTOL


def test_programs_for_export_and_for_several_devices_keep_xla_s_convolutions(backend):
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)
    conv = jax.jit(conv_and_gradients(1, window_strides=(1, 1), padding='SAME'))
    assert (ONEDNN in conv.lower(x, kernel).as_text()) is backend.onednn
    exported = jax.export.export(conv, platforms=['cpu'])(x, kernel).mlir_module()
    assert 'custom_call' not in exported  # runs in any process, on any CPU
    one_device = NamedSharding(jax.make_mesh((1,), ('data',)), PartitionSpec('data'))
    sharded = jax.jit(conv, in_shardings=(one_device, None))
    assert (ONEDNN in sharded.lower(x, kernel).as_text()) is backend.onednn  # as the commands' one-CPU mesh


SHARDED_CHILD = """
import json, jax, jax.numpy as jnp
from jax._src import xla_bridge
from jax.sharding import NamedSharding, PartitionSpec
from nfnet_jax import cpu
from nfnet_jax.cpu import onednn
assert cpu.enable()
x, kernel = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)
batch = NamedSharding(jax.make_mesh((2,), ('data',)), PartitionSpec('data'))
dims = ('NHWC', 'HWIO', 'NHWC')
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dims),
               in_shardings=(batch, None), out_shardings=batch)
text = conv.lower(x, kernel).as_text()
print(json.dumps({'devices': jax.device_count(), 'onednn': onednn.TARGETS['forward'][0] in text}))
"""


def test_jits_sharded_over_several_devices_keep_xla_convolutions():
    """XLA cannot partition oneDNN's custom calls: a jit whose shardings span two devices does without them."""
    done = subprocess.run(
        [sys.executable, '-c', SHARDED_CHILD], env=child_env(2), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {'devices': 2, 'onednn': False}


def test_enable_does_nothing_where_the_default_backend_is_not_the_cpu(monkeypatch):
    jax.devices()  # JAX's clients exist: their default backend decides
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert cpu.enable() is False and not cpu.enabled() and cpu.compiler_options() is None
    # Before JAX's clients exist (a command's first step), jax_platforms decides without starting them.
    monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
    platforms = jax.config.jax_platforms
    try:
        jax.config.update('jax_platforms', 'cuda,cpu')
        assert cpu.default_backend_is_cpu() is False
        jax.config.update('jax_platforms', 'cpu')
        assert cpu.default_backend_is_cpu() is True
    finally:
        jax.config.update('jax_platforms', platforms)


def test_a_command_on_another_backend_applies_no_cpu_setting(monkeypatch):
    """A command run as the process (with --keep-cpu-memory or not), on a GPU say: no allocator setting, no
    lowering rule, no compiler option (every command applies its CPU flags through `cli.apply_cpu_arguments`)."""
    import argparse

    from nfnet_jax import cli
    from nfnet_jax.cpu import memory

    def refuse(*args, **kwargs):
        raise AssertionError('a CPU setting was applied on another backend')

    monkeypatch.setattr(cpu, 'default_backend_is_cpu', lambda: False)
    monkeypatch.setattr(memory, 'keep_cpu_memory', refuse)
    monkeypatch.setattr(convolution, 'register', refuse)
    parser = argparse.ArgumentParser()
    cli.add_cpu_arguments(parser)
    for argv in ([], ['--keep-cpu-memory']):
        assert cli.apply_cpu_arguments(parser.parse_args(argv), is_process=True) is False
        assert not cpu.enabled() and cpu.compiler_options() is None


def test_onednn_can_be_left_out(monkeypatch):
    with cpu_backend():
        assert cpu.enable(onednn=False) and not convolution.kernels().onednn
        monkeypatch.setenv('NFNET_JAX_ONEDNN', '0')
        assert cpu.enable() and not convolution.kernels().onednn
        monkeypatch.delenv('NFNET_JAX_ONEDNN')
        assert cpu.enable() and convolution.kernels().onednn


def test_a_cpu_chunk_holds_8_images_or_as_many_pixels_as_8_images_of_256_px():
    sizes = (512, 320, 256, 224, 192, 160, 128)
    assert [cpu.images_per_chunk(size, size) for size in sizes] == [8, 8, 8, 16, 16, 32, 32]
    assert cpu.images_per_chunk(256, 128) == 16 and cpu.images_per_chunk(1, 1) == 8 * 256 * 256


def test_large_cpu_batches_run_in_chunks_with_the_outputs_of_the_whole_batch(monkeypatch):
    """Two chunks and 3 images more: a scan over two chunks, then the last 3; a smaller batch runs whole."""
    model = nfnet_jax.create_model('test_nfnet')
    x = np.random.default_rng(0).standard_normal((2 * cpu.CPU_CHUNK + 3, 32, 32, 3)).astype(np.float32)
    off = inference.classifier(model)
    assert 'stablehlo.while' not in off.compiled.lower(off.state, x).as_text()
    with cpu_backend():
        monkeypatch.setattr(cpu, 'CPU_CHUNK_PIXELS', cpu.CPU_CHUNK * 32 * 32)  # chunks of 8 at 32 x 32
        for fn in (inference.classifier(model), inference.feature_extractor(model, indices=[1, -1])):
            chunked, whole = fn.compiled.lower(fn.state, x), fn.apply.lower(fn.state, x)  # apply: never chunked
            assert 'stablehlo.while' in chunked.as_text() and 'stablehlo.while' not in whole.as_text()
            small = fn.compiled.lower(fn.state, x[: 2 * cpu.CPU_CHUNK - 1])
            assert 'stablehlo.while' not in small.as_text()
            chunked, whole = chunked.compile(), whole.compile()
            outputs = zip(jax.tree.leaves(chunked(fn.state, x)), jax.tree.leaves(whole(fn.state, x)), strict=True)
            assert all(relative_error(ours, expected) <= FP32_RTOL for ours, expected in outputs)
            chunked_bytes, whole_bytes = (c.memory_analysis().temp_size_in_bytes for c in (chunked, whole))
            assert chunked_bytes < 0.75 * whole_bytes
        monkeypatch.undo()  # the real budget: 19 images of 32 x 32 are far fewer pixels than one chunk holds
        fn = inference.classifier(model)
        assert 'stablehlo.while' not in fn.compiled.lower(fn.state, x).as_text()


@pytest.mark.parametrize(
    'cpuinfo,expected',
    [
        ('processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n', True),  # Xeon (Sapphire Rapids)
        ('processor\t: 0\nflags\t\t: fpu sse2 fma avx avx2\n', False),  # EPYC (Zen 3)
        ('processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n', True),  # Arm Neoverse V1
        ('processor\t: 0\nFeatures\t: fp asimd\n', False),
        ('', False),
    ],
)
def test_cpuinfo_has_bfloat16(cpuinfo, expected):
    assert convolution.cpuinfo_has_bfloat16(cpuinfo) is expected


OPTIONS_WORKER = """
import jax
import numpy as np
import nfnet_jax
from nfnet_jax import inference, parallel
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.train import TrainState, eval_step, nfnet_optimizer, train_step

assert nfnet_jax.cpu.enable()
images, labels = np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32)
model = nfnet_jax.create_model('test_nfnet', num_classes=10)
classify = inference.classifier(model)
classify(images)


def users_jit(x):
    return classify(x) + 1


jax.jit(users_jit)(images)
state = TrainState(model, nfnet_optimizer(0.1))
train_step(state, images, labels)
eval_step(state.model, images, labels)
mesh = parallel.make_mesh()
parallel.shard_inference(inference.embedder(model), mesh)(images)
trainer = ShardedTrainer(state, mesh)
trainer.train_step(images, labels)
trainer.eval_step(images, labels)
"""


@pytest.mark.slow
def test_every_top_level_jit_of_ours_compiles_with_the_backend_s_options(tmp_path):
    """XLA dumps each compiled program's non-default options: with the backend on, every jit of ours carries
    the CPU list: the inference functions, the train and eval steps and their sharded forms; a classifier
    called inside a user's jit runs too (a nested jit may take no options), under that jit's."""
    worker = tmp_path / 'worker.py'
    worker.write_text(OPTIONS_WORKER)
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_dump_to={tmp_path / "dump"} {FAST_COMPILE_FLAGS}'}
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # every program must compile (and be dumped), none come from the cache
    subprocess.run([sys.executable, str(worker)], check=True, cwd=REPO, env=env, timeout=600)
    fusion_types: dict[str, list[list[str]]] = {}
    schedulers: dict[str, list[list[str]]] = {}
    for path in (tmp_path / 'dump').glob('*.debug_options'):
        name, text = path.name.split('.')[1], path.read_text(errors='replace')
        fusion_types.setdefault(name, []).append(re.findall(r'xla_cpu_experimental_ynn_fusion_type: (\w+)', text))
        schedulers.setdefault(name, []).append(re.findall(r'xla_cpu_scheduler_type: (\w+)', text))
    ours = ['LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT', 'LIBRARY_FUSION_TYPE_REDUCE']
    assert ours == cpu.CPU_OPTIONS['xla_cpu_experimental_ynn_fusion_type'].split(',')
    for name in ('jit_apply', 'jit_pure_train_step', 'jit_pure_eval_step'):  # plain and sharded, each
        assert fusion_types.get(name) == [ours, ours], name
    assert fusion_types.get('jit_users_jit') == [[]]
    # Training steps alone take the memory-optimised scheduler.
    assert schedulers['jit_pure_train_step'] == [['CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED']] * 2
    assert schedulers['jit_apply'] == schedulers['jit_pure_eval_step'] == [[], []]
