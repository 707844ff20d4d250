"""`keep_cpu_memory`: after it, a CPU call stops page-faulting its temporary buffer in afresh.

The settings hold for a whole process, so the test runs in a child process of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nfnet_jax.cpu_memory import glibc

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp, numpy as np
    import nfnet_jax
    from nfnet_jax import inference

    applied = nfnet_jax.keep_cpu_memory() if sys.argv[1] == 'keep' else None

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


def run_child(mode: str) -> dict:
    command = [sys.executable, '-c', CHILD, mode]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


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

    import nfnet_jax

    jax.block_until_ready(jnp.ones(2) + 1)  # the backend exists from here on
    with pytest.raises(RuntimeError, match='before the process.s first JAX computation'):
        nfnet_jax.keep_cpu_memory()
    assert jax.config.read('jax_cpu_enable_async_dispatch')
