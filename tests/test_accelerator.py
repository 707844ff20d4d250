"""The accelerator run (`python -m benchmarks.accelerator`) end to end in its quickest CPU mode, on test_nfnet.

No GPU figure is checked here: this keeps the one command for the accelerator working, its steps,
its child process, its watchdog and both reports, so that it runs when a GPU is there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import accelerator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    folder = tmp_path_factory.mktemp('accelerator')
    json_path, markdown_path = folder / 'report.json', folder / 'report.md'
    command = [sys.executable, '-m', 'benchmarks.accelerator', '--quick', '--device', 'cpu', '--cpu-devices', '2']
    command += ['--json', str(json_path), '--markdown', str(markdown_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    return done, json_path, markdown_path


def test_quick_cpu_run_writes_every_step_to_both_reports(quick_run):
    done, json_path, markdown_path = quick_run
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(json_path.read_text())
    assert report['schema'] == accelerator.SCHEMA and report['quick'] and report['device'] == 'cpu'
    assert report['finished'] and report['complete'], {name: step['status'] for name, step in report['steps'].items()}
    assert list(report['steps']) == list(accelerator.STEPS)
    assert {'cpu', 'cpu_cores', 'python', 'gpus'} <= set(report['machine'])
    environment = report['environment']
    assert environment['jax_backend'] == 'cpu' and environment['jax_device_count'] == 2
    assert {'jax', 'jaxlib', 'torch', 'timm', 'flax'} <= set(environment)
    for name, step in report['steps'].items():
        assert step['status'] == 'ok' and not step['errors'], (name, step)
        assert 0 < step['elapsed_s'] <= step['budget_s'] + accelerator.GRACE_S
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

    train = report['steps']['train_step']['results']['configs']
    assert set(train) == {'timm eager NCHW', 'timm eager channels_last', 'nfnet_jax jit (cpu)'}
    assert all(len(r['step_s']) == 2 and r['first_step_s'] > 0 for r in train.values())

    sharded = report['steps']['sharded_inference']['results']
    assert sharded['devices'] == 2 and sharded['batch'] == 4
    assert set(sharded['configs']) == {'one device', "mesh {'data': 2, 'model': 1}"}

    markdown = markdown_path.read_text()
    for heading in ('## Machine', '## Steps', *(f'## {name}' for name in accelerator.STEPS)):
        assert f'\n{heading}\n' in markdown
    assert '| test_nfnet | 67x53 |' in markdown


def test_existing_reports_are_not_replaced_without_force(quick_run, capsys):
    _, json_path, markdown_path = quick_run
    before = json_path.read_text(), markdown_path.read_text()
    argv = ['--quick', '--device', 'cpu', '--json', str(json_path), '--markdown', str(markdown_path)]
    assert accelerator.main(argv) == 2
    assert 'already exists' in capsys.readouterr().err
    assert (json_path.read_text(), markdown_path.read_text()) == before


def test_partial_reports_render():
    """A report written mid-run (steps pending, no environment yet) renders, as after each step."""
    report = dict(
        started='now',
        finished=None,
        command='python -m benchmarks.accelerator',
        quick=False,
        machine=accelerator.host_machine([]),
        environment=None,
        steps={
            name: dict(status='pending', budget_s=10, results={}, skipped=[], errors=[]) for name in accelerator.STEPS
        },
    )
    markdown = accelerator.render_markdown(report)
    assert 'running.' in markdown and markdown.count('| pending |') == len(accelerator.STEPS)
