"""The jitted inference path: folded standardisation, per-backend grouped convs, bfloat16, compilation cache.

Metric: relative error max|a - b| / max|b| against the plain model call (float32, at most
FP32_RTOL = 1e-5), on timm models whose every tensor is randomised first.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from helpers import FP32_RTOL, randomize_, relative_error
from jax import export
from multihost import FAST_COMPILE_FLAGS

import nfnet_jax
from nfnet_jax import inference, lowering
from nfnet_jax.factory import from_timm
from nfnet_jax.weights import flat_params

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module', params=['test_nfnet', 'dm_nfnet_f0'])
def model(request):
    """A converted timm model with random weights: dm_ (SAME padding, gamma in GELU, SE, groups)."""
    torch.manual_seed(0)
    theirs = timm.create_model(request.param).eval()
    randomize_(theirs, seed=3)
    yield from_timm(theirs)
    gc.collect()


def test_folded_classifier_matches_the_model(model):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 40, 3)), jnp.float32)
    assert relative_error(inference.classifier(model)(x), model(x)) <= FP32_RTOL


def test_embedder_and_feature_extractor_match_the_model():
    torch.manual_seed(0)
    theirs = timm.create_model('test_nfnet').eval()
    randomize_(theirs, seed=4)
    model = from_timm(theirs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 45, 38, 3)), jnp.float32)
    final, taps = model.forward_intermediates(x)
    pre_logits = model.forward_head(final, pre_logits=True)
    assert relative_error(inference.embedder(model)(x), pre_logits) <= FP32_RTOL
    got = inference.feature_extractor(model, indices=[1, -1])(x)
    assert len(got) == 2
    for ours, expected in zip(got, [taps[1], taps[-1]], strict=True):
        assert relative_error(ours, expected) <= FP32_RTOL


def test_a_cpu_chunk_holds_8_images_or_as_many_pixels_as_8_images_of_256_px():
    sizes = (512, 320, 256, 224, 192, 160, 128)
    assert [lowering.images_per_chunk(size, size) for size in sizes] == [8, 8, 8, 16, 16, 32, 32]
    assert lowering.images_per_chunk(256, 128) == 16 and lowering.images_per_chunk(1, 1) == 8 * 256 * 256


def test_large_cpu_batches_run_in_chunks_with_the_outputs_of_the_whole_batch(monkeypatch):
    """Two chunks and 3 images more: a scan over two chunks, then the last 3; a smaller batch runs whole."""
    monkeypatch.setattr(lowering, 'CPU_CHUNK_PIXELS', lowering.CPU_CHUNK * 32 * 32)  # chunks of 8 at 32 x 32
    model = nfnet_jax.create_model('test_nfnet')
    x = np.random.default_rng(0).standard_normal((2 * lowering.CPU_CHUNK + 3, 32, 32, 3)).astype(np.float32)
    for fn in (inference.classifier(model), inference.feature_extractor(model, indices=[1, -1])):
        chunked, whole = fn.compiled.lower(fn.state, x), fn.apply.lower(fn.state, x)  # apply: never chunked
        assert 'stablehlo.while' in chunked.as_text() and 'stablehlo.while' not in whole.as_text()
        small = fn.compiled.lower(fn.state, x[: 2 * lowering.CPU_CHUNK - 1])
        assert 'stablehlo.while' not in small.as_text()
        chunked, whole = chunked.compile(), whole.compile()
        outputs = zip(jax.tree.leaves(chunked(fn.state, x)), jax.tree.leaves(whole(fn.state, x)), strict=True)
        assert all(relative_error(ours, expected) <= FP32_RTOL for ours, expected in outputs)
        chunked_bytes, whole_bytes = (c.memory_analysis().temp_size_in_bytes for c in (chunked, whole))
        assert chunked_bytes < 0.75 * whole_bytes  # measured: 0.62x for the classifier, 0.66x for the taps
    monkeypatch.undo()  # the real budget: 19 images of 32 x 32 are far fewer pixels than one chunk holds
    fn = inference.classifier(model)
    assert 'stablehlo.while' not in fn.compiled.lower(fn.state, x).as_text()
    assert lowering.in_chunks(len, 'gpu') is len and lowering.in_chunks(len, 'tpu') is len


def test_inference_does_not_standardise_per_call_and_leaves_the_model_alone():
    model = nfnet_jax.create_model('test_nfnet')
    classify = inference.classifier(model)
    x = jnp.zeros((1, 32, 32, 3))
    per_call = str(jax.make_jaxpr(classify.apply)(classify.state, x))
    plain = str(jax.make_jaxpr(lambda x: model(x))(x))
    assert 'rsqrt' in plain and 'rsqrt' not in per_call
    conv = model.stages[0][0].conv2
    assert not conv.folded and hasattr(conv, 'gain')  # the training model still standardises per call
    folded = inference.inference_model(model).stages[0][0].conv2
    assert folded.folded and not hasattr(folded, 'gain')
    np.testing.assert_array_equal(folded.kernel[...], conv.standardized_kernel())


@pytest.mark.parametrize(
    'kernel_size,groups,cpu_ops',
    [(3, 4, ['convolution group 1'] * 4), (1, 1, ['dot_general']), (3, 1, ['convolution group 1'])],
)
def test_convs_are_lowered_per_platform(kernel_size, groups, cpu_ops):
    """CPU: one plain conv per group, 1x1 convs as matmuls. GPU and TPU: the convolution as written."""
    conv = jax.jit(lambda x, k: lowering.conv2d(x, k, groups, window_strides=(1, 1), padding='SAME'))
    args = (
        jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32),
        jax.ShapeDtypeStruct((kernel_size, kernel_size, 16 // groups, 16), jnp.float32),
    )

    def ops(platform: str) -> list[str]:
        text = export.export(conv, platforms=[platform])(*args).mlir_module()
        found = re.findall(r'stablehlo\.(convolution|dot_general)(?:.*feature_group_count = (\d+))?', text)
        return [f'{op} group {group}' if op == 'convolution' else op for op, group in found]

    assert ops('cpu') == cpu_ops
    assert ops('cuda') == ops('tpu') == [f'convolution group {groups}']
    x, k = (np.random.default_rng(0).standard_normal(a.shape).astype(np.float32) for a in args)
    dims = ('NHWC', 'HWIO', 'NHWC')
    native = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dims, feature_group_count=groups)
    assert relative_error(conv(x, k), native) <= FP32_RTOL


@pytest.mark.parametrize('kernel_size,groups', [(3, 4), (1, 1), (3, 1)])
def test_conv_bias_is_added_per_group_on_cpu(kernel_size, groups):
    """conv2d's bias: the same values as conv-then-bias on every lowering, added per group before the concat on CPU."""
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 16)).astype(np.float32)
    k = np.random.default_rng(2).standard_normal((kernel_size, kernel_size, 16 // groups, 16)).astype(np.float32)
    b = np.random.default_rng(3).standard_normal(16).astype(np.float32)

    def conv(x, k, b):
        return lowering.conv2d(x, k, groups, bias=b, window_strides=(1, 1), padding='SAME')

    def adds(platform: str) -> int:
        return export.export(jax.jit(conv), platforms=[platform])(x, k, b).mlir_module().count('stablehlo.add')

    assert adds('cpu') == (groups if kernel_size == 3 else 1)
    assert adds('cuda') == adds('tpu') == 1
    dims = ('NHWC', 'HWIO', 'NHWC')
    expected = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=dims, feature_group_count=groups, precision='highest'
    )
    assert relative_error(jax.jit(conv)(x, k, b), expected + b) <= FP32_RTOL


@pytest.mark.parametrize(
    'kernel_size,groups,stride,dilation,padding,cpu_ops',
    [
        (3, 4, 1, 1, 'SAME', ['dot_general'] * 12),  # one matmul per kernel row and group
        (3, 4, 1, 1, ((1, 1), (1, 1)), ['dot_general'] * 12),
        (3, 4, 2, 1, ((1, 1), (1, 1)), ['dot_general'] * 12),
        (3, 1, 2, 1, 'SAME', ['dot_general'] * 3),
        (1, 1, 1, 1, 'SAME', ['dot_general']),
        (3, 4, 1, 2, ((2, 2), (2, 2)), ['convolution'] * 4),  # dilated: XLA's convolution, per group
    ],
)
def test_bfloat16_convs_on_cpu_are_matmuls_summed_in_float32(
    kernel_size, groups, stride, dilation, padding, cpu_ops, monkeypatch
):
    """bfloat16 on a CPU with bfloat16 arithmetic: undilated convs as matmuls with float32 results, rounded once."""
    monkeypatch.setattr(lowering, 'cpu_has_bfloat16', lambda: True)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 16)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 16 // groups, 16)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(16), jnp.bfloat16)
    strides, dilations = (stride, stride), (dilation, dilation)

    def conv(x, k, b):
        return lowering.conv2d(x, k, groups, bias=b, window_strides=strides, padding=padding, rhs_dilation=dilations)

    text = export.export(jax.jit(conv), platforms=['cpu'])(x, k, b).mlir_module()
    assert re.findall(r'stablehlo\.(convolution|dot_general)', text) == cpu_ops
    if cpu_ops[0] == 'dot_general':
        assert len(re.findall(r'stablehlo\.dot_general.*-> tensor<[0-9x]*xf32>', text)) == len(cpu_ops)
    assert re.findall(
        r'stablehlo\.convolution', export.export(jax.jit(conv), platforms=['cuda'])(x, k, b).mlir_module()
    )
    y = jax.jit(conv)(x, k, b)
    assert y.dtype == jnp.bfloat16
    dims = ('NHWC', 'HWIO', 'NHWC')
    x32, k32, b32 = (np.asarray(a, np.float32) for a in (x, k, b))
    expected = jax.lax.conv_general_dilated(
        x32,
        k32,
        strides,
        padding,
        rhs_dilation=dilations,
        dimension_numbers=dims,
        feature_group_count=groups,
        precision='highest',
    )
    assert relative_error(y, expected + b32) <= 2**-8  # one rounding to bfloat16 (8 significant bits)


