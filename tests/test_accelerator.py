"""The accelerator run (`python -m benchmarks.accelerator`) end to end in its quickest CPU mode, on test_nfnet,
and `benchmarks/accelerator.sh`'s check of an existing interpreter (ACCELERATOR_PYTHON).

No GPU figure is checked here: this keeps the one command for the accelerator working, its steps,
its child process, its watchdog and both reports, so that it runs when a GPU is there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

import pytest

from benchmarks.accelerator import reports, runner
from benchmarks.accelerator.steps import STEPS
from benchmarks.machine import host_machine

pytestmark = pytest.mark.slow  # benchmark tooling: most tests share one run of the accelerator command on CPU

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    folder = tmp_path_factory.mktemp('accelerator')
    json_path, markdown_path = folder / 'report.json', folder / 'report.md'
    command = [sys.executable, '-m', 'benchmarks.accelerator', '--quick', '--device', 'cpu', '--cpu-devices', '2']
    command += ['--json', str(json_path), '--markdown', str(markdown_path)]
    # The run compiles a dozen programs of test_nfnet with the suite's XLA_FLAGS (conftest), to which the
    # accelerator appends its device count, and times each for a few calls.
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    return done, json_path, markdown_path


@pytest.mark.slow
def test_quick_cpu_run_writes_every_step_to_both_reports(quick_run):
    done, json_path, markdown_path = quick_run
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(json_path.read_text())
    assert report['schema'] == reports.SCHEMA and report['quick'] and report['device'] == 'cpu'
    assert report['finished'] and report['complete'], {name: step['status'] for name, step in report['steps'].items()}
    assert list(report['steps']) == list(STEPS)
    assert {'cpu', 'cpu_cores', 'python', 'gpus'} <= set(report['machine'])
    environment = report['environment']
    assert environment['jax_backend'] == 'cpu' and environment['jax_device_count'] == 2
    assert environment['cpu_convolutions'].endswith('(CPU backend)')  # the steps run nfnet_jax as the commands do
    assert {'jax', 'jaxlib', 'torch', 'timm', 'flax'} <= set(environment)
    for name, step in report['steps'].items():
        assert step['status'] == 'ok' and not step['errors'], (name, step)
        assert 0 < step['elapsed_s'] <= step['budget_s'] + runner.GRACE_S
        assert all(skip['planned'] for skip in step['skipped'])

    parity = report['steps']['parity']['results']
    (row,) = parity['models']['test_nfnet'].values()
    assert row['pass'] and row['highest'] <= parity['tolerance'] and row['fast path highest'] <= parity['tolerance']
    assert set(row['highest per output']) >= {'logits', 'pre_logits', 'forward_features', 'tap 0'}

    (run,) = report['steps']['vs_timm']['results']['runs']
    assert (run['dtype'], run['batch'], run['size']) == ('float32', 2, 64)
    assert set(run['results']) == {'nfnet_jax jit', 'timm eager NCHW', 'timm eager channels_last'}
    assert all(r['images_per_s'] > 0 and len(r['run_s']) == 2 for r in run['results'].values())
    assert run['logits_rel_error_vs_timm'] < 1e-4
    flops = report['steps']['vs_timm']['results']['flops_per_image']
    assert flops > 1e6  # test_nfnet at 64x64: tens of MFLOP per image
    assert all(r['gflops'] == pytest.approx(r['images_per_s'] * flops / 1e9) for r in run['results'].values())
    assert report['steps']['vs_timm']['results']['matmul_ceiling_gflops']['float32'] > 0
    assert report['steps']['vs_timm']['results']['matmul_ceiling_matmul']['float32'].endswith(' float32')

    train = report['steps']['train_step']['results']['configs']
    assert set(train) == {'timm eager NCHW', 'timm eager channels_last', 'nfnet_jax jit (cpu)'}
    assert all(len(r['step_s']) == 2 and r['first_step_s'] > 0 for r in train.values())
    step_flops = report['steps']['train_step']['results']['flops_per_step']  # batch 2, forward and backward
    assert 5.5 < step_flops / flops < 6.5

    sharded = report['steps']['sharded_inference']['results']
    assert sharded['devices'] == 2 and sharded['batch'] == 4
    assert set(sharded['configs']) == {'one device', "mesh {'data': 2, 'model': 1}"}

    markdown = markdown_path.read_text()
    assert f'{step_flops / 1e9:.1f} GFLOP per step' in markdown
    for heading in ('## Machine', '## Steps', *(f'## {name}' for name in STEPS)):
        assert f'\n{heading}\n' in markdown
    assert '| test_nfnet | 67x53 |' in markdown
    assert f'| nfnet_jax convolutions on CPU | {environment["cpu_convolutions"]} |' in markdown
    assert 'float32 ' in markdown.split("Ceiling: torch's square matmul", 1)[1].split('\n', 1)[0]
    assert 'GFLOP/s (% of ceiling)' in markdown


def test_existing_reports_are_not_replaced_without_force(quick_run, capsys):
    _, json_path, markdown_path = quick_run
    before = json_path.read_text(), markdown_path.read_text()
    argv = ['--quick', '--device', 'cpu', '--json', str(json_path), '--markdown', str(markdown_path)]
    assert runner.main(argv) == 2
    assert 'already exists' in capsys.readouterr().err
    assert (json_path.read_text(), markdown_path.read_text()) == before


def pending_report() -> dict:
    """A report as it is before the first step: steps pending, no environment yet."""
    return dict(
        started='now',
        finished=None,
        command='python -m benchmarks.accelerator',
        quick=False,
        machine=host_machine([]),
        environment=None,
        settings=dict(budget_s=1000),
        steps={name: dict(status='pending', budget_s=10, results={}, skipped=[], errors=[]) for name in STEPS},
    )


def test_partial_reports_render():
    markdown = reports.render_markdown(pending_report())
    assert 'running.' in markdown and markdown.count('| pending |') == len(STEPS)


def fake_worker(*command: str) -> runner.Worker:
    """A Worker running `command` in place of the steps' child process."""
    worker = runner.Worker.__new__(runner.Worker)
    worker.tail = deque(maxlen=15)
    worker.proc = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE, text=True)
    worker.reader = threading.Thread(target=worker._pass_through, daemon=True)
    worker.reader.start()
    return worker


