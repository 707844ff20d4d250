"""Each convolution of an NFNet's training step timed on its own: nfnet_jax's against torch's, in one process.

    python -m benchmarks.conv_ops [--model dm_nfnet_f0] [--batch 8] [--size 160] [--dtype float32|bfloat16]
                                  [--repeats 7] [--json F] [--markdown F] [--no-keep-cpu-memory]

`benchmarks.train_step` says how far apart the whole steps are; this says which convolutions make
the difference. The convolutions are the model's own: its forward is traced once to a jaxpr and
each distinct `lax.conv_general_dilated` in it (input shape, kernel, groups, stride, padding) runs
three passes on both sides: the forward, the input gradient and the kernel gradient. nfnet_jax
runs that call as the model makes it, jitted with the training step's compiler options
(`nfnet_jax.cpu.compiler_options(training=True)`), on CPU with the CPU backend on as
`benchmarks.train_step` runs it (when the benchmark is the process): its lowering rewrites each
pass (per group, 1x1 as matmuls, oneDNN's kernels where installed). torch runs `conv2d` and its two
gradients (`torch.nn.grad`) in channels_last, padded like timm (a symmetric pad inside the conv,
TensorFlow's asymmetric SAME pad with `F.pad` first). Both sides get the same random tensors, in
float32 or bfloat16 (`--dtype`: every tensor in it, as under autocast), and their results are
compared. Each timed call follows an untimed call of the same pass on the same
side, so the other framework's idle threads do not slow the first call. Times are medians of
`--repeats`; the totals weight each convolution by how often one step runs it.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import markdown
from benchmarks.vs_timm import add_workload_arguments, check_arguments, describe, environment

PASSES = ('forward', 'input grad', 'kernel grad')
SIDES = ('nfnet_jax', 'torch')

Padding = tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Conv:
    """One convolution of the model: an NHWC input, an HWIO kernel and the geometry of `lax.conv_general_dilated`."""

    input_shape: tuple[int, int, int, int]
    kernel_shape: tuple[int, int, int, int]
    groups: int
    strides: tuple[int, int]
    padding: Padding  # (low, high) pixels per spatial dimension, SAME already resolved
    dilation: tuple[int, int]

    @classmethod
    def of(cls, equation: Any) -> Conv:
        """The convolution a jaxpr's `conv_general_dilated` equation computes; ValueError for one that is not the
        model's kind (NHWC x HWIO, no input dilation, no batch groups)."""
        import jax

        params = equation.params
        specs = jax.lax.conv_dimension_numbers(
            equation.invars[0].aval.shape, equation.invars[1].aval.shape, ('NHWC', 'HWIO', 'NHWC')
        )
        if (
            params['dimension_numbers'] != specs
            or set(params['lhs_dilation']) != {1}
            or params['batch_group_count'] != 1
        ):
            raise ValueError(f'not an NHWC x HWIO convolution as the model makes them: {params}')
        return cls(
            tuple(equation.invars[0].aval.shape),
            tuple(equation.invars[1].aval.shape),
            params['feature_group_count'],
            tuple(params['window_strides']),
            tuple(tuple(pair) for pair in params['padding']),
            tuple(params['rhs_dilation']),
        )

    @property
    def label(self) -> str:
        """E.g. '3x3/2 g6 -> 128': kernel size, stride (when not 1), groups (when more than 1), output channels."""
        kh, kw = self.kernel_shape[:2]
        stride = '' if self.strides == (1, 1) else f'/{self.strides[0]}'
        groups = '' if self.groups == 1 else f' g{self.groups}'
        return f'{kh}x{kw}{stride}{groups} -> {self.kernel_shape[3]}'

    def __call__(self, x: Any, kernel: Any) -> Any:
        """This convolution of `x` by `kernel`, as the model calls it (`nfnet_jax.models.layers.ScaledStdConv2d`)."""
        import jax

        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=self.padding,
            rhs_dilation=self.dilation,
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=self.groups,
        )

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        """Its output's shape (no compilation: its abstract evaluation)."""
        import jax
        import jax.numpy as jnp

        x, kernel = (jax.ShapeDtypeStruct(shape, jnp.float32) for shape in (self.input_shape, self.kernel_shape))
        return jax.eval_shape(self, x, kernel).shape

    @property
    def flops(self) -> float:
        """FLOPs of one pass (each of the three does the same multiply-adds)."""
        n, ho, wo, cout = self.output_shape
        kh, kw, cin_per_group, _ = self.kernel_shape
        return 2.0 * n * ho * wo * cout * kh * kw * cin_per_group


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of a jaxpr, those of the jaxprs inside its equations (jit, remat, control flow) included."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for inner in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(inner, ClosedJaxpr):
                    yield from equations(inner.jaxpr)
                elif isinstance(inner, Jaxpr):
                    yield from equations(inner)