@pytest.mark.parametrize(
    'kernel_size,groups,matmuls,convolutions',
    [(1, 1, 3, 0), (3, 4, 3 * 4, 2 * 4)],
    ids=['1x1-gradients-as-matmuls', '3x3-gradients-as-convolutions'],
)
def test_bfloat16_conv_gradients_on_cpu(kernel_size, groups, matmuls, convolutions, monkeypatch):
    """The backward pass of a bfloat16 conv on a CPU with bfloat16 arithmetic, gradients within rounding of float32's.

    A 1x1 conv's gradients are bfloat16 matmuls (its forward and two gradients: 3 matmuls); a 3x3
    conv's forward is bfloat16 row matmuls (one per kernel row and group) and its gradients are
    XLA's convolutions (two per group).
    """
    monkeypatch.setattr(lowering, 'cpu_has_bfloat16', lambda: True)
    rng = np.random.default_rng(5)
    shapes = ((2, 9, 7, 16), (kernel_size, kernel_size, 16 // groups, 16), (16,))
    x, k, b = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in shapes)

    def loss(conv, x, k, b):
        return jnp.sum(conv(x, k, b).astype(jnp.float32) ** 2)

    def ours(x, k, b):
        return lowering.conv2d(x, k, groups, bias=b, window_strides=(1, 1), padding='SAME')

    def reference(x, k, b):
        dims = ('NHWC', 'HWIO', 'NHWC')
        conv = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=dims, feature_group_count=groups)
        return conv + b

    grad = jax.jit(jax.grad(partial(loss, ours), argnums=(0, 1, 2)))
    text = grad.lower(x, k, b).as_text()
    dots = re.findall(
        r'stablehlo\.dot_general .*: \((tensor<[0-9x]*x(?:bf16|f32)>), (tensor<[0-9x]*x(?:bf16|f32)>)\)', text
    )
    assert len(dots) == matmuls
    assert all(lhs.endswith('xbf16>') and rhs.endswith('xbf16>') for lhs, rhs in dots)
    assert len(re.findall(r'stablehlo\.convolution', text)) == convolutions
    expected = jax.grad(partial(loss, reference), argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (x, k, b)))
    for got, want in zip(grad(x, k, b), expected, strict=True):
        assert got.dtype == jnp.bfloat16
        assert relative_error(got, want) < 0.01  # bfloat16 roundings of the output, the cotangent and the sums


