"""nfnet_jax against timm in one process, on the same weights and the same images.

    python -m benchmarks.vs_timm --model dm_nfnet_f0 --batch 8 --size 256 [--dtype float32|bfloat16] [--json OUT]
    python -m benchmarks.vs_timm --model dm_nfnet_f0 --sweep [--plot OUT.png] [--json OUT]

timm runs eager NCHW, eager channels_last and torch.compile (channels_last); nfnet_jax runs its
jitted inference path (`nfnet_jax.inference.classifier`), on CPU with its CPU backend on as the
commands run it (`nfnet_jax.cpu.enable`, when the benchmark is the process) but with the
allocator's defaults: `--keep-cpu-memory` is off unless given, since it hides the memory the
peak-memory columns count. The timed calls go round-robin over
the configurations, so load from other processes hits all of them alike, and each reports the
median images/s, its first call (compilation included) and the peak memory one call adds on
top of the loaded weights. Speed is also given as GFLOP/s (the model's FLOPs per image from XLA's
cost analysis, `flops_per_image`) and as a share of the machine's practical ceiling, a large square
matmul in torch, XLA or torch's convolutions, whichever is fastest (see `matmul_ceiling`), timed in the same
round-robin.
On a GPU the same command runs timm under AMP with channels_last and nfnet_jax in bfloat16 by
default. The weights are timm's own random init, converted: speed does not depend on their
values, and the logits of both sides are compared as a sanity check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks import markdown
from benchmarks.machine import cpu_model

SWEEP_BATCHES = (1, 8, 32)
SWEEP_SIZES = (192, 256, 320)
CEILING_MATMUL = 4096  # the largest side of the square matmul whose speed stands for the machine's ceiling
CEILING_BUDGET_S = 20.0  # at most this long for the ceiling's timed calls, by a smaller side (`matmul_ceiling`)
TIMM_CONFIGS = ('timm eager NCHW', 'timm eager channels_last', 'timm compile channels_last')
JAX_CONFIG = 'nfnet_jax jit'


@dataclass
class Result:
    """One configuration at one batch size and image size."""

    name: str
    batch: int
    size: int
    first_call_s: float
    first_call_peak_mib: float | None
    warm_call_peak_mib: float | None
    flops_per_image: float
    run_s: list[float] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.run_s)

    @property
    def best_images_per_s(self) -> float:
        """From the fastest call: on a shared machine, the least disturbed one."""
        return self.batch / min(self.run_s)

    @property
    def gflops(self) -> float:
        """Median GFLOP/s, counting the model's FLOPs (the same count for every configuration)."""
        return self.images_per_s * self.flops_per_image / 1e9


class PeakMemory:
    """Peak memory added by a block of work: CUDA allocator stats on a GPU, else the process's peak RSS.

    On CPU the kernel's peak-RSS counter is reset first (Linux `clear_refs`); where that is not
    allowed the measurement is None rather than a stale lifetime peak.
    """

    def __init__(self, framework: str, gpu: bool):
        self.framework, self.gpu = framework, gpu
        self.mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.gpu and self.framework == 'torch':
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.gpu:
            import jax

            self.base = jax.devices()[0].memory_stats()['bytes_in_use']
        else:
            try:
                Path('/proc/self/clear_refs').write_text('5')
                self.base = _rss_kib('VmRSS') * 1024
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gpu and self.framework == 'torch':
            import torch

            peak = torch.cuda.max_memory_allocated()
        elif self.gpu:
            import jax

            peak = jax.devices()[0].memory_stats()['peak_bytes_in_use']  # lifetime peak: an upper bound
        elif self.base is not None:
            peak = _rss_kib('VmHWM') * 1024
        else:
            return
        self.mib = max(peak - self.base, 0) / 2**20


def _rss_kib(field_name: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field_name + ':'):
            return int(line.split()[1])
    raise OSError(f'{field_name} not in /proc/self/status')


