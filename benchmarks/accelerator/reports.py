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
    sections = (
        ('parity', 'Parity with timm', render_parity),
        ('train_step', 'Train step', render_train),
        ('vs_timm', 'Inference against timm', render_vs_timm),
        ('program_check', 'Optimised programs', render_programs),
        ('sharded_inference', 'Sharded inference', render_sharded),
        ('remat_memory', 'Gradient checkpointing memory', render_remat),
    )
    for name, title, render in sections:
        results = report['steps'].get(name, {}).get('results')
        if results:
            lines += ['', f'## {title} (`{name}`)', '', *render(results)]
        if name == 'vs_timm':  # the compile times of the steps so far, before the check of what they compiled
            compiles = render_compiles(report)
            if compiles:
                lines += ['', '## Compile times', '', *compiles]
    return '\n'.join(lines) + '\n'


def render_parity(results: dict[str, Any]) -> list[str]:
    lines = [
        'max|ours - timm| / max|timm| over each output (logits, pre-logits, forward_features, every feature tap), '
        f'against timm float32 on the CPU; the tolerance is {results.get("tolerance")}. nfnet_jax computed every '
        f'precision in one program, compiled {results.get("compilations", "n/a")} time(s).',
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
    matmuls = results.get('matmul_ceiling_matmul', {})
    if matmuls:
        lines += [
            "Ceiling: the fastest square matmul of torch's, XLA's and torch's 1x1 convolution ("
            + ', '.join(f'{dtype}: {matmul}' for dtype, matmul in matmuls.items())
            + '), timed in every round beside the configurations: its median GFLOP/s in the ceiling column.',
            '',
        ]
    columns = ('dtype', 'batch', 'configuration', 'images/s median (best)', 'ms/batch', 'GFLOP/s (% of ceiling)')
    columns += ('ceiling GFLOP/s',)
    rows = []
    for run in results.get('runs', []):
        ours = run['results'].get('nfnet_jax jit', {}).get('images_per_s')
        for name, r in run['results'].items():
            ratio = f'{ours / r["images_per_s"]:.2f}x' if ours else 'n/a'
            rate = f'{r["images_per_s"]:.1f} ({r["best_images_per_s"]:.1f})'
            ms = 1e3 * statistics.median(r['run_s'])
            ceiling = run.get('ceiling_gflops')
            share = f'{r["gflops"]:.0f} ({100 * r["gflops"] / ceiling:.0f}%)' if ceiling else f'{r["gflops"]:.0f}'
            cells = (rate, f'{ms:.2f}', share, fmt(ceiling, '.0f'), f'{r["first_call_s"]:.1f}', ratio)
            rows.append((run['dtype'], run['batch'], name, *cells))
    lines += table((*columns, 'first call s', 'nfnet_jax / this'), rows)
    errors = [
        f'{run["dtype"]} batch {run["batch"]}: {run["logits_rel_error_vs_timm"]:.1e}' for run in results.get('runs', [])
    ]
    if errors:
        lines += ['', 'Logits relative error against timm eager NCHW (same dtype): ' + ', '.join(errors) + '.']
    return lines


def median_ms(seconds: list[float]) -> float | None:
    """The median of a list of seconds, in milliseconds; None for an empty one."""
    return 1e3 * statistics.median(seconds) if seconds else None


def render_train(results: dict[str, Any]) -> list[str]:
    lines = [
        f'{results.get("model")} at {results.get("size")}x{results.get("size")}: forward, cross entropy (label '
        'smoothing 0.1), backward, AGC, SGD with Nesterov momentum and weight decay; nfnet_jax also updates an EMA '
        'of the weights. Step ms: per step, over rounds of '
        f"{results.get('steps')} steps dispatched back to back (the device's pace), median of "
        f'{results.get("rounds")} rounds. Host ms: how long a call takes to return, median and worst (what Python '
        'and dispatch cost per step; the device runs meanwhile). "plain jax.jit" is the same step jitted over '
        'the state split once: the least a host can spend. bfloat16: nfnet_jax computes in bfloat16 from float32 '
        'parameters, timm under AMP.',
        '',
    ]
    rows = []
    for run in results.get('runs', []):
        flops = run.get('flops_per_step')
        for name, r in run['configs'].items():
            step = median_ms(r['step_s'])
            images = run['batch'] / step * 1e3 if step else None
            tflops = flops / step / 1e9 if step and flops else None
            host, worst = median_ms(r['host_s']), 1e3 * max(r['host_s']) if r['host_s'] else None
            cells = (fmt(step, '.1f'), fmt(images, '.0f'), fmt(tflops, '.1f'), fmt(host, '.2f'), fmt(worst, '.2f'))
            rows.append((run['dtype'], run['batch'], name, *cells, fmt(r['first_call_s'], '.1f')))
    columns = ('dtype', 'batch', 'configuration', 'step ms', 'images/s', 'TFLOP/s', 'host ms', 'worst host ms')
    return lines + table((*columns, 'first call s'), rows)


def render_compiles(report: dict[str, Any]) -> list[str]:
    """JAX's compilations of every step (trace, lowering, XLA's compile), those of one function in one part summed,
    and torch.compile's first calls."""
    summed: dict[tuple[str, str, str], list[Any]] = {}
    for name, step in report['steps'].items():
        for c in step.get('compiles', []):
            entry = summed.setdefault((name, c['part'], c['function']), [0, None, None, None])
            entry[0] += 1
            for index, key in enumerate(('trace_s', 'lower_s', 'compile_s'), 1):
                if key in c:
                    entry[index] = (entry[index] or 0.0) + c[key]
    rows = []
    for (name, part, function), (count, *phases) in summed.items():
        total = sum(p for p in phases if p is not None)
        rows.append((name, part, function, count, *(fmt(p, '.1f') for p in phases), f'{total:.1f}'))
    for run in report['steps'].get('vs_timm', {}).get('results', {}).get('runs', []):
        compiled = run['results'].get('timm compile channels_last')
        if compiled:
            what = f'{run["dtype"]} batch {run["batch"]}'
            rows.append(
                ('vs_timm', what, 'torch.compile, first call', 1, '', '', '', f'{compiled["first_call_s"]:.1f}')
            )
    if not rows:
        return []
    lines = [
        'Seconds, summed over the compilations of one function in one part (a lowering without a trace reuses '
        "the traced program); JAX's compilations under 0.5 s in all are left out.",
        '',
    ]
    return lines + table(('step', 'part', 'function', 'compilations', 'trace', 'lower', 'XLA compile', 'total'), rows)


def render_programs(results: dict[str, Any]) -> list[str]:
    lines = [
        'Each program compiled above, as XLA optimised it (`programs/`), searched for what only the CPU backend puts '
        'there: conditionals, loops, calls into CPU libraries (oneDNN, MKL), all-zero constants added, grouped '
        'convolutions split.',
        '',
    ]
    rows = []
    for name, r in results.get('checked', {}).items():
        findings = '; '.join(f'{kind} x{f["count"]}' for kind, f in r['findings'].items()) or 'none'
        calls = ', '.join(f'{target} x{count}' for target, count in r['custom_calls'].items())
        rows.append((name, r['instructions'], r['convolutions'], r['grouped_convolutions'], calls, findings))
    columns = ('program', 'instructions', 'convolutions', 'grouped', 'custom calls', 'findings')
    return lines + table(columns, rows)


def render_sharded(results: dict[str, Any]) -> list[str]:
    lines = [
        f'{results.get("model")}, float32, global batch {results.get("batch")} at {results.get("size")}x'
        f'{results.get("size")}, {results.get("devices")} {results.get("platform")} device(s).',
        '',
    ]
    keys = ('images_s_median', 'images_s_best', 'first_s')
    rows = [(name, *(f'{r[key]:.1f}' for key in keys)) for name, r in results.get('configs', {}).items()]
    return lines + table(('configuration', 'images/s median', 'images/s best', 'first call s'), rows)


def render_remat(results: dict[str, Any]) -> list[str]:
    lines = [
        f'{results.get("model")}, a float32 training step at batch {results.get("batch")}, {results.get("size")}x'
        f'{results.get("size")}: what the backward pass keeps from the forward, and the bytes XLA plans (MiB).',
        '',
    ]
    keys = ('residual_bytes', 'temp_bytes', 'argument_bytes')
    rows = [
        (name, *(f'{r[key] / 2**20:,.0f}' for key in keys), f'{r["compile_s"]:.0f}')
        for name, r in results.get('configs', {}).items()
    ]
    return lines + table(('step', 'residuals', 'XLA temporaries', 'arguments', 'compile s'), rows)
