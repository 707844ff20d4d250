"""How long a fresh process takes to its first logits, with and without JAX's persistent compilation cache.

    python -m benchmarks.cold_start --model dm_nfnet_f0 --batch 8 --size 256 [--json OUT]

Three fresh processes run one after another: without the cache, with an empty cache folder
(compiles and writes it), and with that folder again (reads it). Each starts as a command does:
it imports nfnet_jax, then turns the CPU backend on with its memory settings (`nfnet_jax.cpu.enable`,
which on CPU loads oneDNN's convolutions, building them once per machine where the extra is
installed). Each reports the time of those two, to build the model, to prepare the inference
function (`nfnet_jax.inference.classifier`), its first call (trace + compile or cache load + run)
and a second call (run only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import markdown
from benchmarks.fresh_process import run_module

CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def child(model_name: str, batch: int, size: int, cache: str | None) -> dict[str, Any]:
    """One cold start, timed step by step, in this (fresh) process."""
    start = time.perf_counter()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import nfnet_jax
    from nfnet_jax import cpu, inference

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kwargs: hits.append(event) if event == CACHE_HIT_EVENT else None
    )
    if cache is not None:
        inference.enable_compilation_cache(cache)
    timings = {'import_s': time.perf_counter() - start}

    def step(name: str, work: Any) -> Any:
        begin = time.perf_counter()
        out = work()
        timings[name] = time.perf_counter() - begin
        return out

    step('cpu_backend_s', lambda: cpu.enable(keep_memory=True))  # as the commands, before any JAX computation
    model = step('build_model_s', lambda: nfnet_jax.create_model(model_name, rngs=nnx.Rngs(0)))
    classify = step('prepare_s', lambda: inference.classifier(model))
    images = jnp.zeros((batch, size, size, model.in_chans), jnp.float32)
    step('first_call_s', lambda: classify(images).block_until_ready())
    step('second_call_s', lambda: classify(images).block_until_ready())
    return dict(timings, cache_hits=len(hits))


def run_child(model_name: str, batch: int, size: int, cache: Path | None) -> dict[str, Any]:
    args = ['--child', '--model', model_name, '--batch', str(batch), '--size', str(size)]
    return run_module('benchmarks.cold_start', args + (['--cache', str(cache)] if cache else []), 'the cold start')


def measure(model_name: str, batch: int, size: int, cache: Path) -> dict[str, dict[str, Any]]:
    """The three cold starts: no cache, writing an empty cache, reading it."""
    from nfnet_jax.progress import progress  # here, not at the top: a child process times its own import of nfnet_jax

    runs = {'no cache': None, 'cache, first process (writes)': cache, 'cache, second process (reads)': cache}
    results = {}
    for name, folder in progress(runs.items(), desc='cold starts', unit='process'):
        results[name] = run_child(model_name, batch, size, folder)
        if folder is not None:
            results[name]['cache_files'] = sum(1 for p in folder.rglob('*') if p.is_file())
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    columns = ('import_s', 'cpu_backend_s', 'build_model_s', 'prepare_s', 'first_call_s', 'second_call_s', 'cache_hits')
    rows = [(name, *(r[c] for c in columns)) for name, r in results.items()]
    return '\n'.join(markdown.table(('process', *columns), rows))


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m benchmarks.cold_start')
    parser.add_argument('--model', default='dm_nfnet_f0')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--json', type=Path, help='write the timings here as JSON')
    parser.add_argument('--force', action='store_true', help='replace an existing --json file')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--cache', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.batch, args.size, args.cache)))
        return {}
    from nfnet_jax.files import atomic_write, refuse_existing

    if args.json is not None:
        refuse_existing(args.json, args.force)

    with tempfile.TemporaryDirectory(prefix='nfnet_jax_cache_') as cache:
        results = measure(args.model, args.batch, args.size, Path(cache))
    print(f'{args.model}, batch {args.batch}, {args.size}x{args.size}')
    print(table(results))
    if args.json is not None:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)), force=args.force)
    return results


if __name__ == '__main__':
    main()