def build_models(model_name: str, dtype: str, torch_device: str) -> tuple[Any, Any]:
    """timm's model (its own random init, seeded, in eval mode on `torch_device`) and nfnet_jax's, converted
    from it and computing in bfloat16 when `dtype` is 'bfloat16'."""
    import jax.numpy as jnp
    import timm
    import torch

    import nfnet_jax
    from nfnet_jax.weights import convert_state_dict

    torch.manual_seed(0)
    timm_model = timm.create_model(model_name, pretrained=False).eval().to(torch_device)
    params = convert_state_dict(timm_model.state_dict(), model_name)
    jax_model = nfnet_jax.create_model(model_name, params=params, dtype=jnp.bfloat16 if dtype == 'bfloat16' else None)
    return timm_model, jax_model


def flops_per_image(jax_model: Any, size: int) -> float:
    """The forward's FLOPs for one image of `size` x `size`, from XLA's cost analysis of the unoptimised program
    with XLA's own convolutions (`xla_convolutions`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(jax_model)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    with xla_convolutions():
        lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, image)
    return lowered.cost_analysis()['flops']


@contextlib.contextmanager
def xla_convolutions() -> Iterator[None]:
    """Programs lowered inside take XLA's own convolutions; the CPU backend is as it was after.

    For FLOP counts: XLA's cost analysis counts no work in the backend's oneDNN calls, while the
    backend's other rewrites do the same arithmetic as XLA's convolutions. One count then serves
    every configuration, whichever kernels run them.
    """
    from nfnet_jax import cpu
    from nfnet_jax.cpu import convolution

    kernels = convolution.kernels() if cpu.enabled() else None
    cpu.disable()
    try:
        yield
    finally:
        if kernels is not None:
            cpu.enable(onednn=kernels.onednn)


# Whose matmuls are timed for the ceiling (`matmul_ceiling`): torch's, XLA's, and torch's convolution library's (oneDNN
# on CPUs, cuDNN on GPUs) as a 1x1 convolution, the kernels the model's convolutions run in.
CEILING_FRAMEWORKS = ('torch', 'XLA', 'torch 1x1 convolution')


@dataclass(frozen=True)
class Ceiling:
    """The machine's practical ceiling: the speed of `framework`'s square `side` x `side` matmul in `dtype`."""

    gflops: float
    side: int
    dtype: str
    framework: str = 'torch'

    @property
    def matmul(self) -> str:
        return f'{self.framework} {self.side}x{self.side} {self.dtype}'

    def call(self, gpu: bool) -> Callable[[], None]:
        """This matmul on two random matrices, returning when it is done: to time it again beside a model."""
        return _matmul_builder(self.framework, self.dtype, gpu)(self.side)

    def retimed(self, seconds: list[float]) -> Ceiling:
        """This matmul with the speed of its median call of `seconds`."""
        return Ceiling(2 * self.side**3 / statistics.median(seconds) / 1e9, self.side, self.dtype, self.framework)


def matmul_ceiling(dtype: str, gpu: bool, repeats: int = 7, budget_s: float = CEILING_BUDGET_S) -> Ceiling:
    """The ceiling for computing in `dtype`: the fastest of torch's and XLA's matmuls and torch's matmul as a 1x1
    convolution (CEILING_FRAMEWORKS) in `dtype`, or in float32 where that is faster, each at its default precision.

    No one library's matmul is a ceiling for the others' convolutions: on AMD CPUs torch's BLAS (MKL)
    takes a slow path for float32, which the model's convolutions in XLA or oneDNN outrun, oneDNN's
    convolutions outrun XLA's matmul there, and on NVIDIA GPUs torch's float32 matmul leaves out
    TF32, which XLA's default precision and cuDNN's convolutions use. Any
    bfloat16 computation can run in float32, so on a CPU without fast bfloat16 matmuls float32's
    speed is the limit.
    """
    timings = (
        _timed_matmul(framework, d, gpu, repeats, budget_s)
        for d in dict.fromkeys((dtype, 'float32'))
        for framework in CEILING_FRAMEWORKS
    )
    return max(timings, key=lambda ceiling: ceiling.gflops)


def _timed_matmul(framework: str, dtype: str, gpu: bool, repeats: int, budget_s: float) -> Ceiling:
    """The best of `repeats` timed calls of `framework`'s ('torch' or 'XLA', jitted) square matmul in `dtype`.

    The side doubles from 512 up to CEILING_MATMUL while `repeats` calls of the next side (8x the
    work) fit in `budget_s`: where a framework has no fast kernel for `dtype`, one of the largest
    would take too long.
    """
    multiply = _matmul_builder(framework, dtype, gpu)

    def timed(call: Callable[[], None]) -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    side = 512
    while True:
        call = multiply(side)
        warm = min(timed(call), timed(call))  # the first call also compiles, starts threads or GPU kernels
        if side >= CEILING_MATMUL or 8 * warm * repeats > budget_s:
            break
        side *= 2
    best = min(timed(call) for _ in range(repeats))
    return Ceiling(2 * side**3 / best / 1e9, side, dtype, framework)


def _matmul_builder(framework: str, dtype: str, gpu: bool) -> Callable[[int], Callable[[], None]]:
    """For a side, a call of `framework`'s square matmul in `dtype` (one of CEILING_FRAMEWORKS)."""
    if framework == 'XLA':
        return _xla_matmul(dtype)
    return _torch_matmul(dtype, gpu, as_convolution=framework != 'torch')