def model_convs(model: Any, batch: int, size: int) -> dict[Conv, int]:
    """Every distinct convolution of `model`'s forward on a batch of `size` x `size` images, with how often it runs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    traced = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)
    convolutions = (e for e in equations(traced.jaxpr) if e.primitive is jax.lax.conv_general_dilated_p)
    return dict(collections.Counter(Conv.of(equation) for equation in convolutions))


def jax_passes(conv: Conv, x: np.ndarray, kernel: np.ndarray, grad: np.ndarray) -> dict[str, Callable[[], Any]]:
    """The three passes of `conv` in nfnet_jax, compiled as a training step is, in the arrays' dtype; each call
    returns its result."""
    import jax

    from nfnet_jax import cpu

    programs = {
        'forward': lambda x, k, g: conv(x, k),
        'input grad': lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0],
        'kernel grad': lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0],
    }
    args = [jax.device_put(a) for a in (x, kernel, grad)]
    options = cpu.compiler_options(training=True)
    runners = {}
    for name, program in programs.items():
        compiled = jax.jit(program, compiler_options=options).lower(*args).compile()
        runners[name] = lambda compiled=compiled: jax.block_until_ready(compiled(*args))
    return runners


def torch_passes(
    conv: Conv, x: np.ndarray, kernel: np.ndarray, grad: np.ndarray, device: str
) -> dict[str, Callable[[], Any]]:
    """The three passes of `conv` in torch, channels_last, padded as timm pads, in the arrays' dtype (float32 or
    bfloat16); each call returns its result."""
    import torch
    import torch.nn.functional as F
    from torch.nn.grad import conv2d_input, conv2d_weight

    dtype = getattr(torch, str(x.dtype))  # numpy has no bfloat16 of its own: through float32, which holds it exactly

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32)).to(device, dtype)

    def nchw(a: np.ndarray) -> torch.Tensor:
        return tensor(a).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    tx, tgrad = nchw(x), nchw(grad)
    tkernel = tensor(kernel).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    (top, bottom), (left, right) = conv.padding
    symmetric = top == bottom and left == right
    kwargs = dict(
        stride=conv.strides, dilation=conv.dilation, groups=conv.groups, padding=(top, left) if symmetric else 0
    )

    def pad(t: torch.Tensor) -> torch.Tensor:
        return t if symmetric else F.pad(t, (left, right, top, bottom))

    padded = pad(tx)
    synchronize = torch.cuda.synchronize if device == 'cuda' else lambda: None

    def synchronized(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            out = fn()
            synchronize()
            return out

        return call

    return {
        'forward': synchronized(lambda: F.conv2d(pad(tx), tkernel, **kwargs)),
        'input grad': synchronized(lambda: conv2d_input(padded.shape, tkernel, tgrad, **kwargs)),
        'kernel grad': synchronized(lambda: conv2d_weight(padded, tkernel.shape, tgrad, **kwargs)),
    }


def torch_as_jax_layout(conv: Conv, name: str, out: Any) -> np.ndarray:
    """A torch pass's result in nfnet_jax's layout (NHWC, HWIO), the input gradient cropped to the unpadded input."""
    out = out.detach().float().cpu().numpy()
    if name == 'kernel grad':
        return out.transpose(2, 3, 1, 0)
    out = out.transpose(0, 2, 3, 1)
    if name == 'input grad' and out.shape != conv.input_shape:  # the gradient of timm's F.pad is this crop
        (top, _), (left, _) = conv.padding
        _, h, w, _ = conv.input_shape
        out = out[:, top : top + h, left : left + w]
    return out


def measure(conv: Conv, repeats: int, device: str, bar: Any, dtype: str = 'float32') -> dict[str, Any]:
    """Both sides' seconds per pass (`repeats` timed calls each), the relative difference of their results, and the
    dtype each side's results came out in."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = rng.standard_normal(conv.input_shape, dtype=np.float32)
    kernel = rng.standard_normal(conv.kernel_shape, dtype=np.float32) / np.float32(
        np.sqrt(np.prod(conv.kernel_shape[:3]))
    )
    grad = rng.standard_normal(conv.output_shape, dtype=np.float32)
    x, kernel, grad = (a.astype(jnp.dtype(dtype)) for a in (x, kernel, grad))
    runners = {'nfnet_jax': jax_passes(conv, x, kernel, grad), 'torch': torch_passes(conv, x, kernel, grad, device)}
    rel_error, result_dtypes = {}, set()
    for name in PASSES:
        mine, theirs = runners['nfnet_jax'][name](), runners['torch'][name]()
        result_dtypes.add((str(mine.dtype), str(theirs.dtype).removeprefix('torch.')))
        mine, theirs = np.asarray(mine, dtype=np.float32), torch_as_jax_layout(conv, name, theirs)
        rel_error[name] = float(np.max(np.abs(mine - theirs)) / np.max(np.abs(theirs)))
    seconds: dict[str, dict[str, list[float]]] = {side: {name: [] for name in PASSES} for side in SIDES}
    for _ in range(repeats):
        for name in PASSES:
            for side in SIDES:
                runners[side][name]()  # untimed: wakes this side's threads
                start = time.perf_counter()
                runners[side][name]()
                seconds[side][name].append(time.perf_counter() - start)
            bar.update(1)
    (dtypes,) = result_dtypes  # every pass in one dtype per side
    return dict(seconds=seconds, rel_error=rel_error, result_dtypes=dict(zip(SIDES, dtypes, strict=True)))


