"""Inference throughput on one device against the same batch sharded over every device (nfnet_jax.parallel).

    python -m benchmarks.sharded_inference --model dm_nfnet_f0 --batch 16 --size 256 [--model-parallelism 2]

On a GPU/TPU host this compares one accelerator with all of them. On a CPU, try
`XLA_FLAGS=--xla_force_host_platform_device_count=8`: the 8 "devices" share the same cores, so
it shows the cost of the partitioning, not a speed-up; the CPU backend is on as the commands run
it (when the benchmark is the process), and a program for several devices keeps XLA's
convolutions (`nfnet_jax.cpu.convolution`). Reports the best and median images/s of `--runs`
warm calls, after one compiling call each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

import nfnet_jax
from nfnet_jax import parallel
from nfnet_jax.cli import add_cpu_arguments, apply_cpu_arguments
from nfnet_jax.inference import classifier
from nfnet_jax.progress import progress


def images_per_second(call: Callable[[], jax.Array], batch: int, runs: int, label: str) -> dict[str, float]:
    """The best and median images/s of `runs` timed calls, and the seconds of the first (compiling) call."""
    begin = time.perf_counter()
    call().block_until_ready()
    first = time.perf_counter() - begin
    seconds = []
    for _ in progress(range(runs), desc=label, unit='run'):
        begin = time.perf_counter()
        call().block_until_ready()
        seconds.append(time.perf_counter() - begin)
    return {
        'images_s_best': batch / min(seconds),
        'images_s_median': batch / statistics.median(seconds),
        'first_s': first,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.sharded_inference', description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='dm_nfnet_f0')
    parser.add_argument('--batch', type=int, default=16, help='global batch (a multiple of the data axis)')
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--model-parallelism', type=int, default=1)
    add_cpu_arguments(parser)
    args = parser.parse_args(argv)
    apply_cpu_arguments(args, is_process=__name__ == '__main__')

    model = nfnet_jax.create_model(args.model, rngs=nnx.Rngs(0))
    fn = classifier(model)
    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    device = jax.devices()[0]
    single_state, single_images = jax.device_put(fn.state, device), jax.device_put(images, device)
    mesh = parallel.make_mesh(args.model_parallelism)
    sharded = parallel.shard_inference(fn, mesh)
    sharded_images = parallel.global_batch(images, mesh)
    results = {
        'model': args.model,
        'batch': args.batch,
        'size': args.size,
        'devices': jax.device_count(),
        'platform': device.platform,
        'one device': images_per_second(
            lambda: fn.compiled(single_state, single_images), args.batch, args.runs, '1 device'
        ),
        f'mesh {dict(mesh.shape)}': images_per_second(
            lambda: sharded(sharded_images), args.batch, args.runs, f'{mesh.devices.size} devices'
        ),
    }
    print(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
