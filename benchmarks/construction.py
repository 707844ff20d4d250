"""How long building a randomly initialised model takes: `nfnet_jax.create_model` next to `timm.create_model`.

    python -m benchmarks.construction --model dm_nfnet_f0 --repeats 3 [--json OUT]

Each build runs in a fresh process (JAX caches compiled programs within a process, so a second
build in the same one would time the cache), after the imports; the table gives the median
over the repeats. nfnet_jax's random init is drawn by numpy on the host, as timm's is by torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import markdown
from benchmarks.fresh_process import run_module

LIBRARIES = ('nfnet_jax', 'timm')


def child(library: str, model_name: str) -> dict[str, float]:
    """One build, timed, in this (fresh) process: the import, then the construction with its random init."""
    start = time.perf_counter()
    if library == 'timm':
        import timm
        import torch

        torch.set_num_threads(torch.get_num_threads())
        imported = time.perf_counter()
        timm.create_model(model_name)
    else:
        import jax
        from flax import nnx

        import nfnet_jax

        imported = time.perf_counter()
        model = nfnet_jax.create_model(model_name, rngs=nnx.Rngs(0))
        jax.block_until_ready(nnx.state(model))
    return {'import_s': imported - start, 'build_s': time.perf_counter() - imported}


def run_child(library: str, model_name: str) -> dict[str, float]:
    return run_module('benchmarks.construction', ['--child', library, '--model', model_name], f'the {library} build')


def measure(model_name: str, repeats: int) -> dict[str, dict[str, Any]]:
    """Median build and import times of each library over `repeats` fresh processes, alternating libraries."""
    runs: dict[str, list[dict[str, float]]] = {library: [] for library in LIBRARIES}
    for _ in range(repeats):
        for library in LIBRARIES:
            runs[library].append(run_child(library, model_name))
    return {
        library: {
            'build_s': statistics.median(run['build_s'] for run in results),
            'import_s': statistics.median(run['import_s'] for run in results),
            'build_runs_s': [round(run['build_s'], 3) for run in results],
        }
        for library, results in runs.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='dm_nfnet_f0')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--child', choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model)))
        return
    results = measure(args.model, args.repeats)
    rows = [
        [library, f'{r["build_s"]:.2f}', ', '.join(f'{t:.2f}' for t in r['build_runs_s']), f'{r["import_s"]:.2f}']
        for library, r in results.items()
    ]
    print(f'{args.model}, random init, median of {args.repeats} fresh processes')
    print('\n'.join(markdown.table(['library', 'build (s)', 'runs (s)', 'import (s)'], rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({'model': args.model, 'results': results}, indent=2))


if __name__ == '__main__':
    main()
