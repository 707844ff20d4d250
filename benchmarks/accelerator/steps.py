"""The accelerator run's four steps, each a function of (its StepContext, its settings, whether on a GPU).

A step records into its `StepContext` (saved after every measurement, so a step killed for its
budget keeps its figures), skips what its budget leaves no room for, and lets a failed part fail
alone. The steps import torch, timm and JAX in their bodies: the watching process imports this
module for `STEPS` without them.
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

FIRST_CALL_FIGURES = ('first_call_s', 'first_call_peak_mib', 'warm_call_peak_mib')  # what a first call measures


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
        from nfnet_jax.progress import log

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
        from nfnet_jax.progress import log

        log(f'{what} failed: {err!r}')
        self.record['errors'].append(
            dict(what=what, error=f'{type(err).__name__}: {err}'[:500], traceback=traceback.format_exc()[-3000:])
        )
        self.save()

    def save(self) -> None:
        self.record['elapsed_s'] = round(self.elapsed(), 1)
        self._save()


def check_devices(gpu: bool) -> tuple[Any, str]:
    """JAX's and torch's device, refusing a GPU run where either framework does not see the GPU."""
    import jax
    import torch

    if gpu and jax.default_backend() != 'gpu':
        raise RuntimeError(f'nvidia-smi lists a GPU but JAX runs on {jax.default_backend()}: install jax[cuda13]')
    if gpu and not torch.cuda.is_available():
        raise RuntimeError('nvidia-smi lists a GPU but torch sees none: install a CUDA build of torch')
    return jax.devices()[0], 'cuda' if gpu else 'cpu'


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
    """Each model's outputs on the device against timm's float32 ones on the CPU (the package's docstring, step 1);
    raises AssertionError where one is over the tolerance at 'highest' precision."""
    import copy

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
    ctx.results.update(tolerance=FP32_RTOL, reference='timm float32 on the CPU', device=str(device), models={})
    if 'default' not in settings['precisions']:
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

    longest = 0.0
    for name in settings['models']:
        if ctx.remaining() < longest:
            ctx.skip(name, f'{ctx.remaining():.0f} s left of the budget; the previous model took {longest:.0f} s')
            continue
        began = time.monotonic()
        with ctx.part(f'parity {name}'):
            torch.manual_seed(0)
            theirs = timm.create_model(name).eval()
            randomize_(theirs, seed=len(name))
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
    """`benchmarks.vs_timm`'s figures per dtype and batch size; torch.compile where asked and the budget allows,
    after the figures without it are saved."""
    import torch

    from benchmarks import vs_timm as bench
    from nfnet_jax.progress import log, progress

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
    """`benchmarks.train_step`'s steps without torch.compile (it compiles a training step for longer than the
    budget), in timed rounds while the budget lasts."""
    import torch

    from benchmarks import train_step as bench
    from nfnet_jax.progress import progress

    _, torch_device = check_devices(gpu)
    if gpu:
        torch.backends.cudnn.benchmark = True
    batch, size = settings['batch'], settings['size']
    ctx.results.update(model=settings['model'], batch=batch, size=size, timm_device=torch_device, configs={})
    with ctx.part('FLOPs per step'):
        ctx.results['flops_per_step'] = bench.step_flops(settings['model'], batch, size)
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
    """`benchmarks.sharded_inference`'s one device, then the same global batch over every device."""
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


Step = Callable[[StepContext, dict[str, Any], bool], None]
STEPS: dict[str, Step] = dict(
    parity=parity, vs_timm=vs_timm, train_step=train_step, sharded_inference=sharded_inference
)
