"""The benchmarks (benchmarks/) end to end on test_nfnet, as `python -m benchmarks.X` runs them: on CPU with
nfnet_jax's CPU backend on (each test turns it on, as a benchmark does when it is the process).

Only the reports' structure and the agreement of both sides' results are checked, never a speed.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import FP32_RTOL, cpu_backend

import nfnet_jax
from nfnet_jax import cpu
from nfnet_jax.cpu import convolution, onednn


@pytest.fixture(autouse=True)
def backend_on():
    """The CPU backend on for each test, as a benchmark turns it on when it is the process."""
    with cpu_backend() as kernels:
        yield kernels


@pytest.mark.slow
def test_vs_timm_benchmark_smoke(tmp_path, backend_on):
    """vs_timm end to end on test_nfnet, one repeat, without torch.compile: the report's structure, and which
    kernels ran nfnet_jax's convolutions."""
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
    assert run['ceiling_gflops'] > 0  # the ceiling's matmul timed again beside the configurations
    assert report['cpu_convolutions'] == f'{onednn.cpu_convolutions() if backend_on.onednn else "XLA"} (CPU backend)'
    assert not report['keep_cpu_memory']  # off unless asked: the peak-memory columns need the allocator's defaults
    with pytest.raises(SystemExit):  # an existing output is not replaced without --force
        vs_timm.main(['--model', 'test_nfnet', '--json', str(out)])


def test_matmul_ceiling_keeps_to_its_time_budget():
    """With no time to spare the ceiling stays at the smallest matmul instead of timing a 4096x4096 one."""
    from benchmarks import vs_timm

    ceiling = vs_timm.matmul_ceiling('float32', gpu=False, repeats=1, budget_s=0.0)
    assert ceiling.matmul.endswith(' 512x512 float32') and ceiling.gflops > 0
    assert ceiling.retimed([2 * 512**3 / 1e9]).gflops == pytest.approx(1.0)  # the speed of a median call


def test_the_ceiling_is_the_fastest_matmul_of_either_framework_and_dtype(monkeypatch):
    """Where torch's bfloat16 matmul is slower than float32's (no bfloat16 instructions), float32 sets the limit;
    where torch's float32 matmul is slow (MKL on AMD CPUs, no TF32 on NVIDIA GPUs), XLA's sets it."""
    from benchmarks import vs_timm

    speeds = {
        ('torch', 'bfloat16'): 1.0,
        ('torch', 'float32'): 100.0,
        ('XLA', 'bfloat16'): 2.0,
        ('XLA', 'float32'): 230.0,
        ('torch 1x1 convolution', 'bfloat16'): 3.0,
        ('torch 1x1 convolution', 'float32'): 220.0,
    }

    def timed(framework, dtype, *_):
        return vs_timm.Ceiling(speeds[framework, dtype], 1024, dtype, framework)

    monkeypatch.setattr(vs_timm, '_timed_matmul', timed)
    assert vs_timm.matmul_ceiling('bfloat16', gpu=False) == vs_timm.Ceiling(230.0, 1024, 'float32', 'XLA')
    assert vs_timm.matmul_ceiling('float32', gpu=False).matmul == 'XLA 1024x1024 float32'
    speeds['torch', 'bfloat16'] = 1700.0  # AMX
    assert vs_timm.matmul_ceiling('bfloat16', gpu=False) == vs_timm.Ceiling(1700.0, 1024, 'bfloat16', 'torch')


@pytest.mark.slow
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
    assert 'ceiling: the torch 512x512 float32 matmul at 1 GFLOP/s' in out
    assert ', convolutions in ' in out and '(CPU backend)' in out
    name = r'(timm eager NCHW|timm eager channels_last|nfnet_jax jit \(cpu\))'
    rows = re.findall(rf'^\| {name} \| ([0-9.]+) \|.*\| ([0-9]+) \(([0-9]+)%\) \|', out, re.M)
    assert [row[0] for row in rows] == ['timm eager NCHW', 'timm eager channels_last', 'nfnet_jax jit (cpu)']
    assert all(float(seconds) > 0 for _, seconds, _, _ in rows)
    # Of a 1 GFLOP/s ceiling the share is 100x the speed, which the GFLOP/s column shows rounded.
    assert all(int(share) > 0 and abs(int(share) / 100 - int(gflops)) <= 0.51 for _, _, gflops, share in rows)


