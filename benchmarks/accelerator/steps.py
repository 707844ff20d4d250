"""The accelerator run's steps, each a function of (its StepContext, its settings, whether on a GPU).

A step records into its `StepContext` (saved after every measurement, so a step killed for its
budget keeps its figures), skips what its budget leaves no room for, and lets a failed part fail
alone. Every program JAX compiles meanwhile is timed into the part that compiled it
(`record_compile`, from JAX's monitoring events). The steps import torch, timm and JAX in their
bodies: the watching process imports this module for `STEPS` without them.
"""

from __future__ import annotations

import contextlib
import gc
import re
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FIRST_CALL_FIGURES = ('first_call_s', 'first_call_peak_mib', 'warm_call_peak_mib')  # what a first call measures
LABEL_SMOOTHING = 0.1  # the train step's loss, as `benchmarks.train_step`'s
# JAX's monitoring events of a compilation, and the phase each times.
COMPILE_EVENTS = {
    '/jax/core/compile/jaxpr_trace_duration': 'trace_s',
    '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
    '/jax/core/compile/backend_compile_duration': 'compile_s',
}
MIN_COMPILE_S = 0.5  # compilations shorter than this in all (eager operations, small helpers) are left out


class StepContext:
    """What a step function records into: results, skipped and failed parts, compilations and compiled programs,
    saved after each change. The one `active` context gets the compilations (`record_compile`)."""

    active: StepContext | None = None

    def __init__(self, record: dict[str, Any], budget_s: float, save: Callable[[], None], programs: Path):
        self.record, self.budget_s, self._save, self.programs = record, budget_s, save, programs
        self.start = time.monotonic()
        self.results: dict[str, Any] = record['results']
        self.current_part = '(setup)'
        StepContext.active = self

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def skip(self, what: str, why: str, planned: bool = False) -> None:
        """Record a part not run: for the budget (the step is then 'partial'), or `planned` by the settings."""
        from nfnet_jax.progress import log

        log(f'skipping {what}: {why}')
        self.record['skipped'].append(dict(what=what, why=why, planned=planned))
        self.save()

    @contextlib.contextmanager
    def part(self, what: str) -> Iterator[None]:
        """A measurement whose failure is recorded and does not stop the step; its compilations are named after it."""
        outer, self.current_part = self.current_part, what
        try:
            yield
        except Exception as err:  # a failed part (out of memory, a compiler error) must not lose the others
            self.failed(what, err)
        finally:
            self.current_part = outer
            self.save()

    def failed(self, what: str, err: Exception) -> None:
        """Record a part that raised `err` (call it in the except block: it keeps the traceback)."""
        from nfnet_jax.progress import log

        log(f'{what} failed: {err!r}')
        self.record['errors'].append(
            dict(what=what, error=f'{type(err).__name__}: {err}'[:500], traceback=traceback.format_exc()[-3000:])
        )
        self.save()

    def compiled(self, phase: str, function: str, seconds: float) -> None:
        """One phase of a JAX compilation in the current part; a phase already timed starts a new compilation."""
        compiles = self.record.setdefault('compiles', [])
        function = re.sub(r'^jit\((.*)\)$', r'\1', function)
        for entry in reversed(compiles):
            if entry['part'] == self.current_part and entry['function'] == function and phase not in entry:
                entry[phase] = round(seconds, 3)
                return
        compiles.append(dict(part=self.current_part, function=function, **{phase: round(seconds, 3)}))

    def save_program(self, name: str, text: str) -> None:
        """Keep a compiled program's text in the programs folder, for `program_check` and for reading."""
        from nfnet_jax.files import atomic_write

        self.programs.mkdir(parents=True, exist_ok=True)
        path = self.programs / f'{name}.hlo.txt'
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding='utf-8'), force=True)
        self.results.setdefault('programs', []).append(path.name)

    def save(self) -> None:
        self.record['elapsed_s'] = round(self.elapsed(), 1)
        compiles = self.record.get('compiles', [])
        compiles[:] = [c for c in compiles if sum(v for k, v in c.items() if k.endswith('_s')) >= MIN_COMPILE_S]
        self._save()


def record_compile(event: str, seconds: float, **kwargs: Any) -> None:
    """A listener of JAX's monitoring events (`jax.monitoring.register_event_duration_secs_listener`): a
    compilation's trace, lowering and XLA compile times, into the active step's current part."""
    phase = COMPILE_EVENTS.get(event)
    if phase is not None and StepContext.active is not None:
        StepContext.active.compiled(phase, str(kwargs.get('fun_name', '?')), seconds)


