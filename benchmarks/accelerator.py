"""Every accelerator figure in one short run: parity on the device, speed against timm, training, sharding.

    benchmarks/accelerator.sh [--quick] [--json accelerator.json] [--markdown accelerator.md] [--force]
    python -m benchmarks.accelerator [--quick] [--device auto|cpu|gpu] [--budget SECONDS] [--steps parity,...]

The steps, each with its own time budget:

1. `parity`: dm_nfnet_f0, eca_nfnet_l0 and nf_regnet_b0 with every tensor randomised (as
   tests/test_parity.py does), run on the device against timm in float32 on the CPU (the test
   suite's reference): the logits, pre-logits, forward_features and the feature taps, and the
   folded inference path's logits, at 'highest' matmul precision (what reproduces timm) and
   at JAX's default precision (TF32 on NVIDIA GPUs). timm itself on the device is compared
   with the same reference, with TF32 off and with torch's defaults.
2. `vs_timm`: `benchmarks.vs_timm`'s measurements in bfloat16 and float32 at batch 1, 32 and
   256 (timm under AMP with channels_last, eager and torch.compile). torch.compile costs about
   a minute per shape on a GPU, so it runs only where the step's budget leaves room for it.
3. `train_step`: `benchmarks.train_step`'s step of both frameworks on the same weights and batch.
4. `sharded_inference`: `benchmarks.sharded_inference`'s one device against all of them.

The steps run in a child process, one after another; this process watches it, kills it when a
step runs past its budget (or it dies) and starts a fresh one for the remaining steps. The
child saves its results after every measurement, so a killed or failed step keeps what it had,
and this process writes the JSON and markdown reports after every change: an interrupted run
still leaves every figure measured so far. Without a GPU everything runs on the CPU, with tiny
sizes under `--quick`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import cpu_model
from benchmarks.markdown import fmt, table

REPO = Path(__file__).resolve().parents[1]
STEPS = ('parity', 'vs_timm', 'train_step', 'sharded_inference')
SCHEMA = 1
# Seconds a step may run past its budget before it is killed: the child checks its budget only between measurements.
GRACE_S = 20.0
# The longest a fresh child may take to import jax, torch and timm and look at its devices.
STARTUP_S = 180.0
# What a configuration's first call measures (compilation included).
FIRST_CALL_FIGURES = ('first_call_s', 'first_call_peak_mib', 'warm_call_peak_mib')


# --- settings --------------------------------------------------------------------------------------------------------


def default_settings(gpu: bool, quick: bool) -> dict[str, Any]:
    """What each step runs and its budget in seconds, for a GPU or a CPU, full or `--quick`.

    On a GPU the budgets fit 8 minutes (4 with `--quick`). On a CPU they only stop a run that hangs:
    compiling even test_nfnet takes tens of seconds on a small, busy machine.
    """
    families = ['dm_nfnet_f0', 'eca_nfnet_l0', 'nf_regnet_b0']
    if gpu:
        full = not quick
        return dict(
            budget_s=480 if full else 240,
            parity=dict(
                budget_s=100 if full else 55,
                models=families if full else families[:1],
                sizes=[[67, 53], [64, 64]] if full else [[67, 53]],
                batch=2,
                precisions=['highest', 'default'],
            ),
            vs_timm=dict(
                budget_s=210 if full else 85,
                model='dm_nfnet_f0',
                size=256,
                dtypes=['bfloat16', 'float32'] if full else ['bfloat16'],
                batches=[32, 256, 1] if full else [32, 1],
                repeats=10 if full else 5,
                compile='auto' if full else 'none',
            ),
            train_step=dict(budget_s=75 if full else 45, model='dm_nfnet_f0', batch=32, size=192, steps=5),
            sharded_inference=dict(
                budget_s=45 if full else 30, model='dm_nfnet_f0', batch_per_device=64, size=256, runs=5
            ),
        )
    if not quick:  # dm_nfnet_f0 at small sizes
        return dict(
            budget_s=1800,
            parity=dict(budget_s=600, models=families, sizes=[[67, 53], [64, 64]], batch=2, precisions=['highest']),
            vs_timm=dict(
                budget_s=600,
                model='dm_nfnet_f0',
                size=128,
                dtypes=['float32', 'bfloat16'],
                batches=[1, 4],
                repeats=3,
                compile='none',
            ),
            train_step=dict(budget_s=300, model='dm_nfnet_f0', batch=2, size=128, steps=2),
            sharded_inference=dict(budget_s=300, model='dm_nfnet_f0', batch_per_device=2, size=128, runs=2),
        )
    return dict(
        budget_s=900,
        parity=dict(budget_s=240, models=['test_nfnet'], sizes=[[67, 53]], batch=2, precisions=['highest']),
        vs_timm=dict(
            budget_s=240, model='test_nfnet', size=64, dtypes=['float32'], batches=[2], repeats=2, compile='none'
        ),
        train_step=dict(budget_s=240, model='test_nfnet', batch=2, size=64, steps=2),
        sharded_inference=dict(budget_s=180, model='test_nfnet', batch_per_device=2, size=64, runs=2),
    )


def int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(',') if value]


def name_list(text: str) -> list[str]:
    return [value.strip() for value in text.split(',') if value.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.accelerator', description=__doc__.split('\n\n')[0])
    parser.add_argument('--json', type=Path, default=Path('accelerator.json'), help='the JSON report')
    parser.add_argument('--markdown', type=Path, default=Path('accelerator.md'), help='the markdown report')
    parser.add_argument('--force', action='store_true', help='replace existing reports')
    parser.add_argument('--quick', action='store_true', help='fewer models, shapes and repeats (tiny ones on CPU)')
    parser.add_argument(
        '--device',
        choices=('auto', 'cpu', 'gpu'),
        default='auto',
        help='auto: the GPU when nvidia-smi lists one, else the CPU; cpu hides any GPU',
    )
    parser.add_argument('--steps', type=name_list, default=list(STEPS), help=f'a comma list of {", ".join(STEPS)}')
    parser.add_argument('--budget', type=float, help='seconds for the whole run (on a GPU: 480, --quick 240)')
    parser.add_argument(
        '--step-budget',
        action='append',
        default=[],
        metavar='STEP=SECONDS',
        help="one step's budget, e.g. vs_timm=300 (repeatable)",
    )
    parser.add_argument('--parity-models', type=name_list, help='architectures for the parity step')
    parser.add_argument('--model', help='the architecture of the speed steps (default dm_nfnet_f0)')
    parser.add_argument('--batches', type=int_list, help='vs_timm batch sizes, e.g. 32,256,1')
    parser.add_argument('--dtypes', type=name_list, help='vs_timm dtypes: bfloat16,float32')
    parser.add_argument('--size', type=int, help='vs_timm image size')
    parser.add_argument(
        '--compile',
        choices=('auto', 'all', 'none'),
        help='torch.compile in vs_timm: auto (where the budget leaves room), all, none',
    )
    parser.add_argument(
        '--cpu-devices', type=int, default=1, help='on CPU, XLA host devices for the sharded step (default 1)'
    )
    parser.add_argument('--worker', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        unknown = set(args.steps) - set(STEPS)
        if unknown or not args.steps:
            parser.error(f'--steps takes a comma list of {", ".join(STEPS)}; got {",".join(args.steps)}')
        if args.json.suffix != '.json' or args.markdown.suffix != '.md':
            parser.error('--json must name a .json file and --markdown a .md file')
        for item in args.step_budget:
            step, _, seconds = item.partition('=')
            try:
                ok = step in STEPS and float(seconds) > 0
            except ValueError:
                ok = False
            if not ok:
                parser.error(f'--step-budget takes STEP=SECONDS with a step of {", ".join(STEPS)}; got {item}')
        if args.dtypes and set(args.dtypes) - {'float32', 'bfloat16'}:
            parser.error('--dtypes takes float32 and/or bfloat16')
        if args.cpu_devices < 1 or (args.batches and min(args.batches) < 1) or (args.size and args.size < 32):
            parser.error('--cpu-devices and --batches must be at least 1 and --size at least 32')
    return args


def resolve_settings(args: argparse.Namespace, gpu: bool) -> dict[str, Any]:
    settings = default_settings(gpu, args.quick)
    if args.budget is not None:
        settings['budget_s'] = args.budget
    for item in args.step_budget:
        step, _, seconds = item.partition('=')
        settings[step]['budget_s'] = float(seconds)
    if args.parity_models:
        settings['parity']['models'] = args.parity_models
    if args.model:
        for step in ('vs_timm', 'train_step', 'sharded_inference'):
            settings[step]['model'] = args.model
    for key in ('batches', 'dtypes', 'size', 'compile'):
        if getattr(args, key) is not None:
            settings['vs_timm'][key] = getattr(args, key)
    return settings


# --- the machine, seen without importing JAX or torch ----------------------------------------------------------------


def command_output(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def nvidia_gpus() -> list[dict[str, str]]:
    """The GPUs nvidia-smi lists (name, driver, memory, compute capability); none without nvidia-smi."""
    fields = ('name', 'driver_version', 'memory.total', 'compute_cap')
    out = command_output(['nvidia-smi', f'--query-gpu={",".join(fields)}', '--format=csv,noheader'])
    if not out:
        return []
    return [dict(zip(fields, (v.strip() for v in line.split(',')), strict=False)) for line in out.splitlines()]


def host_machine(gpus: list[dict[str, str]]) -> dict[str, Any]:
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemTotal:'):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    cuda_driver_api = None
    header = command_output(['nvidia-smi']) if gpus else None
    if header and 'CUDA Version:' in header:
        cuda_driver_api = header.split('CUDA Version:')[1].split()[0]
    commit = command_output(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'])
    if commit and command_output(['git', '-C', str(REPO), 'status', '--porcelain', '--untracked-files=no']):
        commit += ' (with uncommitted changes)'
    return dict(
        cpu=cpu_model(),
        cpu_cores=os.cpu_count(),
        memory_gib=memory_gib,
        os=platform.platform(),
        python=sys.version.split()[0],
        gpus=gpus,
        cuda_driver_supports=cuda_driver_api,
        nfnet_jax_commit=commit,
    )


# --- reports ---------------------------------------------------------------------------------------------------------


def utc_now() -> str:
    return datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S UTC')


def write_reports(report: dict[str, Any], json_path: Path, markdown_path: Path) -> None:
    """Both reports, each replaced whole (the outputs were checked for --force before the run)."""
    from nfnet_jax.files import atomic_write

    text = json.dumps(report, indent=2, default=str)
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'), force=True)
    markdown = render_markdown(report)
    atomic_write(markdown_path, lambda tmp: Path(tmp).write_text(markdown, encoding='utf-8'), force=True)


def render_markdown(report: dict[str, Any]) -> str:
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


# --- the watching process --------------------------------------------------------------------------------------------


class Worker:
    """The child process running the steps, its stderr passed through and its last lines kept."""

    def __init__(self, config_path: Path, env: dict[str, str]):
        self.tail: deque[str] = deque(maxlen=15)
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'benchmarks.accelerator', '--worker', str(config_path)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors='replace',
            start_new_session=True,  # its own process group: torch.compile's workers die with it
        )
        self.reader = threading.Thread(target=self._pass_through, daemon=True)
        self.reader.start()

    def _pass_through(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            self.tail.append(line.rstrip())

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=5)


def worker_env(gpu: bool, cpu_devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (str(REPO), env.get('PYTHONPATH')) if p)
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'  # JAX and torch share the GPU in one process
    env.setdefault('TOKENIZERS_PARALLELISM', 'false')
    if not gpu:
        env['JAX_PLATFORMS'] = 'cpu'
        env['CUDA_VISIBLE_DEVICES'] = ''
        if cpu_devices > 1:
            flag = f'--xla_force_host_platform_device_count={cpu_devices}'
            env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {flag}'.strip()
    return env


def run_steps(args: argparse.Namespace) -> int:
    from nfnet_jax.files import check_report_file

    for path in (args.json, args.markdown):  # before any work, not after minutes of it
        check_report_file(path, args.force)
    from nfnet_jax.cli import log

    gpus = [] if args.device == 'cpu' else nvidia_gpus()
    if args.device == 'gpu' and not gpus:
        raise ValueError('--device gpu: nvidia-smi lists no GPU')
    gpu = bool(gpus)
    settings = resolve_settings(args, gpu)
    start = time.monotonic()
    report: dict[str, Any] = dict(
        schema=SCHEMA,
        command='python -m benchmarks.accelerator ' + ' '.join(sys.argv[1:]),
        quick=args.quick,
        started=utc_now(),
        finished=None,
        complete=False,
        device='gpu' if gpu else 'cpu',
        machine=host_machine(gpus),
        environment=None,
        settings=settings,
        steps={
            name: dict(status='pending', budget_s=settings[name]['budget_s'], results={}, skipped=[], errors=[])
            for name in args.steps
        },
    )
    log(f'accelerator run on {"the GPU " + gpus[0]["name"] if gpu else "the CPU"}, {settings["budget_s"]:.0f} s budget')
    write_reports(report, args.json, args.markdown)
    env = worker_env(gpu, args.cpu_devices)
    with tempfile.TemporaryDirectory(prefix='nfnet_jax_accelerator_') as folder:
        remaining = list(args.steps)
        attempt = 0
        while remaining:
            left = settings['budget_s'] - (time.monotonic() - start)
            if left < 10:
                for name in remaining:
                    report['steps'][name].update(status='skipped', error='the run had used its whole budget')
                break
            attempt += 1
            state_path = Path(folder) / f'state{attempt}.json'
            config = dict(
                gpu=gpu,
                steps=remaining,
                settings=settings,
                budgets={name: settings[name]['budget_s'] for name in remaining},
                deadline=start + settings['budget_s'],  # time.monotonic(): one clock for every process on Linux
                state=str(state_path),
            )
            config_path = Path(folder) / f'config{attempt}.json'
            config_path.write_text(json.dumps(config))
            remaining = watch(Worker(config_path, env), state_path, config, report, args, start)
    report.update(finished=utc_now(), elapsed_s=round(time.monotonic() - start, 1))
    report['complete'] = all(step['status'] == 'ok' for step in report['steps'].values())
    write_reports(report, args.json, args.markdown)
    for name, step in report['steps'].items():
        log(f'{name}: {step["status"]}' + (f' ({step["error"]})' if step.get('error') else ''))
    log(f'reports written to {args.json} and {args.markdown} in {report["elapsed_s"]:.0f} s')
    return 0 if all(step['status'] in ('ok', 'partial') for step in report['steps'].values()) else 1


def watch(
    worker: Worker,
    state_path: Path,
    config: dict[str, Any],
    report: dict[str, Any],
    args: argparse.Namespace,
    start: float,
) -> list[str]:
    """Follow one child until it ends or is killed; returns the steps still to run."""
    from nfnet_jax.cli import log

    seen_mtime = None
    state: dict[str, Any] = {}
    child_start = time.monotonic()
    killed_for = None
    while True:
        try:
            worker.proc.wait(timeout=1.0)
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
        with contextlib.suppress(OSError, json.JSONDecodeError):
            mtime = state_path.stat().st_mtime_ns
            if mtime != seen_mtime:
                state, seen_mtime = json.loads(state_path.read_text()), mtime
                merge_state(report, state)
                write_reports(report, args.json, args.markdown)
        if finished:
            break
        current = state.get('current')
        now = time.monotonic()
        total_left = report['settings']['budget_s'] + GRACE_S - (now - start)
        if not state.get('environment') and now - child_start > STARTUP_S:
            killed_for = f'the child process did not start within {STARTUP_S:.0f} s'
        elif current is not None and now - state['current_started'] > state['steps'][current]['budget_s'] + GRACE_S:
            killed_for = f'ran past its budget of {state["steps"][current]["budget_s"]:.0f} s'
        elif total_left < 0:
            killed_for = 'the run used its whole budget'
        if killed_for:
            log(f'stopping the child process: {current or "startup"} {killed_for}')
            worker.kill()
            break
    # a last look: the child may have saved between the poll and its end
    with contextlib.suppress(OSError, json.JSONDecodeError):
        state = json.loads(state_path.read_text())
        merge_state(report, state)
    done = set(state.get('done', []))
    current = state.get('current')
    remaining = [name for name in config['steps'] if name not in done]
    if current is not None and current in remaining:
        step = report['steps'][current]
        step['elapsed_s'] = round(time.monotonic() - state['current_started'], 1)
        if killed_for:
            step.update(status='timeout' if 'budget' in killed_for else 'failed', error=killed_for)
        else:
            tail = ' / '.join(list(worker.tail)[-3:])
            step.update(status='failed', error=f'the child process died (exit {worker.proc.returncode}): {tail}')
        remaining.remove(current)
    elif remaining and not done:  # died or was stopped before its first step: a fresh child would too
        reason = killed_for or f'the child process died at startup (exit {worker.proc.returncode})'
        tail = ' / '.join(list(worker.tail)[-3:])
        for name in remaining:
            report['steps'][name].update(status='failed', error=f'{reason}: {tail}' if tail else reason)
        remaining = []
    write_reports(report, args.json, args.markdown)
    return remaining  # between two steps, a child that died leaves the rest to a fresh one


def merge_state(report: dict[str, Any], state: dict[str, Any]) -> None:
    if state.get('environment'):
        report['environment'] = state['environment']
    for name, step in state.get('steps', {}).items():
        report['steps'][name].update(step)


# --- the child process -----------------------------------------------------------------------------------------------


class StepContext:
    """What a step function records into: results, skipped parts and failed parts, saved after each change."""

    def __init__(self, record: dict[str, Any], budget_s: float, save: Callable[[], None]):
        self.record, self.budget_s, self._save = record, budget_s, save
        self.start = time.monotonic()
        self.results: dict[str, Any] = record['results']

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def skip(self, what: str, why: str, planned: bool = False) -> None:
        """Record a part not run: for the budget (the step is then 'partial'), or `planned` by the settings."""
        from nfnet_jax.cli import log

        log(f'skipping {what}: {why}')
        self.record['skipped'].append(dict(what=what, why=why, planned=planned))
        self.save()

    @contextlib.contextmanager
    def part(self, what: str) -> Iterator[None]:
        """A measurement whose failure is recorded and does not stop the step."""
        try:
            yield
        except Exception as err:  # a failed part (out of memory, a compiler error) must not lose the others
            self.failed(what, err)
        finally:
            self.save()

    def failed(self, what: str, err: Exception) -> None:
        """Record a part that raised `err` (call it in the except block: it keeps the traceback)."""
        from nfnet_jax.cli import log

        log(f'{what} failed: {err!r}')
        self.record['errors'].append(
            dict(what=what, error=f'{type(err).__name__}: {err}'[:500], traceback=traceback.format_exc()[-3000:])
        )
        self.save()

    def save(self) -> None:
        self.record['elapsed_s'] = round(self.elapsed(), 1)
        self._save()


def run_worker(config_path: Path) -> int:
    config = json.loads(config_path.read_text())
    state_path = Path(config['state'])
    state: dict[str, Any] = dict(steps={}, done=[], current=None, environment=None)

    def save() -> None:
        from nfnet_jax.files import atomic_write

        text = json.dumps(state, default=str)
        atomic_write(state_path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'), force=True)

    from nfnet_jax.cli import log

    state['environment'] = worker_environment(config['gpu'])
    save()
    functions = dict(parity=parity, vs_timm=vs_timm, train_step=train_step, sharded_inference=sharded_inference)
    for name in config['steps']:
        budget = round(min(config['budgets'][name], config['deadline'] - time.monotonic()), 1)
        if budget < 10:
            state['steps'][name] = dict(status='skipped', error='the run had used its whole budget')
            state['done'].append(name)
            save()
            continue
        record = dict(status='running', budget_s=budget, results={}, skipped=[], errors=[])
        state['steps'][name] = record
        state['current'] = name
        state['current_started'] = time.monotonic()  # Linux's monotonic clock is the same in every process
        ctx = StepContext(record, budget, save)
        ctx.save()
        log(f'--- {name} (budget {budget:.0f} s)')
        try:
            functions[name](ctx, config['settings'][name], config['gpu'])
            unplanned = [s for s in record['skipped'] if not s['planned']]
            record['status'] = 'partial' if unplanned or record['errors'] else 'ok'
        except Exception as err:  # the step failed as a whole; the next one still runs
            log(f'{name} failed:\n{traceback.format_exc()}')
            record.update(status='failed', error=f'{type(err).__name__}: {err}'[:500])
            record['traceback'] = traceback.format_exc()[-3000:]
        state['done'].append(name)
        state['current'] = None
        ctx.save()
        gc.collect()
    return 0


def worker_environment(gpu: bool) -> dict[str, Any]:
    from importlib import metadata

    import flax
    import jax
    import jaxlib
    import timm
    import torch

    plugin = None
    for name in ('jax-cuda13-plugin', 'jax-cuda12-plugin'):
        with contextlib.suppress(metadata.PackageNotFoundError):
            plugin = f'{name} {metadata.version(name)}'
            break
    devices = jax.devices()
    return dict(
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        jax_cuda_plugin=plugin,
        flax=flax.__version__,
        torch=torch.__version__,
        timm=timm.__version__,
        jax_backend=jax.default_backend(),
        jax_device_kind=devices[0].device_kind,
        jax_device_count=len(devices),
        torch_cuda=torch.version.cuda,
        torch_cuda_available=torch.cuda.is_available(),
        torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        torch_cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        torch_threads=torch.get_num_threads(),
        expected_gpu=gpu,
    )


def check_devices(gpu: bool) -> tuple[Any, str]:
    """JAX's and torch's device, refusing a GPU run where either framework does not see the GPU."""
    import jax
    import torch

    if gpu and jax.default_backend() != 'gpu':
        raise RuntimeError(f'nvidia-smi lists a GPU but JAX runs on {jax.default_backend()}: install jax[cuda13]')
    if gpu and not torch.cuda.is_available():
        raise RuntimeError('nvidia-smi lists a GPU but torch sees none: install a CUDA build of torch')
    return jax.devices()[0], 'cuda' if gpu else 'cpu'


def load_test_helpers() -> Any:
    """tests/helpers.py (the test suite's weight randomisation), loaded by path: tests/ is no package."""
    spec = importlib.util.spec_from_file_location('nfnet_jax_test_helpers', REPO / 'tests' / 'helpers.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def torch_fp32(exact: bool) -> Iterator[None]:
    """torch's float32 math on CUDA without TF32 (`exact`), or as torch's defaults leave it."""
    import torch

    if not exact:
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, 'fp32_precision'):
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = 'ieee'
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
    else:
        saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


def parity(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    import copy

    import jax
    import numpy as np
    import timm
    import torch
    from flax import nnx

    from nfnet_jax.factory import from_timm
    from nfnet_jax.inference import classifier
    from nfnet_jax.numerics import FP32_RTOL, relative_error

    device, torch_device = check_devices(gpu)
    helpers = load_test_helpers()
    ctx.results.update(tolerance=FP32_RTOL, reference='timm float32 on the CPU', device=str(device), models={})
    if 'default' not in settings['precisions']:
        ctx.skip('default precision', 'XLA:CPU computes float32 exactly at every precision', planned=True)

    def timm_outputs(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            final, taps = model.forward_intermediates(helpers.nchw(x).to(next(model.parameters()).device))
            out = {
                'logits': model.forward_head(final).cpu().numpy(),
                'pre_logits': model.forward_head(final, pre_logits=True).cpu().numpy(),
                'forward_features': final.cpu().numpy().transpose(0, 2, 3, 1),
            }
            out |= {f'tap {i}': t.cpu().numpy().transpose(0, 2, 3, 1) for i, t in enumerate(taps)}
        return out

    def worst(got: dict[str, Any], expected: dict[str, np.ndarray]) -> tuple[float, dict[str, float]]:
        errors = {k: relative_error(np.asarray(got[k], np.float32), expected[k]) for k in expected}
        return max(errors.values()), errors

    longest = 0.0
    for name in settings['models']:
        if ctx.remaining() < longest:
            ctx.skip(name, f'{ctx.remaining():.0f} s left of the budget; the previous model took {longest:.0f} s')
            continue
        began = time.monotonic()
        with ctx.part(f'parity {name}'):
            torch.manual_seed(0)
            theirs = timm.create_model(name).eval()
            helpers.randomize_(theirs, seed=len(name))
            ours = from_timm(theirs)
            on_device = copy.deepcopy(theirs).to(torch_device) if gpu else None
            graphdef, state = nnx.split(ours)
            state = jax.device_put(state, device)

            @jax.jit
            def forward(state: Any, x: Any, graphdef: Any = graphdef) -> dict[str, Any]:
                model = nnx.merge(graphdef, state)
                final, taps = model.forward_intermediates(x)
                out = {
                    'logits': model.forward_head(final),
                    'pre_logits': model.forward_head(final, pre_logits=True),
                    'forward_features': final,
                }
                return out | {f'tap {i}': t for i, t in enumerate(taps)}

            fast = classifier(ours)
            ctx.results['models'][name] = {}
            for height, width in settings['sizes']:
                x = np.random.default_rng(1).standard_normal((settings['batch'], height, width, 3)).astype(np.float32)
                expected = timm_outputs(theirs, x)
                x_device = jax.device_put(x, device)
                row: dict[str, Any] = {}
                for precision in settings['precisions']:
                    with jax.default_matmul_precision(None if precision == 'default' else precision):
                        row[precision], row[f'{precision} per output'] = worst(forward(state, x_device), expected)
                        row[f'fast path {precision}'] = relative_error(
                            np.asarray(fast(x_device), np.float32), expected['logits']
                        )
                if on_device is not None:
                    with torch_fp32(exact=True):
                        row['timm on device, TF32 off'] = worst(timm_outputs(on_device, x), expected)[0]
                    row['timm on device, defaults'] = worst(timm_outputs(on_device, x), expected)[0]
                row['pass'] = row['highest'] <= FP32_RTOL and row['fast path highest'] <= FP32_RTOL
                ctx.results['models'][name][f'{height}x{width}'] = row
                ctx.save()
            del theirs, ours, on_device, state, fast
        longest = max(longest, time.monotonic() - began)
        gc.collect()
    failed = [
        f'{model} {size}'
        for model, sizes in ctx.results['models'].items()
        for size, r in sizes.items()
        if not r['pass']
    ]
    ctx.results['all_pass'] = not failed and not ctx.record['errors']
    if failed:
        raise AssertionError(f'over the tolerance {FP32_RTOL} at highest precision: {", ".join(failed)}')


def vs_timm(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    import torch

    from benchmarks import vs_timm as bench
    from nfnet_jax.cli import log, progress

    _, torch_device = check_devices(gpu)
    if gpu:
        torch.backends.cudnn.benchmark = True  # as timm's own benchmark script: cuDNN picks its kernels per shape
    model_name, size, repeats = settings['model'], settings['size'], settings['repeats']
    ctx.results.update(
        model=model_name, size=size, repeats=repeats, cudnn_benchmark=gpu, compile=settings['compile'], runs=[]
    )
    shapes = [(dtype, batch) for dtype in settings['dtypes'] for batch in settings['batches']]

    ceilings = ctx.results.setdefault('matmul_ceiling_gflops', {})
    matmuls = ctx.results.setdefault('matmul_ceiling_matmul', {})

    def measure_shape(
        runners: dict[str, Any], dtype: str, batch: int, what: str, first_calls: dict[str, float] | None = None
    ) -> dict[str, Any]:
        if 'flops_per_image' not in ctx.results:  # one size per run, and the same count in every dtype
            ctx.results['flops_per_image'] = bench.flops_per_image(built['jax'], size)
        if dtype not in ceilings:  # timed once per dtype, not again for every batch size
            ceiling = bench.matmul_ceiling(dtype, gpu)
            ceilings[dtype], matmuls[dtype] = ceiling.gflops, ceiling.matmul
        with progress(total=len(runners) * (repeats + 1), desc=f'vs_timm {what}', unit='call') as bar:
            results, logits = bench.measure(runners, batch, size, ctx.results['flops_per_image'], repeats, gpu, bar)
        for name, seconds in (first_calls or {}).items():
            results[name].first_call_s = seconds
        log(bench.table(results, ceilings[dtype]))
        return dict(dtype=dtype, **bench.shape_record(results, logits))

    plain_s: list[float] = []  # each shape's time without torch.compile
    compile_s: list[float] = []  # torch.compile's first call per shape
    built: dict[str, Any] = {}
    for index, (dtype, batch) in enumerate(shapes):
        what = f'{dtype} batch {batch}'
        estimate = max(plain_s, default=0.0)
        if ctx.remaining() < estimate:
            ctx.skip(what, f'{ctx.remaining():.0f} s left of the budget, a shape took up to {estimate:.0f} s')
            continue
        use_compile = settings['compile'] == 'all'
        if settings['compile'] == 'auto':
            # Room for this shape's compile, after this shape and every later one without it.
            reserve = (len(shapes) - index) * max(plain_s, default=15.0 if gpu else 60.0)
            expected = max(compile_s, default=90.0 if gpu else 300.0)
            use_compile = ctx.remaining() - reserve >= expected
            if not use_compile:
                ctx.skip(
                    f'torch.compile at {what}',
                    f'about {expected:.0f} s to compile; {ctx.remaining():.0f} s left for {len(shapes) - index} shapes',
                )
        elif settings['compile'] == 'none':
            ctx.skip(f'torch.compile at {what}', 'not asked for (--compile none; the --quick and CPU default)', True)
        began, this_compile_s = time.monotonic(), 0.0
        with ctx.part(what):
            if built.get('dtype') != dtype:
                built.clear()
                gc.collect()
                timm_model, jax_model = bench.build_models(model_name, dtype, torch_device)
                built.update(dtype=dtype, timm=timm_model, jax=jax_model)
            runners = bench.build_runners(batch, size, dtype, gpu, built['timm'], built['jax'], use_compile)
            compiled = bench.TIMM_CONFIGS[2]
            compiled_call = runners.pop(compiled, None)  # torch.compile compiles on its first call
            ctx.results['runs'].append(measure_shape(runners, dtype, batch, what))
            ctx.save()  # the figures without torch.compile are kept whatever it does
            if compiled_call is not None:
                try:
                    first = time.perf_counter()
                    compiled_call()
                    this_compile_s = time.perf_counter() - first
                    compile_s.append(this_compile_s)
                except Exception as err:  # a missing C compiler, an inductor error
                    ctx.failed(f'torch.compile at {what}', err)
                else:  # every configuration again, round-robin, with torch.compile's first call its compilation
                    runners[compiled] = compiled_call
                    again = measure_shape(runners, dtype, batch, what, {compiled: this_compile_s})
                    for name, first in ctx.results['runs'][-1]['results'].items():  # their first calls were before
                        again['results'][name].update({k: first[k] for k in FIRST_CALL_FIGURES})
                    ctx.results['runs'][-1] = again
                    ctx.save()
            del runners, compiled_call
        elapsed = time.monotonic() - began
        plain_s.append(elapsed - this_compile_s)
        if gpu:
            torch.cuda.empty_cache()
        ctx.save()


def train_step(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    import torch

    from benchmarks import train_step as bench
    from nfnet_jax.cli import progress

    _, torch_device = check_devices(gpu)
    if gpu:
        torch.backends.cudnn.benchmark = True
    batch, size = settings['batch'], settings['size']
    ctx.results.update(model=settings['model'], batch=batch, size=size, timm_device=torch_device, configs={})
    with ctx.part('FLOPs per step'):
        ctx.results['flops_per_step'] = bench.step_flops(settings['model'], batch, size)
    # torch.compile of a training step takes minutes: more than this step's budget.
    steps = bench.build_steps(settings['model'], batch, size, torch_device, compile=False)
    configs = ctx.results['configs']
    for name, step in progress(steps.items(), desc='train_step: first steps (compiling)'):
        with ctx.part(f'first step of {name}'):
            began = time.perf_counter()
            step()
            configs[name] = dict(first_step_s=time.perf_counter() - began, step_s=[])
    longest = 0.0
    for index in progress(range(settings['steps']), desc='train_step: timed rounds'):
        if ctx.remaining() < longest:
            ctx.skip(f'timed rounds {index + 1}-{settings["steps"]}', f'{ctx.remaining():.0f} s left of the budget')
            break
        began_round = time.monotonic()
        for name, step in steps.items():
            if name not in configs:
                continue
            with ctx.part(f'step of {name}'):
                began = time.perf_counter()
                step()
                configs[name]['step_s'].append(time.perf_counter() - began)
        longest = max(longest, time.monotonic() - began_round)
        ctx.save()


def sharded_inference(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    import jax
    import numpy as np
    import timm
    import torch

    from benchmarks.sharded_inference import images_per_second
    from nfnet_jax import parallel
    from nfnet_jax.factory import from_timm
    from nfnet_jax.inference import classifier

    device, _ = check_devices(gpu)
    batch = settings['batch_per_device'] * jax.device_count()
    size, runs = settings['size'], settings['runs']
    torch.manual_seed(0)
    fn = classifier(from_timm(timm.create_model(settings['model'])))  # timm's init: nnx's eager one compiles per op
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    ctx.results.update(
        model=settings['model'],
        batch=batch,
        size=size,
        devices=jax.device_count(),
        platform=device.platform,
        configs={},
    )
    setup_s = ctx.elapsed()
    with ctx.part('one device'):
        single_state, single_images = jax.device_put(fn.state, device), jax.device_put(images, device)
        ctx.results['configs']['one device'] = images_per_second(
            lambda: fn.compiled(single_state, single_images), batch, runs, '1 device'
        )
    one_device_s = ctx.elapsed() - setup_s
    if ctx.remaining() < one_device_s:
        ctx.skip('the mesh', f'{ctx.remaining():.0f} s left of the budget; one device took {one_device_s:.0f} s')
        return
    with ctx.part('mesh'):
        mesh = parallel.make_mesh(1)
        sharded = parallel.shard_inference(fn, mesh)
        sharded_images = parallel.global_batch(images, mesh)
        ctx.results['configs'][f'mesh {dict(mesh.shape)}'] = images_per_second(
            lambda: sharded(sharded_images), batch, runs, f'{mesh.devices.size} devices'
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker)
    try:
        return run_steps(args)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
