"""The accelerator run's child process: the steps it is given, one after another, each saved as it goes.

    python -m benchmarks.accelerator.worker CONFIG.json   (started by `runner`, never by hand)

The config names the steps, their settings and budgets, the run's deadline and the state file.
After every measurement the whole state (the environment, each step's record, the step running
and when it started) replaces the state file, which the watching process reads.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.accelerator.settings import MIN_STEP_BUDGET_S
from benchmarks.accelerator.steps import STEPS, StepContext, record_compile
from benchmarks.vs_timm import cpu_convolutions
from nfnet_jax import cpu
from nfnet_jax.files import atomic_write
from nfnet_jax.progress import log


def run_worker(config_path: Path) -> int:
    """Run the config's steps, every JAX compilation timed into the step that made it (`record_compile`), with
    nfnet_jax's CPU backend on where JAX runs on the CPU (as the commands run), and left off on a GPU.

    Its memory settings stay off: `vs_timm`'s peak-memory figures need the allocator's defaults.
    """
    import jax

    config = json.loads(config_path.read_text())
    state_path = Path(config['state'])
    state: dict[str, Any] = dict(steps={}, done=[], current=None, environment=None)

    def save() -> None:
        text = json.dumps(state, default=str)
        atomic_write(state_path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'), force=True)

    cpu.enable()  # a no-op where JAX's default backend is not the CPU
    jax.monitoring.register_event_duration_secs_listener(record_compile)
    state['environment'] = worker_environment(config['gpu'])
    save()
    for name in config['steps']:
        budget = round(min(config['budgets'][name], config['deadline'] - time.monotonic()), 1)
        if budget < MIN_STEP_BUDGET_S:
            state['steps'][name] = dict(status='skipped', error='the run had used its whole budget')
            state['done'].append(name)
            save()
            continue
        record = dict(status='running', budget_s=budget, results={}, skipped=[], errors=[])
        state['steps'][name] = record
        state['current'] = name
        state['current_started'] = time.monotonic()  # Linux's monotonic clock is the same in every process
        ctx = StepContext(record, budget, save, Path(config['programs']))
        ctx.save()
        log(f'--- {name} (budget {budget:.0f} s)')
        try:
            STEPS[name](ctx, config['settings'][name], config['gpu'])
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
    """The versions of both frameworks, the devices each sees, and which kernels run nfnet_jax's CPU convolutions."""
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
        cpu_convolutions=cpu_convolutions(),
        torch_cuda=torch.version.cuda,
        torch_cuda_available=torch.cuda.is_available(),
        torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        torch_cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        torch_threads=torch.get_num_threads(),
        expected_gpu=gpu,
    )


if __name__ == '__main__':
    sys.exit(run_worker(Path(sys.argv[1])))