def test_train_step_flops_are_three_forwards(backend_on):
    """The step's FLOP count covers the backward: about 3x the forward's (input and kernel gradients). Both are
    counted on XLA's own convolutions (the cost analysis sees no work in oneDNN's calls), and the backend is
    on again after."""
    from benchmarks import conv_ops, train_step, vs_timm

    model = nfnet_jax.create_model('test_nfnet')
    forward = vs_timm.flops_per_image(model, 32)
    convolutions = sum(conv.flops * count for conv, count in conv_ops.model_convs(model, 1, 32).items())
    assert convolutions < forward < 1.1 * convolutions  # the convolutions' multiply-adds are most of the work
    assert 2.9 < train_step.step_flops('test_nfnet', 2, 32) / (2 * forward) < 3.1
    assert cpu.enabled() and convolution.kernels() == backend_on
    with vs_timm.xla_convolutions():
        assert not cpu.enabled()
    assert convolution.kernels() == backend_on


@pytest.mark.slow
def test_conv_ops_benchmark(tmp_path):
    """Every convolution of test_nfnet's forward (the standardised ones and squeeze-excite's), found by the
    benchmark, timed on both sides and equal to torch's."""
    from flax import nnx

    from benchmarks import conv_ops
    from nfnet_jax.models.layers import ScaledStdConv2d

    model = nfnet_jax.create_model('test_nfnet')
    convs = conv_ops.model_convs(model, 2, 64)
    layers = (ScaledStdConv2d, nnx.Conv)
    assert sum(convs.values()) == sum(isinstance(m, layers) for _, m in nnx.iter_graph(model))
    assert any(conv.groups > 1 for conv in convs) and any(conv.strides == (2, 2) for conv in convs)

    out, table = tmp_path / 'convs.json', tmp_path / 'convs.md'
    args = ['--model', 'test_nfnet', '--batch', '2', '--size', '64', '--repeats', '1']
    report = conv_ops.main(args + ['--json', str(out), '--markdown', str(table)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row['label'] for row in report['convs']] == [conv.label for conv in convs]
    assert report['cpu_convolutions'].endswith('(CPU backend)')  # the backend's lowering is what is timed
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
    bfloat16's rounding."""
    from types import SimpleNamespace

    from benchmarks import conv_ops

    conv = conv_ops.Conv((2, 8, 8, 16), (3, 3, 8, 16), 2, (2, 2), ((0, 1), (0, 1)), (1, 1))  # TensorFlow's SAME
    result = conv_ops.measure(conv, 1, 'cpu', SimpleNamespace(update=lambda n: None), dtype='bfloat16')
    assert result['result_dtypes'] == {'nfnet_jax': 'bfloat16', 'torch': 'bfloat16'}
    assert max(result['rel_error'].values()) < 1e-2


@pytest.mark.slow
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


@pytest.mark.slow
def test_loop_overhead_benchmark_smoke(tmp_path):
    """loop_overhead end to end on test_nfnet, one short run of each loop: the report's structure."""
    from benchmarks import loop_overhead

    out = tmp_path / 'loop.json'
    report = loop_overhead.main(['--size', '32', '--batch', '8', '--steps', '2', '--runs', '1', '--json', str(out)])
    assert json.loads(out.read_text()) == report
    assert len(report['loop_steps_per_s']) == len(report['raw_steps_per_s']) == 1
    assert report['ratio'] == report['loop_median'] / report['raw_median'] > 0


@pytest.mark.slow
def test_input_pipeline_benchmark_smoke(capsys):
    """input_pipeline end to end at a tiny size, one worker: every row of the table measured, ours against timm's."""
    from benchmarks import input_pipeline

    rates = input_pipeline.main(['--images', '12', '--size', '32', '--batch', '4', '--workers', '1', '--runs', '1'])
    assert {kind for kind, _ in rates} == {'train', 'eval', 'decode'} and len(rates) == 5
    assert all(rate > 0 for rate in rates.values())
    table = capsys.readouterr().out
    assert table.count('| timm create_loader |') == 2 and '| 1.00x |' in table
