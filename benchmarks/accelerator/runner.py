"""The accelerator run's watching process: the command line, and one child process (`worker`) after another.

`run_steps` starts a child for the steps still to run and `watch`es it: it merges what the child
saves into the reports (`reports`) after every change, and kills the child when a step runs past
its budget, when the child does not start, or when the run's budget is spent. A step that was
running when its child died or was killed keeps its figures and is marked failed or timeout; the
steps after it go to a fresh child. This process imports neither torch nor JAX's devices, so a
crash of the child (out of memory, a driver fault) never takes the reports with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import accelerator
from benchmarks.accelerator.reports import SCHEMA, utc_now, write_reports
from benchmarks.accelerator.settings import MIN_STEP_BUDGET_S, resolve_settings
from benchmarks.accelerator.steps import STEPS
from benchmarks.machine import REPO, host_machine, nvidia_gpus

REPORT_JSON, REPORT_MARKDOWN, PROGRAMS = 'accelerator.json', 'accelerator.md', 'programs'  # what --out holds
# Seconds a step may run past its budget before it is killed: the child checks its budget only between measurements.
GRACE_S = 20.0
# The longest a fresh child may take to import jax, torch and timm and look at its devices.
STARTUP_S = 180.0


def name_list(text: str) -> list[str]:
    """'a, b' as ['a', 'b']."""
    return [value.strip() for value in text.split(',') if value.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked before anything runs (`parser.error`, exit 2, says what is wrong)."""
    parser = argparse.ArgumentParser(
        prog='python3 -m benchmarks.accelerator', description=accelerator.__doc__.split('\n\n')[0]
    )
    parser.add_argument(
        '--out', type=Path, required=True, help=f'the folder for {REPORT_JSON}, {REPORT_MARKDOWN} and {PROGRAMS}/'
    )
    parser.add_argument('--force', action='store_true', help='replace the reports of an earlier run in --out')
    parser.add_argument('--quick', action='store_true', help='fewer shapes and timed calls (test_nfnet on CPU)')
    parser.add_argument(
        '--device',
        choices=('auto', 'cpu', 'gpu'),
        default='auto',
        help='auto: the GPU when nvidia-smi lists one, else the CPU; cpu hides any GPU',
    )
    parser.add_argument('--steps', type=name_list, default=list(STEPS), help=f'a comma list of {", ".join(STEPS)}')
    parser.add_argument('--budget', type=float, help='seconds for the whole run (on a GPU: 450, --quick 220)')
    parser.add_argument(
        '--step-budget',
        action='append',
        default=[],
        metavar='STEP=SECONDS',
        help="one step's budget, e.g. vs_timm=300 (repeatable)",
    )
    parser.add_argument(
        '--cpu-devices', type=int, default=1, help='on CPU, XLA host devices for the sharded step (default 1)'
    )
    args = parser.parse_args(argv)
    unknown = set(args.steps) - set(STEPS)
    if unknown or not args.steps:
        parser.error(f'--steps takes a comma list of {", ".join(STEPS)}; got {",".join(args.steps)}')
    for item in args.step_budget:
        step, _, seconds = item.partition('=')
        try:
            ok = step in STEPS and float(seconds) > 0
        except ValueError:
            ok = False
        if not ok:
            parser.error(f'--step-budget takes STEP=SECONDS with a step of {", ".join(STEPS)}; got {item}')
    if args.cpu_devices < 1:
        parser.error('--cpu-devices must be at least 1')
    return args


class Reports(NamedTuple):
    """Where the run writes its reports."""

    json: Path
    markdown: Path


