"""The accelerator run (`python3 -m benchmarks.accelerator --out DIR`) as the GPU machine will run it, simulated on
the CPU, and its check of optimised programs (`benchmarks.accelerator.programs`) on programs compiled for the CPU.

The GPU machine has no network and no grain: the simulated run gets an interpreter where `import grain` fails, where
pip, sockets to anywhere and subprocesses running pip are refused and recorded (a sitecustomize on PYTHONPATH, which
the run's child process inherits), with pip's index pointing nowhere. No GPU figure is checked: this keeps the one
command working, its steps, child process, watchdog and reports, so that it runs when a GPU is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import nfnet_jax
from benchmarks.accelerator import reports, runner
from benchmarks.accelerator.programs import check_program
from benchmarks.accelerator.steps import STEPS
from benchmarks.machine import host_machine
from nfnet_jax import cpu
from nfnet_jax.cpu import convolution
from nfnet_jax.inference import classifier

REPO = Path(__file__).resolve().parents[1]

# Imported first by every Python process started with its folder on PYTHONPATH: grain missing, no pip, no network.
OFFLINE_SITECUSTOMIZE = """
import importlib.abc, os, socket, subprocess, sys

RECORD = os.environ['OFFLINE_RECORD']


def record(line):
    with open(RECORD, 'a') as f:
        f.write(f'{os.getpid()} {line}\\n')


class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition('.')[0]
        if top in ('grain', 'pip'):
            record(f'import {name}')
            raise ModuleNotFoundError(f'No module named {name!r} (hidden: the GPU machine has none)', name=name)
        return None


def refuse_connect(self, address, *args):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        record(f'connect {address}')
        raise OSError('no network on the GPU machine')
    return plain_connect(self, address, *args)


def refuse_pip(self, args, *rest, **kwargs):
    if 'pip' in ' '.join(map(str, args if isinstance(args, (list, tuple)) else [args])):
        record(f'subprocess {args}')
        raise OSError('no package registry on the GPU machine')
    return plain_popen(self, args, *rest, **kwargs)


sys.meta_path.insert(0, Missing())
plain_connect, socket.socket.connect = socket.socket.connect, refuse_connect
plain_popen, subprocess.Popen.__init__ = subprocess.Popen.__init__, refuse_pip
record(f'started {sys.orig_argv}')
"""


def offline_env(folder: Path) -> tuple[dict[str, str], Path]:
    """The environment of a process on the simulated GPU machine (`OFFLINE_SITECUSTOMIZE`), and its record's path."""
    site, record = folder / 'site', folder / 'offline.txt'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(textwrap.dedent(OFFLINE_SITECUSTOMIZE))
    env = dict(os.environ, PYTHONPATH=str(site), OFFLINE_RECORD=str(record))
    env.update(PIP_INDEX_URL='http://127.0.0.1:9/simple', PIP_NO_INDEX='1', HTTPS_PROXY='http://127.0.0.1:9')
    return env, record


