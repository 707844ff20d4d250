"""`nfnet_jax.cpu.memory.keep_cpu_memory`: after it, a CPU call stops page-faulting its temporary buffer in
afresh. The commands make it with the CPU backend (`nfnet_jax.cpu.enable(keep_memory=True)`) before their first
JAX work, by default when they are the process (`python -m`), or when asked (`--keep-cpu-memory`).

The settings hold for a whole process, so the tests run in child processes of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nfnet_jax.cpu.memory import glibc, keep_cpu_memory

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp, numpy as np
    import nfnet_jax
    from nfnet_jax import inference
    from nfnet_jax.cpu.memory import keep_cpu_memory

    applied = keep_cpu_memory() if sys.argv[1] == 'keep' else None
    nfnet_jax.cpu.enable()  # as the commands run: the CPU backend's convolutions and chunks

    classify = inference.classifier(nfnet_jax.create_model('test_nfnet'))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((8, 256, 256, 3), np.float32))
    temp = classify.compiled.lower(classify.state, images).compile().memory_analysis().temp_size_in_bytes

    def faults_per_call(calls=5):  # the median call's: a one-off (a lazily made pool) does not count
        jax.block_until_ready(classify(images))
        counts = []
        for _ in range(calls):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            logits = np.asarray(classify(images))
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return float(np.median(counts)), logits

    faults, logits = faults_per_call()
    print(json.dumps(dict(
        temp_pages=temp / resource.getpagesize(), faults=faults, applied=applied, logits=logits.tolist(),
        async_dispatch=jax.config.read('jax_cpu_enable_async_dispatch'),
    )))
    """
)


def run_python(code: str, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """`code` run with `args` in a fresh Python process, and the JSON of its last line of output ({} if it failed)."""
    command = [sys.executable, '-c', code, *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return done, json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else {}


def run_child(mode: str) -> dict:
    done, result = run_python(CHILD, mode, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.skipif(glibc() is None, reason='the settings exist in glibc only')
def test_kept_memory_stops_the_page_faults_of_each_call():
    default, kept = run_child('default'), run_child('keep')
    assert kept['applied'] and not kept['async_dispatch'] and default['async_dispatch']
    assert kept['logits'] == default['logits']
    # test_nfnet at batch 8, 256 px: a 48 MiB temporary buffer, above glibc's largest mmap threshold (32 MiB),
    # so by default each call faults most of its pages in again.
    assert default['faults'] > 0.5 * default['temp_pages']
    assert kept['faults'] < 0.1 * default['faults']


def test_keeping_memory_after_the_first_computation_is_refused_and_changes_nothing():
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jnp.ones(2) + 1)  # the backend exists from here on
    with pytest.raises(RuntimeError, match='before the process.s first JAX computation'):
        keep_cpu_memory()
    assert jax.config.read('jax_cpu_enable_async_dispatch')


COMMAND_CHILD = textwrap.dedent(
    """
    import importlib, json, sys
    import jax

    code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
    print(json.dumps(dict(code=code, async_dispatch=jax.config.read('jax_cpu_enable_async_dispatch'))))
    """
)


@pytest.mark.skipif(glibc() is None, reason='the settings exist in glibc only')
@pytest.mark.parametrize(
    'command,args,error',
    [
        ('nfnet_jax.predict', ['MISSING/a.jpg', '--model', 'test_nfnet.r160_in1k'], 'no such file or folder'),
        (
            'nfnet_jax.batch_predict',
            ['run', 'MISSING/a.jpg', '--output', 'OUT', '--model', 'test_nfnet.r160_in1k'],
            'no such file or folder',
        ),
        # finetune counts the devices (JAX's clients are made) before it finds the data missing
        ('nfnet_jax.finetune', ['--data', 'MISSING', '--model', 'test_nfnet', '--output', 'OUT'], 'MISSING'),
    ],
)
def test_each_command_keeps_cpu_memory_before_its_first_jax_work(tmp_path, command, args, error):
    args = [str(tmp_path / arg) if arg in ('MISSING', 'OUT') or arg.startswith('MISSING/') else arg for arg in args]
    done, result = run_python(COMMAND_CHILD, command, *args, '--keep-cpu-memory', timeout=300)
    assert result.get('code') == 2 and error in done.stderr and '--keep-cpu-memory' not in done.stderr, done.stderr
    assert not result['async_dispatch']


MODULE_CHILD = textwrap.dedent(
    """
    import json, runpy, sys
    import jax

    sys.argv = sys.argv[1:]  # the command line of `python -m COMMAND ARGS...`
    try:
        runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
    except SystemExit as stop:
        print(json.dumps(dict(code=stop.code, async_dispatch=jax.config.read('jax_cpu_enable_async_dispatch'))))
    """
)


@pytest.mark.skipif(glibc() is None, reason='the settings exist in glibc only')
@pytest.mark.parametrize(
    'how,flags,kept',
    [('python -m', [], True), ('python -m', ['--no-keep-cpu-memory'], False), ('main() from Python', [], False)],
)
def test_a_command_keeps_cpu_memory_by_default_only_when_it_is_the_process(tmp_path, how, flags, kept):
    args = ['nfnet_jax.predict', str(tmp_path / 'MISSING.jpg'), '--model', 'test_nfnet.r160_in1k', *flags]
    done, result = run_python(MODULE_CHILD if how == 'python -m' else COMMAND_CHILD, *args, timeout=300)
    assert result.get('code') == 2 and 'no such file or folder' in done.stderr, done.stderr
    assert result['async_dispatch'] is not kept


def test_a_command_asked_to_keep_memory_after_jax_ran_says_what_to_do(capsys):
    import jax
    import jax.numpy as jnp

    from nfnet_jax.predict import main as predict_main

    jax.block_until_ready(jnp.ones(2) + 1)  # as in a notebook that ran JAX before calling the command
    assert predict_main(['MISSING.jpg', '--model', 'test_nfnet.r160_in1k', '--keep-cpu-memory']) == 2
    assert 'run the command on its own (python -m ...), or leave the flag out' in capsys.readouterr().err
    assert jax.config.read('jax_cpu_enable_async_dispatch')