def check_devices(gpu: bool) -> tuple[Any, str]:
    """JAX's and torch's device, refusing a GPU run where either framework does not see the GPU."""
    import jax
    import torch

    if gpu and jax.default_backend() != 'gpu':
        raise RuntimeError(f'nvidia-smi lists a GPU but JAX runs on {jax.default_backend()}: JAX has no CUDA plugin')
    if gpu and not torch.cuda.is_available():
        raise RuntimeError('nvidia-smi lists a GPU but torch sees none: torch is a CPU build')
    return jax.devices()[0], 'cuda' if gpu else 'cpu'


def free_memory(gpu: bool) -> None:
    """Drop what the last part left: Python's garbage, and torch's cached GPU memory (JAX's pool stays)."""
    gc.collect()
    if gpu:
        import torch

        torch.cuda.empty_cache()


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
    """The model with every tensor randomised (`benchmarks.random_weights`) on the device against timm float32 on
    the CPU: logits, pre-logits, forward_features, the feature taps and the folded inference path's logits, at
    every precision asked, all in one compiled program; timm on the device with TF32 off and with its defaults.
    Raises AssertionError where an output is over the tolerance at 'highest' precision."""
    import jax
    import numpy as np
    import timm
    import torch
    from flax import nnx

    from benchmarks.random_weights import randomize_
    from nfnet_jax.factory import from_timm
    from nfnet_jax.inference import classifier
    from nfnet_jax.numerics import FP32_RTOL, relative_error

    device, torch_device = check_devices(gpu)
    name, (height, width), precisions = settings['model'], settings['size'], settings['precisions']
    ctx.results.update(tolerance=FP32_RTOL, reference='timm float32 on the CPU', device=str(device), models={})
    if 'default' not in precisions:
        ctx.skip('default precision', 'XLA:CPU computes float32 exactly at every precision', planned=True)

    def timm_outputs(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            final, taps = model.forward_intermediates(nchw.to(next(model.parameters()).device))
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

    torch.manual_seed(0)
    theirs = timm.create_model(name).eval()
    randomize_(theirs, seed=len(name))
    ours = from_timm(theirs)
    fast = classifier(ours)
    graphdef, state = nnx.split(ours)
    state, fast_state = jax.device_put((state, fast.state), device)

    @jax.jit
    def outputs(state: Any, fast_state: Any, x: Any) -> dict[str, Any]:
        """Every output at every precision: each block is traced under its precision, so one program holds all."""
        out = {}
        for precision in precisions:
            with jax.default_matmul_precision(None if precision == 'default' else precision):
                model = nnx.merge(graphdef, state)
                final, taps = model.forward_intermediates(x)
                out[precision] = {
                    'logits': model.forward_head(final),
                    'pre_logits': model.forward_head(final, pre_logits=True),
                    'forward_features': final,
                } | {f'tap {i}': t for i, t in enumerate(taps)}
                out[f'fast path {precision}'] = fast.apply(fast_state, x)
        return out

    x = np.random.default_rng(1).standard_normal((settings['batch'], height, width, 3)).astype(np.float32)
    expected = timm_outputs(theirs, x)
    row: dict[str, Any] = {}
    ctx.results['models'][name] = {f'{height}x{width}': row}
    with ctx.part('nfnet_jax on the device'):
        got = jax.device_get(outputs(state, fast_state, jax.device_put(x, device)))
        for precision in precisions:
            row[precision], row[f'{precision} per output'] = worst(got[precision], expected)
            row[f'fast path {precision}'] = relative_error(got[f'fast path {precision}'], expected['logits'])
    if gpu:
        with ctx.part('timm on the device'):
            on_device = theirs.to(torch_device)
            with torch_fp32(exact=True):
                row['timm on device, TF32 off'] = worst(timm_outputs(on_device, x), expected)[0]
            row['timm on device, defaults'] = worst(timm_outputs(on_device, x), expected)[0]
    row['pass'] = row.get('highest', np.inf) <= FP32_RTOL and row.get('fast path highest', np.inf) <= FP32_RTOL
    compiles = ctx.record.get('compiles', [])
    ctx.results['compilations'] = sum(c['part'] == 'nfnet_jax on the device' and 'compile_s' in c for c in compiles)
    ctx.results['all_pass'] = row['pass'] and not ctx.record['errors']
    if not row['pass']:
        raise AssertionError(f'{name} {height}x{width} is over the tolerance {FP32_RTOL} at highest precision')


def time_jax_steps(call: Callable[[], Any], steps: int, rounds: int) -> dict[str, Any]:
    """A step function's first call (compilation included), then `rounds` of `steps` calls dispatched back to back:
    per round the seconds per step (the device's pace once the host keeps ahead of it), and per call the host's
    seconds until the call returned (what Python and dispatch cost; the device runs meanwhile)."""
    import jax

    began = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - began
    jax.block_until_ready(call())
    step_s, host_s = [], []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(steps):
            called = time.perf_counter()
            out = call()
            host_s.append(time.perf_counter() - called)
        jax.block_until_ready(out)
        step_s.append((time.perf_counter() - began) / steps)
    return dict(first_call_s=first, step_s=step_s, host_s=host_s)


def time_blocking_steps(step: Callable[[], None], steps: int, rounds: int) -> dict[str, Any]:
    """As `time_jax_steps` for a step that returns when its work is done (timm's): no host figure of its own."""
    began = time.perf_counter()
    step()
    first = time.perf_counter() - began
    step_s = []
    for _ in range(rounds):
        began = time.perf_counter()
        for _ in range(steps):
            step()
        step_s.append((time.perf_counter() - began) / steps)
    return dict(first_call_s=first, step_s=step_s, host_s=[])


def train_step(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    """Per (dtype, batch) of the settings' runs, `train_run`; a run the budget leaves no room for is skipped."""
    import torch

    _, torch_device = check_devices(gpu)
    if gpu:
        torch.backends.cudnn.benchmark = True
    ctx.results.update(
        model=settings['model'], size=settings['size'], steps=settings['steps'], rounds=settings['rounds'], runs=[]
    )
    longest = 0.0
    for dtype, batch in settings['runs']:
        what = f'{dtype} batch {batch}'
        if ctx.remaining() < longest:
            ctx.skip(what, f'{ctx.remaining():.0f} s left of the budget, a run took {longest:.0f} s')
            continue
        began = time.monotonic()
        run: dict[str, Any] = dict(dtype=dtype, batch=batch, configs={})
        ctx.results['runs'].append(run)
        train_run(ctx, settings, run, torch_device)
        free_memory(gpu)
        longest = max(longest, time.monotonic() - began)
        ctx.save()


def train_run(ctx: StepContext, settings: dict[str, Any], run: dict[str, Any], torch_device: str) -> None:
    """One dtype and batch size: `nfnet_jax.train.train_step` (NFNet optimizer and EMA) timed for the device's step
    and the host's time per call; the same step as a plain `jax.jit` of the state split once (the host's floor;
    its compiled program is kept for `program_check`); timm eager channels_last (AMP in bfloat16) where the
    budget allows. Records into `run`."""
    import copy

    import jax
    import numpy as np
    import timm
    import torch
    from flax import nnx

    from benchmarks import train_step as bench
    from nfnet_jax import train
    from nfnet_jax.train.step import pure_train_step

    dtype, batch, size = run['dtype'], run['batch'], settings['size']
    steps, rounds, what = settings['steps'], settings['rounds'], f'{run["dtype"]} batch {run["batch"]}'
    began = time.monotonic()
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, batch)  # int64, as torch's loss takes them
    # Uncommitted, as the state's arrays start: a batch committed to the device would make the library's step compile
    # twice (its first call's output, the next call's state, is committed, and jit keys its cache on that).
    x, y = jax.device_put((images, labels.astype(np.int32)))
    torch.manual_seed(0)
    reference = timm.create_model(settings['model'])
    state = train.TrainState(bench.jax_model(reference, dtype), train.nfnet_optimizer(0.1), ema_decay=0.9999)
    with ctx.part(f'{what}: nfnet_jax.train.train_step'):
        run['configs']['nfnet_jax train_step'] = time_jax_steps(
            lambda: train.train_step(state, x, y, LABEL_SMOOTHING), steps, rounds
        )
    with ctx.part(f'{what}: plain jax.jit'):
        graphdef, arrays = nnx.split(state)  # as the library's steps left it; its arrays are donated from now on
        lowered = jax.jit(pure_train_step, static_argnums=(0, 4), donate_argnums=1).lower(
            graphdef, arrays, x, y, LABEL_SMOOTHING
        )
        compiled = lowered.compile()
        ctx.save_program(f'train_step_{dtype}_batch{batch}', compiled.as_text())
        held = [arrays]

        def plain() -> Any:
            held[0], metrics = compiled(held[0], x, y)
            return metrics

        run['configs']['plain jax.jit'] = time_jax_steps(plain, steps, rounds)
    with ctx.part(f'{what}: FLOPs per step'):
        # XLA's cost analysis counts no work in the CPU backend's oneDNN calls: there, count without them.
        on_cpu = jax.default_backend() == 'cpu'
        run['flops_per_step'] = (
            bench.step_flops(settings['model'], batch, size, dtype) if on_cpu else lowered.cost_analysis()['flops']
        )
    if not settings['timm']:
        return
    if ctx.remaining() < 0.3 * (time.monotonic() - began):
        ctx.skip(f'{what}: timm', f'{ctx.remaining():.0f} s left of the budget')
        return
    with ctx.part(f'{what}: timm'):
        step = bench.timm_step(copy.deepcopy(reference), True, images, labels, torch_device, dtype=dtype)
        run['configs']['timm eager channels_last'] = time_blocking_steps(step, steps, rounds)


def vs_timm(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    """`benchmarks.vs_timm`'s figures per dtype and batch size; torch.compile (with AMP) in the dtypes asked where
    the budget allows, after the figures without it are saved. nfnet_jax's compiled inference program is kept
    (first batch size of each dtype) for `program_check`."""
    import torch

    from benchmarks import vs_timm as bench
    from nfnet_jax.progress import log, progress

    _, torch_device = check_devices(gpu)
    if gpu:
        torch.backends.cudnn.benchmark = True  # as timm's own benchmark script: cuDNN picks its kernels per shape
    model_name, size, repeats = settings['model'], settings['size'], settings['repeats']
    ctx.results.update(
        model=model_name,
        size=size,
        repeats=repeats,
        cudnn_benchmark=gpu,
        compile_dtypes=settings['compile_dtypes'],
        runs=[],
    )
    shapes = [(dtype, batch) for dtype in settings['dtypes'] for batch in settings['batches']]

    ceilings: dict[str, Any] = {}  # per dtype, the fastest matmul (`benchmarks.vs_timm.Ceiling`)
    matmuls = ctx.results.setdefault('matmul_ceiling_matmul', {})

    def measure_shape(
        runners: dict[str, Any], dtype: str, batch: int, what: str, first_calls: dict[str, float] | None = None
    ) -> dict[str, Any]:
        if 'flops_per_image' not in ctx.results:  # one size per run, and the same count in every dtype
            ctx.results['flops_per_image'] = bench.flops_per_image(built['jax'], size)
        if dtype not in ceilings:  # found once per dtype, then timed beside every shape
            ceilings[dtype] = bench.matmul_ceiling(dtype, gpu, budget_s=settings['ceiling_budget_s'])
            matmuls[dtype] = ceilings[dtype].matmul
        flops = ctx.results['flops_per_image']
        with progress(total=len(runners) * (repeats + 1), desc=f'vs_timm {what}', unit='call') as bar:
            results, logits, ceiling = bench.measure(runners, batch, size, flops, repeats, gpu, bar, ceilings[dtype])
        for name, seconds in (first_calls or {}).items():
            results[name].first_call_s = seconds
        log(bench.table(results, ceiling.gflops))
        return dict(dtype=dtype, ceiling_gflops=ceiling.gflops, **bench.shape_record(results, logits))

    plain_s: list[float] = []  # each shape's time without torch.compile
    compile_s: list[float] = []  # torch.compile's first call per shape
    built: dict[str, Any] = {}
    for index, (dtype, batch) in enumerate(shapes):
        what = f'{dtype} batch {batch}'
        estimate = max(plain_s, default=0.0)
        if ctx.remaining() < estimate:
            ctx.skip(what, f'{ctx.remaining():.0f} s left of the budget, a shape took up to {estimate:.0f} s')
            continue
        use_compile = dtype in settings['compile_dtypes']
        if use_compile:
            # Room for this shape's compile, after this shape and every later one without it.
            reserve = (len(shapes) - index) * max(plain_s, default=15.0 if gpu else 60.0)
            expected = max(compile_s, default=60.0 if gpu else 300.0)
            use_compile = ctx.remaining() - reserve >= expected
            if not use_compile:
                ctx.skip(
                    f'torch.compile at {what}',
                    f'about {expected:.0f} s to compile; {ctx.remaining():.0f} s left for {len(shapes) - index} shapes',
                )
        else:
            ctx.skip(f'torch.compile at {what}', f'asked for in {settings["compile_dtypes"] or "no dtype"}', True)
        began, this_compile_s = time.monotonic(), 0.0
        with ctx.part(what):
            if built.get('dtype') != dtype:
                built.clear()
                free_memory(gpu)
                timm_model, jax_model = bench.build_models(model_name, dtype, torch_device)
                built.update(dtype=dtype, timm=timm_model, jax=jax_model)
            runners = bench.build_runners(batch, size, dtype, gpu, built['timm'], built['jax'], use_compile)
            compiled = bench.TIMM_CONFIGS[2]
            compiled_call = runners.pop(compiled, None)  # torch.compile compiles on its first call
            ctx.results['runs'].append(measure_shape(runners, dtype, batch, what))
            if not any(p.startswith(f'inference_{dtype}_') for p in ctx.results.get('programs', [])):
                ctx.save_program(f'inference_{dtype}_batch{batch}', runners[bench.JAX_CONFIG].program_text())
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
        plain_s.append(time.monotonic() - began - this_compile_s)
        free_memory(gpu)
        ctx.save()


def program_check(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    """Every program kept by the steps before (`StepContext.save_program`) through `programs.check_program`; where
    none was kept, the float32 classifier at batch 1 is compiled here. On a GPU a finding fails the step; on the
    CPU the backend's own rewrites are expected, and listed."""
    from benchmarks.accelerator.programs import check_program

    paths = sorted(ctx.programs.glob('*.hlo.txt'))
    if not paths:
        with ctx.part('float32 classifier (no step before kept a program)'):
            import jax
            import jax.numpy as jnp

            import nfnet_jax
            from nfnet_jax.inference import classifier

            fn = classifier(nfnet_jax.create_model(settings['model']))
            images = jax.ShapeDtypeStruct((1, settings['size'], settings['size'], 3), jnp.float32)
            ctx.save_program('inference_float32_batch1', fn.compiled.lower(fn.state, images).compile().as_text())
            paths = sorted(ctx.programs.glob('*.hlo.txt'))
    checked = ctx.results.setdefault('checked', {})
    for path in paths:
        with ctx.part(path.name):
            checked[path.name.removesuffix('.hlo.txt')] = check_program(path.read_text(encoding='utf-8')).record()
    ctx.results['clean'] = bool(checked) and all(record['clean'] for record in checked.values())
    if gpu and not ctx.results['clean']:
        dirty = [name for name, record in checked.items() if not record['clean']]
        raise AssertionError(f'CPU-only constructs in the GPU programs: {", ".join(dirty)}')


def sharded_inference(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    """`benchmarks.sharded_inference`'s one device, then the same global batch over every device; nothing to
    compare with one device."""
    import jax
    import numpy as np
    import timm
    import torch

    from benchmarks.sharded_inference import images_per_second
    from nfnet_jax import parallel
    from nfnet_jax.factory import from_timm
    from nfnet_jax.inference import classifier

    device, _ = check_devices(gpu)
    if jax.device_count() == 1:
        ctx.skip('the whole step', 'one device: a mesh of it is the device itself', planned=True)
        return
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


def remat_memory(ctx: StepContext, settings: dict[str, Any], gpu: bool) -> None:
    """`benchmarks.remat_memory`: the training step's memory as XLA plans it for this device, plain and with
    per-block gradient checkpointing (compiled, nothing run)."""
    from benchmarks.remat_memory import step_memory

    check_devices(gpu)
    ctx.results.update(model=settings['model'], size=settings['size'], batch=settings['batch'], configs={})
    for name, grad_checkpointing in (('plain', False), ('grad_checkpointing', True)):
        if ctx.results['configs'] and ctx.remaining() < ctx.elapsed():
            ctx.skip(name, f'{ctx.remaining():.0f} s left of the budget; the plain step took {ctx.elapsed():.0f} s')
            return
        with ctx.part(name):
            ctx.results['configs'][name] = step_memory(
                settings['model'], settings['size'], settings['batch'], grad_checkpointing
            )


Step = Callable[[StepContext, dict[str, Any], bool], None]
STEPS: dict[str, Step] = dict(
    parity=parity,
    train_step=train_step,
    vs_timm=vs_timm,
    program_check=program_check,
    sharded_inference=sharded_inference,
    remat_memory=remat_memory,
)
