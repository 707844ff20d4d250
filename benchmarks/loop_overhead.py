"""The fine-tuning loop's speed against a raw loop of the same `ShardedTrainer` steps, on batches in memory.

    python -m benchmarks.loop_overhead [--model test_nfnet] [--size 64] [--batch 32] [--steps 20] [--runs 5]

The loop is `nfnet_jax.train.loop.Finetuning.train_steps`, what `python -m nfnet_jax.finetune`
runs between evaluations: batches prefetched to the devices, each step's metrics read one step
late and written to metrics.jsonl, the learning rate, the progress bar. It gets `--steps`
ready batches (numpy arrays of random pixels, as a loader hands them over). The raw loop calls
`trainer.train_step` on the same batches already on the devices and waits once, after its last
step: the bound for any loop around these steps. Both drive one trainer (one state, one
compiled step); runs alternate between them after a warm-up run of each, and each reports its
median steps/s. The issue's target for the ratio is at least 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from nfnet_jax import parallel
from nfnet_jax.cli import add_cpu_arguments, apply_cpu_arguments
from nfnet_jax.data import loaders
from nfnet_jax.train.config import FinetuneConfig
from nfnet_jax.train.loop import Finetuning, Metrics

CLASSES = 10


def build_run(model: str, size: int, batch: int, steps: int, workdir: Path) -> Finetuning:
    """A fine-tuning run of `model` (fresh weights) whose first epoch is longer than `steps`: no evaluation."""
    images = batch * (steps + 1)
    train = loaders.Samples(
        files=tuple(f'image{i}.png' for i in range(images)),
        labels=np.arange(images) % CLASSES,
        class_names=tuple(f'class{c}' for c in range(CLASSES)),
    )
    config = FinetuneConfig(
        data=workdir, model=model, image_size=size, batch_size=batch, epochs=1, warmup_epochs=0, val_split=0.1
    )
    return Finetuning(config, workdir, train, train, fresh=True)


def ready_batches(run: Finetuning, steps: int) -> list[loaders.Batch]:
    """`steps` batches of random uint8 pixels and labels, this process's rows, as a loader gives them."""
    rng = np.random.default_rng(0)
    rows = run.config.batch_size // jax.process_count()
    return [
        loaders.Batch(
            rng.integers(0, 256, (rows, run.size, run.size, 3), np.uint8),
            rng.integers(0, CLASSES, rows).astype(np.int32),
            step=k,
        )
        for k in range(steps)
    ]


def time_loop(run: Finetuning, batches: list[loaders.Batch], workdir: Path) -> float:
    """Seconds `Finetuning.train_steps` takes over `batches` (it returns once every step's metrics are read)."""
    run.metrics = Metrics(workdir / 'metrics.jsonl', [], run.leader)
    start = time.perf_counter()
    run.train_steps(batches, 0)
    return time.perf_counter() - start


def time_raw(run: Finetuning, on_devices: list[tuple[jax.Array, jax.Array]]) -> float:
    """Seconds the same steps take called back to back on batches already on the devices."""
    start = time.perf_counter()
    for images, labels in on_devices:
        metrics = run.trainer.train_step(images, labels)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='test_nfnet')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--batch', type=int, default=32, help='global batch size')
    parser.add_argument('--steps', type=int, default=20, help='steps per timed run')
    parser.add_argument('--runs', type=int, default=5, help='timed runs of each loop')
    parser.add_argument('--json', type=Path, help='also write the report here')
    add_cpu_arguments(parser)
    args = parser.parse_args(argv)
    apply_cpu_arguments(args, is_process=__name__ == '__main__')

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run = build_run(args.model, args.size, args.batch, args.steps, workdir)
        batches = ready_batches(run, args.steps)
        on_devices = [parallel.global_batch((b.images, b.labels), run.mesh) for b in batches]
        time_loop(run, batches, workdir)  # warm-up: compiles the step, starts the metrics file and bar
        time_raw(run, on_devices)
        loop, raw = [], []
        for _ in range(args.runs):
            loop.append(args.steps / time_loop(run, batches, workdir))
            raw.append(args.steps / time_raw(run, on_devices))
    report = {
        'model': args.model,
        'size': args.size,
        'batch': args.batch,
        'steps': args.steps,
        'device': jax.devices()[0].device_kind,
        'devices': jax.device_count(),
        'loop_steps_per_s': loop,
        'raw_steps_per_s': raw,
        'loop_median': statistics.median(loop),
        'raw_median': statistics.median(raw),
    }
    report['ratio'] = report['loop_median'] / report['raw_median']
    print(
        f'{args.model}, batch {args.batch} at {args.size} px, {args.steps} steps x {args.runs} runs on '
        f'{jax.device_count()} x {report["device"]}: finetune loop {report["loop_median"]:.2f} steps/s, '
        f'raw steps {report["raw_median"]:.2f} steps/s, ratio {report["ratio"]:.3f}'
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == '__main__':
    main()
