"""The accelerator run's reports: the JSON record of every figure, and its markdown rendering.

Only the standard library and `benchmarks.markdown`: the watching process renders the reports
without importing torch or JAX.
"""

from __future__ import annotations

import json
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.markdown import fmt, table

SCHEMA = 1  # the JSON report's format


def utc_now() -> str:
    """Now, as the reports give their start and end."""
    return datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')


def write_reports(report: dict[str, Any], json_path: Path, markdown_path: Path) -> None:
    """Both reports, each replaced whole (the outputs were checked for --force before the run)."""
    from nfnet_jax.files import atomic_write

    text = json.dumps(report, indent=2, default=str)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'), force=True)
    markdown = render_markdown(report)
    atomic_write(markdown_path, lambda tmp: Path(tmp).write_text(markdown, encoding='utf-8'), force=True)


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown report: the machine, each step's status and notes, then each step's figures so far."""
    machine, env = report['machine'], report.get('environment') or {}
    lines = [
        '# nfnet_jax accelerator figures',
        '',
        f'Started {report["started"]}, '
        + (f'finished {report["finished"]}.' if report.get('finished') else 'running.'),
        f'Command: `{report["command"]}`' + (' (`--quick`)' if report['quick'] else ''),
        '',
        '## Machine',
        '',
    ]
    gpus = machine.get('gpus') or []
    rows = [
        ('device', env.get('jax_device_kind') or ('CPU' if not gpus else gpus[0].get('name'))),
        ('devices', env.get('jax_device_count')),
        ('GPU', ', '.join(f'{g.get("name")} ({g.get("memory.total")})' for g in gpus) or 'none'),
        ('driver', gpus[0].get('driver_version') if gpus else None),
        ('CUDA (driver supports)', machine.get('cuda_driver_supports')),
        ('CUDA (torch built with)', env.get('torch_cuda')),
        ('cuDNN (torch)', env.get('torch_cudnn')),
        ('CPU', f'{machine.get("cpu")}, {machine.get("cpu_cores")} cores, {machine.get("memory_gib")} GiB'),
        ('jax / jaxlib', f'{env.get("jax")} / {env.get("jaxlib")}' if env else None),
        ('jax CUDA plugin', env.get('jax_cuda_plugin')),
        ('nfnet_jax convolutions on CPU', env.get('cpu_convolutions')),
        ('flax', env.get('flax')),
        ('torch / timm', f'{env.get("torch")} / {env.get("timm")}' if env else None),
        ('python', machine.get('python')),
        ('nfnet_jax commit', machine.get('nfnet_jax_commit')),
    ]
    lines += table(('item', 'value'), rows)
    steps = []
    for name, step in report['steps'].items():
        notes = [step.get('error') or '', *(f'skipped {s["what"]}: {s["why"]}' for s in step.get('skipped', []))]
        notes += [f'{e["what"]}: {e["error"]}' for e in step.get('errors', [])]
        seconds = (fmt(step.get(key), '.0f') for key in ('elapsed_s', 'budget_s'))
        steps.append((name, step['status'], *seconds, '; '.join(n for n in notes if n).replace('|', '/')))
    lines += ['', '## Steps', '', *table(('step', 'status', 'seconds', 'budget s', 'notes'), steps)]
    for name, render in (
        ('parity', render_parity),
        ('vs_timm', render_vs_timm),
        ('train_step', render_train),
        ('sharded_inference', render_sharded),
    ):
        results = report['steps'].get(name, {}).get('results')
        if results:
            lines += ['', f'## {name}', '', *render(results)]
    return '\n'.join(lines) + '\n'


def render_parity(results: dict[str, Any]) -> list[str]:
    lines = [
        'max|ours - timm| / max|timm| over each output, against timm float32 on the CPU; '
        f'the tolerance is {results.get("tolerance")}.',
        '',
    ]
    columns = ('nfnet_jax highest', 'nfnet_jax default', 'fast path (highest)', 'fast path (default)')
    columns += ('timm on device, TF32 off', 'timm on device, torch defaults')
    keys = ('highest', 'default', 'fast path highest', 'fast path default')
    keys += ('timm on device, TF32 off', 'timm on device, defaults')
    rows = [
        (model, size, *(fmt(r.get(key), '.1e') for key in keys), 'yes' if r.get('pass') else 'NO')
        for model, sizes in results.get('models', {}).items()
        for size, r in sizes.items()
    ]
    return lines + table(('model', 'size', *columns, 'pass'), rows)


def render_vs_timm(results: dict[str, Any]) -> list[str]:
    lines = [
        f'{results.get("model")} at {results.get("size")}x{results.get("size")}, {results.get("repeats")} timed '
        'calls per configuration, round-robin. bfloat16: timm under autocast, nfnet_jax with dtype=bfloat16; '
        'float32: both at their default precision (on NVIDIA GPUs, TF32 convolutions).',
        '',
    ]
    ceilings = results.get('matmul_ceiling_gflops', {})
    matmuls = results.get('matmul_ceiling_matmul', {})
    if ceilings:
        lines += [
            "Ceiling: torch's square matmul, "
            + ', '.join(
                f'{dtype} {gflops:.0f} GFLOP/s ({matmuls.get(dtype, "?")})' for dtype, gflops in ceilings.items()
            )
            + '.',
            '',
        ]
    columns = ('dtype', 'batch', 'configuration', 'images/s median (best)', 'ms/batch', 'GFLOP/s (% of ceiling)')
    rows = []
    for run in results.get('runs', []):
        ours = run['results'].get('nfnet_jax jit', {}).get('images_per_s')
        for name, r in run['results'].items():
            ratio = f'{ours / r["images_per_s"]:.2f}x' if ours else 'n/a'
            rate = f'{r["images_per_s"]:.1f} ({r["best_images_per_s"]:.1f})'
            ms = 1e3 * statistics.median(r['run_s'])
            ceiling = ceilings.get(run['dtype'])
            share = f'{r["gflops"]:.0f} ({100 * r["gflops"] / ceiling:.0f}%)' if ceiling else f'{r["gflops"]:.0f}'
            rows.append((run['dtype'], run['batch'], name, rate, f'{ms:.2f}', share, f'{r["first_call_s"]:.1f}', ratio))
    lines += table((*columns, 'first call s', 'nfnet_jax / this'), rows)
    errors = [
        f'{run["dtype"]} batch {run["batch"]}: {run["logits_rel_error_vs_timm"]:.1e}' for run in results.get('runs', [])
    ]
    if errors:
        lines += ['', 'Logits relative error against timm eager NCHW (same dtype): ' + ', '.join(errors) + '.']
    return lines


def render_train(results: dict[str, Any]) -> list[str]:
    flops = results.get('flops_per_step')
    lines = [
        f'{results.get("model")}, batch {results.get("batch")} at {results.get("size")}x{results.get("size")}, '
        'float32 on both sides (default precision), SGD + AGC as benchmarks.train_step'
        + (f'; {flops / 1e9:.1f} GFLOP per step.' if flops else '.'),
        '',
    ]
    rows = []
    for name, r in results.get('configs', {}).items():
        median = statistics.median(r['step_s']) if r['step_s'] else None
        images = results['batch'] / median if median else None
        gflops = flops / median / 1e9 if median and flops else None
        first = fmt(r['first_step_s'], '.1f')
        rows.append((name, fmt(median, '.3f'), fmt(images, '.1f'), fmt(gflops, '.0f'), first, len(r['step_s'])))
    return lines + table(('configuration', 'median s/step', 'images/s', 'GFLOP/s', 'first step s', 'timed steps'), rows)


def render_sharded(results: dict[str, Any]) -> list[str]:
    lines = [
        f'{results.get("model")}, float32, global batch {results.get("batch")} at {results.get("size")}x'
        f'{results.get("size")}, {results.get("devices")} {results.get("platform")} device(s).',
        '',
    ]
    keys = ('images_s_median', 'images_s_best', 'first_s')
    rows = [(name, *(f'{r[key]:.1f}' for key in keys)) for name, r in results.get('configs', {}).items()]
    return lines + table(('configuration', 'images/s median', 'images/s best', 'first call s'), rows)
