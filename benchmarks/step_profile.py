"""Where nfnet_jax's jitted training step spends its time, per XLA instruction, from a `jax.profiler` trace.

    python -m benchmarks.step_profile [--model dm_nfnet_f0] [--batch 8] [--size 160] [--dtype float32|bfloat16]
                                      [--steps 3] [--top 25] [--markdown F] [--force] [--no-keep-cpu-memory]

The step is the library's (`nfnet_jax.train.step.train_steps`), run as `benchmarks.train_step`
runs it: on CPU with the CPU backend and its memory settings on when the benchmark is the
process. It is compiled ahead of time, so the trace's thunk names are the instructions of that
compiled program: each is shown with its shape and the JAX operation it came from. Two tables:
the time per kind of instruction (fusion kinds, convolutions, oneDNN's calls, matmuls), and the
slowest instructions: this is how slow paths of XLA:CPU are found. Read the times as a guide to
outliers, then time the suspect alone: on XLA:CPU a thunk's time includes its waits for the shared
thread pool, and some kernels run asynchronously on their own threads, so they look shorter than
they are (`benchmarks.conv_ops` times each convolution). The model has nfnet_jax's random init; no
timm side runs.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import markdown
from benchmarks.vs_timm import add_workload_arguments, check_arguments, cpu_convolutions, cpu_memory_kept

# An instruction of the compiled module: `%name = shape opcode(operands), ..., metadata={op_name="..."}`.
INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) [\w-]+\((.*)$', re.M)
JAX_OP = re.compile(r'op_name="([^"]*)"')


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """(shape, JAX operation) of every instruction of an HLO module's text, by name."""
    found = {}
    for name, shape, rest in INSTRUCTION.findall(hlo_text):
        op = JAX_OP.search(rest)
        found[name] = (shape.split('{')[0], op.group(1) if op else '')
    return found


def thunk_seconds(trace_dir: Path, names: dict[str, Any]) -> collections.Counter[str]:
    """Seconds spent in each named instruction, summed over the trace's events (all threads)."""
    seconds: collections.Counter[str] = collections.Counter()
    for path in trace_dir.rglob('*.trace.json.gz'):
        with gzip.open(path) as file:
            for event in json.load(file)['traceEvents']:
                if event.get('ph') == 'X' and event.get('name') in names:
                    seconds[event['name']] += event['dur'] / 1e6
    return seconds


def kind(name: str) -> str:
    """An instruction's kind: its name without XLA's numeric suffix (`ynn_fusion.552` -> `ynn_fusion`)."""
    return re.sub(r'\.\d+$', '', name)


def tables(seconds: collections.Counter[str], found: dict[str, tuple[str, str]], steps: int, top: int) -> str:
    """The `top` kinds of instruction by time, then the `top` slowest instructions, in ms per step and share."""
    total = sum(seconds.values())
    kinds: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for name, spent in seconds.items():
        kinds[kind(name)] += spent
        counts[kind(name)] += 1
    by_kind = [
        [name, counts[name], 1e3 * spent / steps, f'{100 * spent / total:.1f}%']
        for name, spent in kinds.most_common(top)
    ]
    slowest = []
    for name, spent in seconds.most_common(top):
        shape, jax_op = found[name]
        slowest.append([name, shape, jax_op[-80:], 1e3 * spent / steps, f'{100 * spent / total:.1f}%'])
    lines = markdown.table(['kind', 'instructions', 'ms per step', 'share'], by_kind)
    lines += ['', *markdown.table(['instruction', 'shape', 'JAX operation', 'ms per step', 'share'], slowest)]
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from nfnet_jax.cli import add_cpu_arguments

    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m benchmarks.step_profile')
    add_workload_arguments(parser, size=160, size_help='image height and width (default 160, as train_step)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='compute dtype')
    parser.add_argument('--steps', type=int, default=3, help='traced steps, after two untraced ones')
    parser.add_argument('--top', type=int, default=25, help='kinds and instructions listed')
    parser.add_argument('--markdown', type=Path, help='write the tables here')
    parser.add_argument('--force', action='store_true', help='replace an existing --markdown file')
    add_cpu_arguments(parser)  # as train_step's, whose step this profiles
    args = parser.parse_args(argv)
    check_arguments(parser, args, outputs=(args.markdown,))
    if args.steps < 1 or args.top < 1:
        parser.error('--steps and --top must be at least 1')
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    from nfnet_jax.cli import apply_cpu_arguments
    from nfnet_jax.progress import progress

    apply_cpu_arguments(args, is_process=__name__ == '__main__')
    import jax
    import jax.numpy as jnp
    import numpy as np

    import nfnet_jax
    from nfnet_jax import cpu
    from nfnet_jax.files import atomic_write
    from nfnet_jax.train import TrainState, nfnet_optimizer
    from nfnet_jax.train.step import train_steps

    model = nfnet_jax.create_model(args.model, dtype=jnp.dtype(args.dtype))
    kept, step = train_steps(cpu.enabled(), 0.1)(TrainState(model, nfnet_optimizer(0.1)))  # the library's step
    arrays = kept.arrays()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3), np.float32))
    labels = jnp.asarray(rng.integers(0, model.num_classes, args.batch))
    print(f'compiling the {args.model} step', file=sys.stderr)
    compiled = step.lower(arrays, images, labels).compile()  # it donates the arrays
    found = instructions(compiled.as_text())
    for _ in range(2):
        arrays = jax.block_until_ready(compiled(arrays, images, labels))[0]
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in progress(range(args.steps), desc='traced steps'):
                arrays = jax.block_until_ready(compiled(arrays, images, labels))[0]
        seconds = thunk_seconds(Path(trace_dir), found)
    kernels = cpu_convolutions()
    text = (
        f'{args.model} training step, batch {args.batch} at {args.size}x{args.size}, {args.dtype}, '
        f'{jax.devices()[0].device_kind}{f", convolutions in {kernels}" if kernels else ""}'
        f'{", keep_cpu_memory" if cpu_memory_kept() else ""}: thunk time per step, '
        f'{args.steps} traced steps\n\n' + tables(seconds, found, args.steps, args.top) + '\n'
    )
    print(text)
    if args.markdown:
        atomic_write(args.markdown, lambda tmp: Path(tmp).write_text(text), force=args.force)
    return text


if __name__ == '__main__':
    main()