@pytest.mark.parametrize('kernel_size,groups', [(3, 4), (1, 1), (3, 1)])
def test_bfloat16_convs_on_a_cpu_without_bfloat16_run_in_float32(kernel_size, groups, monkeypatch):
    """Without bfloat16 arithmetic in the CPU, a bfloat16 conv is the float32 one between conversions, bit for bit."""
    monkeypatch.setattr(lowering, 'cpu_has_bfloat16', lambda: False)
    rng = np.random.default_rng(6)
    shapes = ((2, 9, 7, 16), (kernel_size, kernel_size, 16 // groups, 16), (16,))
    x, k, b = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for shape in shapes)

    def conv(x, k, b):
        return lowering.conv2d(x, k, groups, bias=b, window_strides=(1, 1), padding='SAME')

    text = export.export(jax.jit(conv), platforms=['cpu'])(x, k, b).mlir_module()
    assert not re.findall(r'stablehlo\.(?:dot_general|convolution)[^\n]*bf16', text)  # no bfloat16 operand
    y = jax.jit(conv)(x, k, b)
    assert y.dtype == jnp.bfloat16
    expected = jax.jit(conv)(*(a.astype(jnp.float32) for a in (x, k, b))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))
    grads = jax.grad(lambda x, k: jnp.sum(conv(x, k, b).astype(jnp.float32) ** 2), argnums=(0, 1))(x, k)
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


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
    assert lowering.cpuinfo_has_bfloat16(cpuinfo) is expected