class Worker:
    """The child process running the steps, its stderr passed through and its last lines kept."""

    def __init__(self, config_path: Path, env: dict[str, str]):
        self.tail: deque[str] = deque(maxlen=15)
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'benchmarks.accelerator.worker', str(config_path)],
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
        """SIGKILL to the child's whole process group, then wait for it and its stderr."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=5)


def worker_env(gpu: bool, cpu_devices: int) -> dict[str, str]:
    """The child's environment: this checkout importable, JAX and torch sharing the GPU, or on CPU no GPU at all
    and `cpu_devices` XLA host devices."""
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


def prepare_out(folder: Path, force: bool) -> tuple[Path, Path, Path]:
    """The reports' paths and the programs' folder in `folder`, checked before any work: the reports of an earlier
    run are refused without `force`, and with it that run's programs are removed (the check reads the folder)."""
    from nfnet_jax.files import check_output

    json_path, markdown_path = (check_output(folder / name, force) for name in (REPORT_JSON, REPORT_MARKDOWN))
    programs = folder / PROGRAMS
    if force:
        for old in programs.glob('*.hlo.txt'):
            old.unlink()
    return json_path, markdown_path, programs


def run_steps(args: argparse.Namespace) -> int:
    """The whole run: children until every step has run or the budget is spent; both reports after every change."""
    json_path, markdown_path, programs = prepare_out(args.out, args.force)
    from nfnet_jax.progress import log

    gpus = [] if args.device == 'cpu' else nvidia_gpus()
    if args.device == 'gpu' and not gpus:
        raise ValueError('--device gpu: nvidia-smi lists no GPU')
    gpu = bool(gpus)
    settings = resolve_settings(args, gpu)
    start = time.monotonic()
    report: dict[str, Any] = dict(
        schema=SCHEMA,
        command='python3 -m benchmarks.accelerator ' + ' '.join(sys.argv[1:]),
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
    paths = Reports(json_path, markdown_path)
    write_reports(report, *paths)
    env = worker_env(gpu, args.cpu_devices)
    with tempfile.TemporaryDirectory(prefix='nfnet_jax_accelerator_') as folder:
        remaining = list(args.steps)
        attempt = 0
        while remaining:
            left = settings['budget_s'] - (time.monotonic() - start)
            if left < MIN_STEP_BUDGET_S:
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
                programs=str(programs.resolve()),
            )
            config_path = Path(folder) / f'config{attempt}.json'
            config_path.write_text(json.dumps(config))
            remaining = watch(Worker(config_path, env), state_path, config, report, paths, start)
    report.update(finished=utc_now(), elapsed_s=round(time.monotonic() - start, 1))
    report['complete'] = all(step['status'] == 'ok' for step in report['steps'].values())
    write_reports(report, *paths)
    for name, step in report['steps'].items():
        log(f'{name}: {step["status"]}' + (f' ({step["error"]})' if step.get('error') else ''))
    log(f'reports written to {json_path} and {markdown_path} in {report["elapsed_s"]:.0f} s')
    return 0 if all(step['status'] in ('ok', 'partial') for step in report['steps'].values()) else 1


def watch(
    worker: Worker,
    state_path: Path,
    config: dict[str, Any],
    report: dict[str, Any],
    paths: Reports,
    start: float,
) -> list[str]:
    """Follow one child until it ends or is killed; returns the steps still to run."""
    from nfnet_jax.progress import log

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
                write_reports(report, *paths)
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
    write_reports(report, *paths)
    return remaining  # between two steps, a child that died leaves the rest to a fresh one


def merge_state(report: dict[str, Any], state: dict[str, Any]) -> None:
    """What a child saved (its environment, its steps' records) into the report."""
    if state.get('environment'):
        report['environment'] = state['environment']
    for name, step in state.get('steps', {}).items():
        report['steps'][name].update(step)


def main(argv: Sequence[str] | None = None) -> int:
    """The run as `python -m benchmarks.accelerator` makes it: 0 when every step ran (some maybe in part), 1 when
    one failed or ran out of time, 2 for a bad command line or an existing report without --force."""
    args = parse_args(argv)
    try:
        return run_steps(args)
    except (OSError, ValueError) as err:  # an existing report, an output that cannot be written, no GPU
        print(f'error: {err}', file=sys.stderr)
        return 2