def test_the_training_and_benchmark_modules_import_without_grain(tmp_path):
    env, record = offline_env(tmp_path)
    modules = 'nfnet_jax.train, nfnet_jax.parallel.train, benchmarks.accelerator.worker'
    code = f'import {modules}; import grain'
    done = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "No module named 'grain' (hidden" in done.stderr, done.stderr[-2000:]
    assert record.read_text().splitlines()[-1].endswith('import grain')  # the modules before it imported


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, list[str], float]:
    """The command with --quick on the CPU, in the simulated machine: its result, its folder, what was recorded."""
    folder = tmp_path_factory.mktemp('accelerator')
    env, record = offline_env(folder)
    out = folder / 'report'
    command = [sys.executable, '-m', 'benchmarks.accelerator', '--out', str(out), '--quick', '--device', 'cpu']
    began = time.monotonic()
    # The run compiles test_nfnet's train step twice (the library's and a plain jit), its parity and inference
    # programs, on a small and busy machine.
    done = subprocess.run(
        command + ['--cpu-devices', '2'], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    seconds = time.monotonic() - began
    print(f'the simulated accelerator run took {seconds:.0f} s')
    return done, out, record.read_text().splitlines() if record.exists() else [], seconds


@pytest.mark.slow
def test_the_run_needs_no_network_no_installs_and_no_grain(quick_run):
    done, _, recorded, _ = quick_run
    assert done.returncode == 0, done.stderr[-4000:]
    started = [line for line in recorded if ' started ' in line]
    assert any('benchmarks.accelerator' in line for line in started), recorded  # the watching process
    assert any('benchmarks.accelerator.worker' in line for line in started), recorded  # and its child: both simulated
    refused = [line for line in recorded if ' connect ' in line or ' subprocess ' in line or ' import pip' in line]
    assert not refused, refused  # not a socket, not pip was asked for (and without grain, every step ran)


@pytest.mark.slow
def test_the_run_writes_every_part_into_the_folder(quick_run):
    done, out, _, _ = quick_run
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / runner.REPORT_JSON).read_text())
    assert report['schema'] == reports.SCHEMA and report['quick'] and report['device'] == 'cpu'
    assert report['finished'] and report['complete'], {name: step['status'] for name, step in report['steps'].items()}
    assert list(report['steps']) == list(STEPS)
    environment = report['environment']
    assert environment['jax_backend'] == 'cpu' and environment['jax_device_count'] == 2
    assert environment['cpu_convolutions'].endswith('(CPU backend)')  # the steps run nfnet_jax as the commands do
    for name, step in report['steps'].items():
        assert step['status'] == 'ok' and not step['errors'], (name, step)
        assert 0 <= step['elapsed_s'] <= step['budget_s'] + runner.GRACE_S
        assert all(skip['planned'] for skip in step['skipped'])

    parity = report['steps']['parity']['results']
    (row,) = parity['models']['test_nfnet'].values()
    assert row['pass'] and row['highest'] <= parity['tolerance'] and row['fast path highest'] <= parity['tolerance']
    assert set(row['highest per output']) >= {'logits', 'pre_logits', 'forward_features', 'tap 0'}
    assert parity['compilations'] == 1  # every output and the fast path in one program

    (run,) = report['steps']['train_step']['results']['runs']
    assert (run['dtype'], run['batch']) == ('float32', 2) and run['flops_per_step'] > 0
    assert set(run['configs']) == {'nfnet_jax train_step', 'plain jax.jit', 'timm eager channels_last'}
    for name, config in run['configs'].items():
        assert len(config['step_s']) == 1 and config['first_call_s'] > 0  # one round of two steps
        assert len(config['host_s']) == (0 if name.startswith('timm') else 2)
    train_compiles = {
        c['part'] for c in report['steps']['train_step']['compiles'] if c['function'] == 'pure_train_step'
    }
    assert train_compiles >= {'float32 batch 2: nfnet_jax.train.train_step', 'float32 batch 2: plain jax.jit'}

    (shape,) = report['steps']['vs_timm']['results']['runs']
    assert (shape['dtype'], shape['batch'], shape['size']) == ('float32', 2, 64)
    assert set(shape['results']) == {'nfnet_jax jit', 'timm eager NCHW', 'timm eager channels_last'}
    assert shape['logits_rel_error_vs_timm'] < 1e-4 and shape['ceiling_gflops'] > 0

    checked = report['steps']['program_check']['results']['checked']
    assert set(checked) == {'inference_float32_batch2', 'train_step_float32_batch2'}
    assert {path.name for path in (out / runner.PROGRAMS).iterdir()} == {f'{name}.hlo.txt' for name in checked}
    for record in checked.values():  # the CPU backend was on: its rewrites are there, and found
        assert not record['clean'] and set(record['findings']) <= {'cpu call', 'grouped convolutions split', 'loop'}

    sharded = report['steps']['sharded_inference']['results']
    assert sharded['devices'] == 2 and set(sharded['configs']) == {'one device', "mesh {'data': 2, 'model': 1}"}

    remat = report['steps']['remat_memory']['results']['configs']
    assert remat['grad_checkpointing']['residual_bytes'] < remat['plain']['residual_bytes']
    assert all(config['temp_bytes'] > 0 for config in remat.values())

    markdown = (out / runner.REPORT_MARKDOWN).read_text()
    titles = ('Parity with timm', 'Train step', 'Inference against timm', 'Compile times', 'Optimised programs')
    positions = [markdown.index(f'\n## {title}') for title in (*titles, 'Sharded inference', 'Gradient checkpointing')]
    assert positions == sorted(positions)  # the order: parity, train step, images/s, compile times, check
    assert '| test_nfnet | 67x53 |' in markdown and 'compiled 1 time(s)' in markdown
    assert '| float32 | 2 | plain jax.jit |' in markdown
    assert '| parity | nfnet_jax on the device | outputs | 1 |' in markdown
    assert '| train_step_float32_batch2 |' in markdown