def median_ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def summary(ms: dict[str, dict[str, float]], flops_per_pass: float) -> list[str]:
    """Cells for each pass's ms, GFLOP/s over the three passes and the speed ratio, as nfnet_jax / torch."""
    spent = {side: sum(ms[side].values()) for side in SIDES}
    cells = [f'{ms["nfnet_jax"][name]:.2f} / {ms["torch"][name]:.2f}' for name in PASSES]
    cells.append(' / '.join(f'{len(PASSES) * flops_per_pass / spent[side] / 1e6:.0f}' for side in SIDES))
    return [*cells, f'{spent["torch"] / spent["nfnet_jax"]:.2f}x']


def table(rows: list[dict[str, Any]]) -> str:
    """One line per convolution and one for the whole step, each pass's median ms as nfnet_jax / torch."""
    columns = ['convolution', 'input (NHWC)', 'per step', *(f'{name} ms' for name in PASSES)]
    columns += ['GFLOP/s nfnet_jax / torch', 'torch time / nfnet_jax time']
    lines = []
    totals = {side: {name: 0.0 for name in PASSES} for side in SIDES}  # ms per step
    total_flops = 0.0
    for row in rows:
        ms = {side: {name: median_ms(row['seconds'][side][name]) for name in PASSES} for side in SIDES}
        for side, name in itertools.product(SIDES, PASSES):
            totals[side][name] += row['count'] * ms[side][name]
        total_flops += row['count'] * len(PASSES) * row['flops']
        lines.append([row['label'], 'x'.join(map(str, row['input_shape'])), row['count'], *summary(ms, row['flops'])])
    lines.append(['all, per step', '', sum(row['count'] for row in rows), *summary(totals, total_flops / len(PASSES))])
    return '\n'.join(markdown.table(columns, lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from nfnet_jax.cli import add_cpu_arguments

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m benchmarks.conv_ops')
    add_workload_arguments(parser, size=160, size_help='image height and width (default 160, as train_step)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='every tensor in this')
    parser.add_argument('--repeats', type=int, default=7, help='timed calls per pass and side (median reported)')
    parser.add_argument('--json', type=Path, help='write every measurement here as JSON')
    parser.add_argument('--markdown', type=Path, help='write the table here')
    parser.add_argument('--force', action='store_true', help='replace existing --json / --markdown files')
    add_cpu_arguments(parser)  # as train_step's, whose convolutions these are
    args = parser.parse_args(argv)
    check_arguments(parser, args, outputs=(args.json, args.markdown))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from nfnet_jax.cli import apply_cpu_arguments
    from nfnet_jax.progress import progress

    apply_cpu_arguments(args, is_process=__name__ == '__main__')
    import jax
    import torch

    import nfnet_jax
    from nfnet_jax.files import atomic_write

    gpu = torch.cuda.is_available() and jax.default_backend() == 'gpu'
    convs = model_convs(nfnet_jax.create_model(args.model), args.batch, args.size)
    report: dict[str, Any] = dict(
        model=args.model,
        batch=args.batch,
        size=args.size,
        repeats=args.repeats,
        **environment(args.dtype, gpu),
        convs=[],
    )
    print(f'{args.model}: {sum(convs.values())} convolutions per forward, {len(convs)} distinct', file=sys.stderr)
    with progress(total=len(convs) * len(PASSES) * args.repeats, desc='convolutions', unit='pass') as bar:
        for conv, count in convs.items():
            measured = measure(conv, args.repeats, 'cuda' if gpu else 'cpu', bar, args.dtype)
            report['convs'].append(dict(asdict(conv), label=conv.label, count=count, flops=conv.flops, **measured))
    worst = max(error for row in report['convs'] for error in row['rel_error'].values())
    text = f'{args.model}, batch {args.batch}, {args.size}x{args.size}, {describe(report)}, {args.dtype}\n\n'
    text += table(report['convs']) + f'\n\nResults of both sides agree within {worst:.1e} (relative).\n'
    print(text)
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text), force=args.force)
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)), force=args.force)
    return report


if __name__ == '__main__':
    main()
