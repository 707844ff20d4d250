"""The jitted inference path: folded standardisation, per-backend grouped convs, bfloat16, compilation cache.

Metric: relative error max|a - b| / max|b| against the plain model call (float32, at most
FP32_RTOL = 1e-5), on timm models whose every tensor is randomised first.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from helpers import FP32_RTOL, randomize_, relative_error

import nfnet_jax
from nfnet_jax import inference
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
    from nfnet_jax.models.layers import ScaledStdConv2d

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