@pytest.mark.slow
def test_existing_reports_are_not_replaced_without_force(quick_run, capsys):
    _, out, _, _ = quick_run
    before = (out / runner.REPORT_JSON).read_text(), (out / runner.REPORT_MARKDOWN).read_text()
    assert runner.main(['--out', str(out), '--quick', '--device', 'cpu']) == 2
    assert 'already exists' in capsys.readouterr().err
    assert ((out / runner.REPORT_JSON).read_text(), (out / runner.REPORT_MARKDOWN).read_text()) == before


def test_force_clears_the_programs_of_an_earlier_run(tmp_path):
    (tmp_path / runner.PROGRAMS).mkdir()
    stale = tmp_path / runner.PROGRAMS / 'inference_float32_batch9.hlo.txt'
    stale.write_text('HloModule old')
    (tmp_path / runner.REPORT_JSON).write_text('{}')
    with pytest.raises(FileExistsError):
        runner.prepare_out(tmp_path, force=False)
    assert stale.exists()
    json_path, markdown_path, programs = runner.prepare_out(tmp_path, force=True)
    assert (json_path.name, markdown_path.name, programs) == ('accelerator.json', 'accelerator.md', stale.parent)
    assert not stale.exists()


def test_the_command_line_needs_an_out_folder(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args([])
    assert '--out' in capsys.readouterr().err


# The check of optimised programs, on programs compiled for the CPU.


@pytest.fixture
def backend_off():
    """XLA's own CPU lowering for the test, whatever the suite's state; the backend as it was after."""
    kernels = convolution.kernels() if cpu.enabled() else None
    cpu.disable()
    yield
    cpu.disable()
    if kernels is not None:
        cpu.enable(onednn=kernels.onednn)


def inference_program(batch: int, size: int) -> str:
    fn = classifier(nfnet_jax.create_model('test_nfnet'))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return fn.compiled.lower(fn.state, images).compile().as_text()


def test_an_inference_program_without_the_cpu_backend_is_clean(backend_off):
    check = check_program(inference_program(2, 64))
    assert check.clean, check.findings
    assert check.grouped_convolutions > 0 and check.convolutions > check.grouped_convolutions
    assert not check.custom_calls


@pytest.mark.slow
def test_a_train_step_without_the_cpu_backend_is_clean(backend_off):
    from nfnet_jax.train import TrainState, nfnet_optimizer
    from nfnet_jax.train.step import pure_train_step

    state = nnx.eval_shape(
        lambda: TrainState(nfnet_jax.create_model('test_nfnet'), nfnet_optimizer(0.1), ema_decay=0.9)
    )
    graphdef, arrays = nnx.split(state)
    images, labels = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)
    text = jax.jit(pure_train_step, static_argnums=(0, 4)).lower(graphdef, arrays, images, labels, 0.1).compile()
    check = check_program(text.as_text())
    assert check.clean, check.findings
    assert check.grouped_convolutions > 0  # the forward's grouped convolutions and their gradients' kept whole


def test_the_cpu_backend_is_found_in_its_programs(backend_off):
    kernels = cpu.enable(onednn=True) and convolution.kernels()
    assert kernels
    # A batch the backend runs in chunks (`cpu.in_chunks`): a loop, and oneDNN's calls or groups run one by one.
    check = check_program(inference_program(2 * cpu.images_per_chunk(64, 64), 64))
    assert 'loop' in check.findings
    assert ('cpu call' if kernels.onednn else 'grouped convolutions split') in check.findings
    if kernels.onednn:
        assert check.findings['cpu call']['count'] == sum(check.custom_calls.values())
    cpu.enable(onednn=False)  # XLA's convolutions, a group at a time
    assert set(check_program(inference_program(2, 64)).findings) == {'grouped convolutions split'}


def test_a_branch_is_found():
    text = jax.jit(lambda x: jax.lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x)).lower(jnp.ones(3)).compile().as_text()
    assert set(check_program(text).findings) == {'conditional'}