def _torch_matmul(dtype: str, gpu: bool, as_convolution: bool = False) -> Callable[[int], Callable[[], None]]:
    """For a side, a call of torch's matmul of two random square matrices in `dtype` that returns when it is done;
    `as_convolution`: the same product as a 1x1 convolution (channels_last) of a side x 1 image with side channels."""
    import torch

    device = 'cuda' if gpu else 'cpu'

    def build(side: int) -> Callable[[], None]:
        a, b = (torch.randn(side, side, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
        if as_convolution:
            a = a.reshape(1, side, side, 1).contiguous(memory_format=torch.channels_last)
            b = b.reshape(side, side, 1, 1).contiguous(memory_format=torch.channels_last)

        def call() -> None:
            with torch.no_grad():
                torch.nn.functional.conv2d(a, b) if as_convolution else torch.matmul(a, b)
            if gpu:
                torch.cuda.synchronize()

        return call

    return build


def _xla_matmul(dtype: str) -> Callable[[int], Callable[[], None]]:
    """As `_torch_matmul`, with `jax.jit(jnp.matmul)` on JAX's default device."""
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(jnp.matmul)

    def build(side: int) -> Callable[[], None]:
        rng = np.random.default_rng(side)
        a, b = (jnp.asarray(rng.standard_normal((side, side), np.float32), dtype) for _ in range(2))
        return lambda: matmul(a, b).block_until_ready()

    return build


@dataclass(frozen=True)
class JaxCall:
    """nfnet_jax's configuration: its classifier on the images already on the device, returning float32 logits."""

    classify: Any  # nfnet_jax.inference.InferenceFn
    images: Any  # jax.Array

    def __call__(self) -> np.ndarray:
        return np.asarray(self.classify(self.images).astype(np.float32))

    def program_text(self) -> str:
        """The optimised program a call runs (XLA's HLO text): compiled once, by the first call or here."""
        return self.classify.compiled.lower(self.classify.state, self.images).compile().as_text()


def build_runners(
    batch: int, size: int, dtype: str, gpu: bool, timm_model: Any, jax_model: Any, compile_timm: bool
) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per configuration, each on the same images, returning its logits."""
    import jax
    import torch

    from nfnet_jax import inference

    images = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    device = torch.device('cuda' if gpu else 'cpu')
    amp_dtype = torch.bfloat16 if dtype == 'bfloat16' else None

    def torch_call(module: Any, memory_format: torch.memory_format) -> Callable[[], Any]:
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device).contiguous(memory_format=memory_format)

        def call() -> Any:
            with torch.inference_mode(), torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
                out = module(x)
            if gpu:
                torch.cuda.synchronize()
            return out.float().cpu().numpy()

        return call

    channels_last = copy.deepcopy(timm_model).to(memory_format=torch.channels_last)
    torch._dynamo.reset()  # a fresh compile per shape: the sweep would otherwise hit dynamo's recompile limit
    runners = {
        JAX_CONFIG: JaxCall(inference.classifier(jax_model), jax.device_put(images)),
        TIMM_CONFIGS[0]: torch_call(timm_model, torch.contiguous_format),
        TIMM_CONFIGS[1]: torch_call(channels_last, torch.channels_last),
    }
    if compile_timm:
        runners[TIMM_CONFIGS[2]] = torch_call(torch.compile(channels_last), torch.channels_last)
    return runners


def measure(
    runners: dict[str, Callable[[], Any]],
    batch: int,
    size: int,
    flops: float,
    repeats: int,
    gpu: bool,
    progress: tqdm,
    ceiling: Ceiling,
) -> tuple[dict[str, Result], dict[str, np.ndarray], Ceiling]:
    """First call and peak memory per configuration, then `repeats` round-robin timed calls each, and each round
    the `ceiling`'s matmul too: the ceiling returned is its median, under the same load as the configurations'.

    The first call's peak includes compilation. The warm call's peak counts only memory newly
    taken from the system: buffers an allocator kept from the first call do not show in it.
    """
    results, logits = {}, {}
    ceiling_call, ceiling_s = ceiling.call(gpu), []
    ceiling_call()  # its first call (compiling, for XLA's) is no measure of it
    for name, call in runners.items():
        progress.set_postfix_str(f'{name}: first call, batch {batch}, {size}px')
        framework = 'jax' if name == JAX_CONFIG else 'torch'
        with PeakMemory(framework, gpu) as first_memory:
            start = time.perf_counter()
            call()
            first = time.perf_counter() - start
        with PeakMemory(framework, gpu) as warm_memory:
            logits[name] = call()
        results[name] = Result(name, batch, size, first, first_memory.mib, warm_memory.mib, flops)
        progress.update()
    for repeat in range(repeats):
        for name, call in runners.items():
            progress.set_postfix_str(f'{name}: run {repeat + 1}/{repeats}, batch {batch}, {size}px')
            start = time.perf_counter()
            call()
            results[name].run_s.append(time.perf_counter() - start)
            progress.update()
        start = time.perf_counter()
        ceiling_call()
        ceiling_s.append(time.perf_counter() - start)
    return results, logits, ceiling.retimed(ceiling_s)


def ratios(results: dict[str, Result]) -> dict[str, float]:
    """nfnet_jax images/s over each timm configuration's, and over the best of them."""
    ours = results[JAX_CONFIG].images_per_s
    timm_names = [name for name in results if name != JAX_CONFIG]
    out = {f'vs {name}': ours / results[name].images_per_s for name in timm_names}
    out['vs best timm'] = ours / max(results[name].images_per_s for name in timm_names)
    return out


def shape_record(results: dict[str, Result], logits: dict[str, np.ndarray]) -> dict[str, Any]:
    """One measured shape as the JSON reports keep it: every configuration's figures (GFLOP/s included), the
    speed ratios, and nfnet_jax's logits against timm eager's."""
    from nfnet_jax.numerics import relative_error

    first = next(iter(results.values()))
    return dict(
        batch=first.batch,
        size=first.size,
        results={
            name: asdict(r) | dict(images_per_s=r.images_per_s, best_images_per_s=r.best_images_per_s, gflops=r.gflops)
            for name, r in results.items()
        },
        ratios=ratios(results),
        logits_rel_error_vs_timm=relative_error(logits[JAX_CONFIG], logits[TIMM_CONFIGS[0]]),
    )


def table(results: dict[str, Result], ceiling_gflops: float) -> str:
    ours = results[JAX_CONFIG].images_per_s
    header = (
        'configuration',
        'batch',
        'size',
        'images/s (median)',
        'images/s (best)',
        'ms/batch (median)',
        'GFLOP/s (% of ceiling)',
        'first call s',
        'peak MiB first / warm call',
        'nfnet_jax / this',
    )
    rows = [
        (
            r.name,
            r.batch,
            r.size,
            r.images_per_s,
            r.best_images_per_s,
            f'{1e3 * statistics.median(r.run_s):.1f}',
            f'{r.gflops:.0f} ({100 * r.gflops / ceiling_gflops:.0f}%)',
            f'{r.first_call_s:.1f}',
            f'{markdown.fmt(r.first_call_peak_mib, ".0f")} / {markdown.fmt(r.warm_call_peak_mib, ".0f")}',
            f'{ours / r.images_per_s:.2f}x',
        )
        for r in results.values()
    ]
    return '\n'.join(markdown.table(header, rows))


def cpu_convolutions() -> str | None:
    """Which kernels run nfnet_jax's convolutions on CPU, for the reports; None where JAX runs on another backend."""
    import jax

    from nfnet_jax import cpu
    from nfnet_jax.cpu import convolution, onednn

    if jax.default_backend() != 'cpu':
        return None
    if not cpu.enabled():
        return 'XLA (CPU backend off)'
    return f'{onednn.cpu_convolutions() if convolution.kernels().onednn else "XLA"} (CPU backend)'


def cpu_memory_kept() -> bool:
    """Whether `nfnet_jax.cpu.memory.keep_cpu_memory` holds in this process (seen by its dispatch setting)."""
    import jax

    return not jax.config.read('jax_cpu_enable_async_dispatch')


def environment(dtype: str, gpu: bool) -> dict[str, Any]:
    """What a report says of where it ran: the device, nfnet_jax's CPU settings, the dtype and the versions."""
    import jax
    import timm
    import torch

    return dict(
        device=torch.cuda.get_device_name() if gpu else cpu_model(),
        jax_backend=jax.default_backend(),
        cpu_convolutions=cpu_convolutions(),
        keep_cpu_memory=cpu_memory_kept(),
        dtype=dtype,
        torch_threads=torch.get_num_threads(),
        versions=dict(
            jax=jax.__version__, torch=torch.__version__, timm=timm.__version__, python=sys.version.split()[0]
        ),
    )


def describe(report: dict[str, Any]) -> str:
    """The device, and on CPU which kernels ran nfnet_jax's convolutions and whether CPU memory was kept."""
    kernels = report['cpu_convolutions']
    memory = ', keep_cpu_memory' if report['keep_cpu_memory'] else ''
    return report['device'] + (f', nfnet_jax convolutions in {kernels}' if kernels else '') + memory


def plot(runs: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Images/s against batch size, one panel per image size, one line per configuration."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    sizes = sorted({run['size'] for run in runs})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for name in runs[0]['results']:
            points = sorted((run['batch'], run['results'][name]['images_per_s']) for run in runs if run['size'] == size)
            ax.plot(*zip(*points, strict=True), marker='o', label=name)
        ax.set(title=f'{size}x{size}', xlabel='batch size', ylabel='images/s', xscale='log')
        ax.set_xticks(SWEEP_BATCHES, [str(b) for b in SWEEP_BATCHES])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from nfnet_jax.cli import add_cpu_arguments

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m benchmarks.vs_timm')
    add_workload_arguments(parser, size=256, size_help='image height and width')
    parser.add_argument(
        '--dtype',
        choices=('float32', 'bfloat16'),
        help='compute dtype: timm under autocast, nfnet_jax with dtype= (default float32 on CPU, bfloat16 on GPU)',
    )
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per configuration (median reported)')
    parser.add_argument('--sweep', action='store_true', help=f'batches {SWEEP_BATCHES} x sizes {SWEEP_SIZES}')
    parser.add_argument('--plot', type=Path, default=Path('vs_timm_sweep.png'), help='PNG written by --sweep')
    parser.add_argument('--json', type=Path, help='write every measurement here as JSON')
    parser.add_argument(
        '--skip-compile', action='store_true', help='leave out torch.compile (minutes per shape on CPU)'
    )
    parser.add_argument('--force', action='store_true', help='replace existing --json / --plot files')
    # Off by default: the peak memory columns count what the system newly gives the process, which it hides.
    add_cpu_arguments(parser, on_by_default=False)  # for the whole process: timm runs with it too
    args = parser.parse_args(argv)
    check_arguments(parser, args, outputs=(args.json, args.plot if args.sweep else None))
    return args


def add_workload_arguments(parser: argparse.ArgumentParser, size: int, size_help: str) -> None:
    """`--model`, `--batch` and `--size` (default `size`), the workload that `check_arguments` checks."""
    parser.add_argument('--model', default='dm_nfnet_f0', help='architecture name (default dm_nfnet_f0)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=size, help=size_help)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, outputs: Sequence[Path | None]) -> None:
    """`--model`, `--batch`, `--size` and `--repeats` (where the command has it), and the files to be written
    (None: not asked for), checked now, not after minutes of work; `parser.error` (exit 2) says what is wrong."""
    from nfnet_jax import list_models
    from nfnet_jax.files import check_report_file

    if args.model not in list_models():
        parser.error(f'unknown model {args.model!r}; nfnet_jax.list_models() lists the architectures')
    if args.batch < 1 or args.size < 32 or getattr(args, 'repeats', 1) < 1:
        parser.error('--batch and --repeats must be at least 1 and --size at least 32')
    for path in outputs:
        if path is not None:
            try:
                check_report_file(path, args.force)
            except OSError as err:
                parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from nfnet_jax.cli import apply_cpu_arguments
    from nfnet_jax.progress import progress

    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # the backend; its memory settings only if asked
    import torch

    from nfnet_jax.files import atomic_write

    gpu = torch.cuda.is_available()
    dtype = args.dtype or ('bfloat16' if gpu else 'float32')
    shapes = [(b, s) for s in SWEEP_SIZES for b in SWEEP_BATCHES] if args.sweep else [(args.batch, args.size)]

    print(f'building {args.model} in timm and converting it to nfnet_jax ...', file=sys.stderr)
    timm_model, jax_model = build_models(args.model, dtype, 'cuda' if gpu else 'cpu')

    flops = {size: flops_per_image(jax_model, size) for size in {size for _, size in shapes}}
    ceiling = matmul_ceiling(dtype, gpu)
    print(
        f'ceiling: the {ceiling.matmul} matmul runs at {ceiling.gflops:.0f} GFLOP/s',
        file=sys.stderr,
    )
    report: dict[str, Any] = dict(
        model=args.model,
        repeats=args.repeats,
        **environment(dtype, gpu),
        matmul_ceiling_gflops=ceiling.gflops,
        matmul_ceiling_matmul=ceiling.matmul,
        runs=[],
    )
    calls_per_shape = len(TIMM_CONFIGS) + 1 - args.skip_compile
    with progress(total=len(shapes) * calls_per_shape * (args.repeats + 1), desc='benchmark', unit='call') as bar:
        for batch, size in shapes:
            runners = build_runners(batch, size, dtype, gpu, timm_model, jax_model, not args.skip_compile)
            results, logits, ceiling_now = measure(runners, batch, size, flops[size], args.repeats, gpu, bar, ceiling)
            run = shape_record(results, logits) | dict(ceiling_gflops=ceiling_now.gflops)
            report['runs'].append(run)
            bar.write(f'\n{args.model}, {dtype}, batch {batch}, {size}x{size}, {describe(report)}')
            bar.write(f'ceiling: the {ceiling.matmul} matmul at {ceiling_now.gflops:.0f} GFLOP/s in these rounds')
            bar.write(table(results, ceiling_now.gflops))
            bar.write(
                ', '.join(f'{k}: {v:.2f}x' for k, v in run['ratios'].items())
                + f'; logits relative error vs timm {run["logits_rel_error_vs_timm"]:.1e}'
            )
    if args.sweep:
        title = f'{args.model}, {dtype}, {describe(report)}'
        atomic_write(args.plot, lambda tmp: plot(report['runs'], tmp, title), force=args.force)
        report['plot'] = str(args.plot)
        print(f'plot written to {args.plot}', file=sys.stderr)
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)), force=args.force)
        print(f'measurements written to {args.json}', file=sys.stderr)
    return report


if __name__ == '__main__':
    main()