def child_state(path: Path, current: str, started_s_ago: float) -> None:
    """What the child saves: parity done, `current` running since `started_s_ago` with one figure so far."""
    steps = dict(
        parity=dict(status='ok', budget_s=50, results={'models': {}}, skipped=[], errors=[]),
        **{current: dict(status='running', budget_s=10, results={'size': 64, 'runs': []}, skipped=[], errors=[])},
    )
    state = dict(
        environment={'jax': 'x'},
        done=['parity'],
        current=current,
        current_started=time.monotonic() - started_s_ago,
        steps=steps,
    )
    path.write_text(json.dumps(state))


@pytest.mark.parametrize('case', ['past its budget', 'dies'])
def test_the_watchdog_stops_or_loses_one_step_and_keeps_its_figures(tmp_path, case):
    state_path = tmp_path / 'state.json'
    args = argparse.Namespace(json=tmp_path / 'report.json', markdown=tmp_path / 'report.md')
    report = pending_report()
    if case == 'past its budget':
        child_state(state_path, 'vs_timm', started_s_ago=10 + runner.GRACE_S + 1)
        worker = fake_worker('sleep', '60')
    else:
        child_state(state_path, 'vs_timm', started_s_ago=1)
        worker = fake_worker(sys.executable, '-c', 'import sys; print("out of memory", file=sys.stderr); sys.exit(3)')
    began = time.monotonic()
    remaining = runner.watch(worker, state_path, dict(steps=list(STEPS)), report, args, began)
    assert time.monotonic() - began < 30 and worker.proc.returncode is not None
    assert remaining == ['train_step', 'sharded_inference']  # for a fresh child process
    step = report['steps']['vs_timm']
    assert step['results'] == {'size': 64, 'runs': []}  # what it had measured is kept
    if case == 'past its budget':
        assert step['status'] == 'timeout' and 'budget' in step['error']
    else:
        assert step['status'] == 'failed' and 'exit 3' in step['error'] and 'out of memory' in step['error']
    assert report['steps']['parity']['status'] == 'ok'
    saved = json.loads(args.json.read_text())
    assert saved['steps']['vs_timm']['status'] == step['status'] and saved['environment'] == {'jax': 'x'}
    assert f'| vs_timm | {step["status"]} |' in args.markdown.read_text()


def test_a_child_that_ends_between_steps_leaves_the_rest_to_a_fresh_one(tmp_path):
    state_path = tmp_path / 'state.json'
    child_state(state_path, 'vs_timm', started_s_ago=1)
    state = json.loads(state_path.read_text())
    state['steps']['vs_timm']['status'] = 'ok'
    state.update(done=['parity', 'vs_timm'], current=None)
    state_path.write_text(json.dumps(state))
    args = argparse.Namespace(json=tmp_path / 'report.json', markdown=tmp_path / 'report.md')
    report = pending_report()
    config = dict(steps=list(STEPS))
    worker = fake_worker(sys.executable, '-c', 'pass')
    remaining = runner.watch(worker, state_path, config, report, args, time.monotonic())
    assert remaining == ['train_step', 'sharded_inference']
    assert [step['status'] for step in report['steps'].values()] == ['ok', 'ok', 'pending', 'pending']


def _accelerator_sh(python: Path | str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`accelerator.sh --install-only` with ACCELERATOR_PYTHON: the import check alone, nothing installed."""
    venv = tmp_path / 'no-venv'
    env = {
        'PATH': '/usr/bin:/bin',
        'HOME': str(tmp_path),
        'ACCELERATOR_PYTHON': str(python),
        'ACCELERATOR_VENV': str(venv),
    }
    script = REPO / 'benchmarks' / 'accelerator.sh'
    done = subprocess.run(
        ['bash', str(script), '--install-only'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert not venv.exists(), 'an existing interpreter must be used as it is, with no virtual environment'
    return done


@pytest.mark.slow
def test_an_existing_interpreter_is_checked_and_used_as_it_is(tmp_path):
    done = _accelerator_sh(sys.executable, tmp_path)
    assert done.returncode == 0, done.stderr
    assert f'{sys.executable}: jax ' in done.stderr and 'timm ' in done.stderr


def test_an_interpreter_without_the_packages_is_refused_before_any_step(tmp_path):
    bare = tmp_path / 'bare-python'  # the same interpreter without its site-packages
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    done = _accelerator_sh(bare, tmp_path)
    assert done.returncode != 0
    assert 'cannot import jax' in done.stderr and 'timm (' in done.stderr
    assert 'leave ACCELERATOR_PYTHON unset' in done.stderr