# An optimised module as XLA prints one: a residual (add.3) whose other operand is an all-zero constant broadcast
# and converted; add.4 adds a constant XLA elided ({...}), which cannot be read and is not reported.
ZERO_RESIDUAL = """
HloModule jit_apply, entry_computation_layout={(f32[2,4]{1,0})->f32[2,4]{1,0}}

%fused_computation (param_0.1: f32[2,4]) -> f32[2,4] {
  %param_0.1 = f32[2,4]{1,0} parameter(0)
  %constant.7 = bf16[] constant(0)
  %broadcast.2 = bf16[2,4]{1,0} broadcast(%constant.7), dimensions={}
  %convert.1 = f32[2,4]{1,0} convert(%broadcast.2)
  %add.3 = f32[2,4]{1,0} add(%param_0.1, %convert.1), metadata={op_name="jit(apply)/add"}
  %constant.8 = f32[2,4]{1,0} constant({...})
  ROOT %add.4 = f32[2,4]{1,0} add(%add.3, %constant.8)
}

ENTRY %main.5 (x.1: f32[2,4]) -> f32[2,4] {
  %x.1 = f32[2,4]{1,0} parameter(0)
  ROOT %fusion = f32[2,4]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_computation
}
"""


def test_an_all_zero_residual_is_found():
    check = check_program(ZERO_RESIDUAL)
    assert set(check.findings) == {'zero added'} and check.findings['zero added']['count'] == 1
    assert check.findings['zero added']['first'].startswith('%add.3 = ')
    assert check_program(ZERO_RESIDUAL.replace('constant(0)', 'constant(0.5)')).clean


# The watching process on its own, with fake children.


def pending_report() -> dict:
    """A report as it is before the first step: steps pending, no environment yet."""
    return dict(
        started='now',
        finished=None,
        command='python3 -m benchmarks.accelerator --out report',
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


def report_paths(folder: Path) -> runner.Reports:
    return runner.Reports(folder / runner.REPORT_JSON, folder / runner.REPORT_MARKDOWN)


@pytest.mark.parametrize('case', ['past its budget', 'dies'])
def test_the_watchdog_stops_or_loses_one_step_and_keeps_its_figures(tmp_path, case):
    state_path, paths = tmp_path / 'state.json', report_paths(tmp_path)
    report = pending_report()
    if case == 'past its budget':
        child_state(state_path, 'train_step', started_s_ago=10 + runner.GRACE_S + 1)
        worker = fake_worker('sleep', '60')
    else:
        child_state(state_path, 'train_step', started_s_ago=1)
        worker = fake_worker(sys.executable, '-c', 'import sys; print("out of memory", file=sys.stderr); sys.exit(3)')
    began = time.monotonic()
    remaining = runner.watch(worker, state_path, dict(steps=list(STEPS)), report, paths, began)
    assert time.monotonic() - began < 30 and worker.proc.returncode is not None
    assert remaining == ['vs_timm', 'program_check', 'sharded_inference', 'remat_memory']  # for a fresh child process
    step = report['steps']['train_step']
    assert step['results'] == {'size': 64, 'runs': []}  # what it had measured is kept
    if case == 'past its budget':
        assert step['status'] == 'timeout' and 'budget' in step['error']
    else:
        assert step['status'] == 'failed' and 'exit 3' in step['error'] and 'out of memory' in step['error']
    assert report['steps']['parity']['status'] == 'ok'
    saved = json.loads(paths.json.read_text())
    assert saved['steps']['train_step']['status'] == step['status'] and saved['environment'] == {'jax': 'x'}
    assert f'| train_step | {step["status"]} |' in paths.markdown.read_text()


def test_a_child_that_ends_between_steps_leaves_the_rest_to_a_fresh_one(tmp_path):
    state_path = tmp_path / 'state.json'
    child_state(state_path, 'train_step', started_s_ago=1)
    state = json.loads(state_path.read_text())
    state['steps']['train_step']['status'] = 'ok'
    state.update(done=['parity', 'train_step'], current=None)
    state_path.write_text(json.dumps(state))
    report = pending_report()
    worker = fake_worker(sys.executable, '-c', 'pass')
    began = time.monotonic()
    remaining = runner.watch(worker, state_path, dict(steps=list(STEPS)), report, report_paths(tmp_path), began)
    assert remaining == ['vs_timm', 'program_check', 'sharded_inference', 'remat_memory']
    assert [step['status'] for step in report['steps'].values()] == ['ok', 'ok'] + ['pending'] * 4


def test_the_run_refuses_a_bad_step_budget(capsys):
    with pytest.raises(SystemExit):
        runner.parse_args(['--out', 'x', '--step-budget', 'nope=3'])
    assert '--step-budget takes STEP=SECONDS' in capsys.readouterr().err
    assert runner.parse_args(['--out', 'x', '--step-budget', 'vs_timm=30']).step_budget == ['vs_timm=30']