OPTIONS_WORKER = """
import jax
import numpy as np
import nfnet_jax
from nfnet_jax import inference, parallel
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.train import TrainState, eval_step, nfnet_optimizer, train_step

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


def test_every_top_level_jit_compiles_with_the_platform_options(tmp_path):
    """XLA dumps each compiled program's non-default options: every jit of ours carries the lowering's CPU list.

    The inference functions, the train and eval steps and their sharded forms; a classifier
    called inside a user's jit runs too (a nested jit may take no options), under that jit's.
    """
    assert nfnet_jax.compiler_options('gpu') is None and nfnet_jax.compiler_options('tpu') is None
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
    assert ours == nfnet_jax.compiler_options('cpu')['xla_cpu_experimental_ynn_fusion_type'].split(',')
    for name in ('jit_apply', 'jit_pure_train_step', 'jit_pure_eval_step'):  # plain and sharded, each
        assert fusion_types.get(name) == [ours, ours], name
    assert fusion_types.get('jit_users_jit') == [[]]
    # Training steps alone take the memory-optimised scheduler.
    assert schedulers['jit_pure_train_step'] == [['CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED']] * 2
    assert schedulers['jit_apply'] == schedulers['jit_pure_eval_step'] == [[], []]


def test_bfloat16_compute_from_float32_params():
    """bfloat16 activations, float32 parameters and folded kernels; logits close to float32 on random weights."""
    torch.manual_seed(0)
    theirs = timm.create_model('test_nfnet').eval()
    randomize_(theirs, seed=5)
    fp32 = from_timm(theirs)
    bf16 = nfnet_jax.create_model('test_nfnet', params=flat_params(fp32), dtype=jnp.bfloat16)
    classify = inference.classifier(bf16)
    assert {leaf.dtype for leaf in jax.tree.leaves(classify.state) if jnp.issubdtype(leaf.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)
    }
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64, 64, 3)), jnp.float32)
    features = inference.compile_forward(bf16, lambda m, x: m.forward_features(x))(x)
    assert features.dtype == jnp.bfloat16
    logits, reference = classify(x), inference.classifier(fp32)(x)
    assert relative_error(logits, reference) < 0.05  # bfloat16 has an 8-bit mantissa: ~0.4% per rounding
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) >= 0.75


def test_compilation_cache_is_written_then_reused_by_a_second_process(tmp_path):
    """Two fresh processes on one cache folder: the first writes entries, the second loads them."""
    command = [sys.executable, '-m', 'benchmarks.cold_start', '--child', '--model', 'test_nfnet']
    command += ['--batch', '1', '--size', '32', '--cache', str(tmp_path)]
    first = json.loads(subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries and first['cache_hits'] == 0
    second = json.loads(subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert second['cache_hits'] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # read, nothing recompiled and written


def test_benchmark_smoke(tmp_path):
    """The benchmark end to end on test_nfnet, one repeat, without torch.compile: the report's structure only."""
    from benchmarks import vs_timm

    out = tmp_path / 'bench.json'
    report = vs_timm.main(
        ['--model', 'test_nfnet', '--batch', '2', '--size', '64', '--repeats', '1']
        + ['--skip-compile', '--json', str(out)]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (run,) = report['runs']
    assert (run['batch'], run['size']) == (2, 64)
    assert set(run['results']) == {vs_timm.JAX_CONFIG, *vs_timm.TIMM_CONFIGS[:2]}
    for result in run['results'].values():
        assert len(result['run_s']) == 1 and result['images_per_s'] > 0 and result['first_call_s'] > 0
    assert set(run['ratios']) == {f'vs {name}' for name in vs_timm.TIMM_CONFIGS[:2]} | {'vs best timm'}
    assert run['logits_rel_error_vs_timm'] < 1e-4  # same weights, same images on both sides
    assert report['matmul_ceiling_gflops'] > 0 and report['matmul_ceiling_matmul'].endswith(' float32')
    with pytest.raises(SystemExit):  # an existing output is not replaced without --force
        vs_timm.main(['--model', 'test_nfnet', '--json', str(out)])


def test_matmul_ceiling_keeps_to_its_time_budget():
    """With no time to spare the ceiling stays at the smallest matmul instead of timing a 4096x4096 one."""
    from benchmarks import vs_timm

    ceiling = vs_timm.matmul_ceiling('float32', gpu=False, repeats=1, budget_s=0.0)
    assert ceiling.matmul == '512x512 float32' and ceiling.gflops > 0


def test_bfloat16_ceiling_is_at_least_the_float32_one(monkeypatch):
    """Where torch's bfloat16 matmul is slower than float32's (no bfloat16 instructions), float32 sets the limit."""
    from benchmarks import vs_timm

    speeds = {'bfloat16': 1.0, 'float32': 130.0}
    monkeypatch.setattr(vs_timm, '_timed_matmul', lambda dtype, *_: vs_timm.Ceiling(speeds[dtype], 1024, dtype))
    assert vs_timm.matmul_ceiling('bfloat16', gpu=False).dtype == 'float32'
    speeds['bfloat16'] = 1700.0  # AMX
    assert vs_timm.matmul_ceiling('bfloat16', gpu=False) == vs_timm.Ceiling(1700.0, 1024, 'bfloat16')


def test_train_step_benchmark_in_bfloat16(capsys, monkeypatch):
    """The training-step benchmark end to end in bfloat16 on test_nfnet: every configuration steps, one row each,
    its speed also as GFLOP/s of the step's FLOPs and as a share of the ceiling."""
    from benchmarks import train_step, vs_timm

    monkeypatch.setattr(train_step, 'matmul_ceiling', lambda *_: vs_timm.Ceiling(1.0, 512, 'float32'))
    train_step.main(
        ['--model', 'test_nfnet', '--batch', '2', '--size', '32', '--steps', '1', '--skip-compile']
        + ['--dtype', 'bfloat16']
    )
    out = capsys.readouterr().out
    assert 'test_nfnet training step, batch 2 at 32x32, bfloat16' in out
    assert 'ceiling: a 512x512 float32 matmul in torch at 1 GFLOP/s' in out
    name = r'(timm eager NCHW|timm eager channels_last|nfnet_jax jit \(cpu\))'
    rows = re.findall(rf'^\| {name} \| ([0-9.]+) \|.*\| ([0-9]+) \(([0-9]+)%\) \|', out, re.M)
    assert [row[0] for row in rows] == ['timm eager NCHW', 'timm eager channels_last', 'nfnet_jax jit (cpu)']
    assert all(float(seconds) > 0 for _, seconds, _, _ in rows)
    # Of a 1 GFLOP/s ceiling the share is 100x the speed, which the GFLOP/s column shows rounded.
    assert all(int(share) > 0 and abs(int(share) / 100 - int(gflops)) <= 0.51 for _, _, gflops, share in rows)


def test_train_step_flops_are_three_forwards():
    """The step's FLOP count covers the backward: about 3x the forward's (input and kernel gradients)."""
    from benchmarks import train_step, vs_timm

    forward = vs_timm.flops_per_image(nfnet_jax.create_model('test_nfnet'), 32)
    assert 2.9 < train_step.step_flops('test_nfnet', 2, 32) / (2 * forward) < 3.1


def test_conv_ops_benchmark(tmp_path):
    """Every convolution of test_nfnet's forward, found by the benchmark, timed on both sides and equal to torch's."""
    from flax import nnx

    from benchmarks import conv_ops
    from nfnet_jax.layers import ScaledStdConv2d

    model = nfnet_jax.create_model('test_nfnet')
    convs = conv_ops.model_convs(model, 2, 64)
    assert sum(convs.values()) == sum(isinstance(m, ScaledStdConv2d) for _, m in nnx.iter_graph(model))
    assert any(conv.groups > 1 for conv in convs) and any(conv.strides == (2, 2) for conv in convs)

    out, table = tmp_path / 'convs.json', tmp_path / 'convs.md'
    args = ['--model', 'test_nfnet', '--batch', '2', '--size', '64', '--repeats', '1']
    report = conv_ops.main(args + ['--json', str(out), '--markdown', str(table)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row['label'] for row in report['convs']] == [conv.label for conv in convs]
    for row in report['convs']:
        for side in conv_ops.SIDES:
            assert all(len(s) == 1 and s[0] > 0 for s in row['seconds'][side].values())
        assert max(row['rel_error'].values()) < FP32_RTOL  # every pass, SAME and symmetric padding, groups
        assert row['result_dtypes'] == {'nfnet_jax': 'float32', 'torch': 'float32'}
    assert f'| all, per step |  | {sum(convs.values())} |' in table.read_text()
    with pytest.raises(SystemExit):  # an existing output is not replaced without --force
        conv_ops.main(['--model', 'test_nfnet', '--json', str(out)])


def test_conv_ops_bfloat16_passes_agree_with_torch():
    """`--dtype bfloat16` runs every pass in bfloat16 on both sides: a grouped, strided SAME conv agrees within
    bfloat16's rounding (1e-2 relative; at most 2e-3 on test_nfnet's convolutions, this one exactly)."""
    from types import SimpleNamespace

    from benchmarks import conv_ops

    conv = conv_ops.Conv((2, 9, 9, 16), (3, 3, 8, 16), 2, (2, 2), 'SAME', (1, 1))
    result = conv_ops.measure(conv, 1, 'cpu', SimpleNamespace(update=lambda n: None), dtype='bfloat16')
    assert result['result_dtypes'] == {'nfnet_jax': 'bfloat16', 'torch': 'bfloat16'}
    assert max(result['rel_error'].values()) < 1e-2


def test_step_profile_lists_the_step_s_instructions(tmp_path):
    """The step profile of test_nfnet: both tables, each row an instruction of the compiled step with its time."""
    from benchmarks import step_profile

    out = tmp_path / 'profile.md'
    args = ['--model', 'test_nfnet', '--batch', '2', '--size', '32', '--steps', '1', '--top', '5']
    text = step_profile.main(args + ['--markdown', str(out)])
    assert out.read_text() == text
    kinds = re.findall(r'^\| ([\w-]+) \| (\d+) \| ([0-9.]+) \| ([0-9.]+)% \|$', text, re.M)
    slowest = re.findall(
        r'^\| ([\w.-]+) \| ((?:f32|bf16|s32)\[[\d,]*\]) \| [^|]* \| ([0-9.]+) \| ([0-9.]+)% \|$', text, re.M
    )
    assert len(kinds) == 5 and len(slowest) == 5, text
    times = [float(ms) for *_, ms, _ in slowest]  # each row's shape comes from the compiled step's HLO
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert all(float(share) <= 100 for *_, share in kinds + slowest)
    with pytest.raises(SystemExit):  # an existing report is not replaced without --force
        step_profile.main(args + ['--markdown', str(out)])
    with pytest.raises(ValueError, match='--keep-cpu-memory needs a process in which JAX has not run'):
        step_profile.main(args + ['--keep-cpu-memory'])  # the flag is applied, and here JAX has run
