"""One training step of nfnet_jax against timm's, in one process, on the same weights and batch.

    python -m benchmarks.train_step [--model dm_nfnet_f0] [--batch 8] [--size 160] [--steps 5]

Both sides do the same work per step: forward, cross entropy with label smoothing 0.1,
backward, timm's AGC (clip 0.01, head excluded), SGD with Nesterov momentum and weight decay.
timm runs eager in float32 (NCHW and channels_last), on the GPU when torch sees one; nfnet_jax
runs its jitted `train_step` in float32 on JAX's default device. Timed steps alternate between
the configurations, so load from other processes hits them alike; each reports the median
seconds per step and its first step (compilation included for JAX).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax.cli import progress


def timm_step(
    model, channels_last: bool, images: np.ndarray, labels: np.ndarray, device: str = 'cpu'
) -> Callable[[], None]:
    """One timm training step on `device` ('cpu' or 'cuda'), returning when its work is done."""
    import torch
    from timm.models import model_parameters
    from timm.utils.agc import adaptive_clip_grad

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device=device, memory_format=memory_format)
    y = torch.from_numpy(labels).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        adaptive_clip_grad(model_parameters(model, exclude_head=True), clip_factor=0.01)
        optimizer.step()
        if device != 'cpu':
            torch.cuda.synchronize()

    return step


def jax_step(timm_model, images: np.ndarray, labels: np.ndarray) -> Callable[[], None]:
    from nfnet_jax.factory import from_timm
    from nfnet_jax.train import TrainState, nfnet_optimizer, train_step

    state = TrainState(from_timm(timm_model), nfnet_optimizer(0.1))
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def step() -> None:
        jax.block_until_ready(train_step(state, x, y, label_smoothing=0.1))

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='dm_nfnet_f0')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=160)
    parser.add_argument('--steps', type=int, default=5, help='timed steps per configuration')
    args = parser.parse_args(argv)

    import copy

    import timm
    import torch

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, args.batch)
    torch.manual_seed(0)
    reference = timm.create_model(args.model)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    steps = {
        'timm eager NCHW': timm_step(copy.deepcopy(reference), False, images, labels, device),
        'timm eager channels_last': timm_step(copy.deepcopy(reference), True, images, labels, device),
        f'nfnet_jax jit ({jax.default_backend()})': jax_step(reference, images, labels),
    }
    first, times = {}, {name: [] for name in steps}
    for name, step in progress(steps.items(), desc='first steps (compiling)'):
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    for _ in progress(range(args.steps), desc='timed rounds'):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    print(
        f'{args.model} training step, batch {args.batch} at {args.size}x{args.size}, float32, '
        f'timm on {device} ({torch.get_num_threads()} torch threads), '
        f'jax {jax.__version__} on {jax.devices()[0].device_kind}'
    )
    print('| configuration | median s/step | steps/s | images/s | first step s |\n|---|---|---|---|---|')
    for name, values in times.items():
        median = statistics.median(values)
        print(f'| {name} | {median:.2f} | {1 / median:.3f} | {args.batch / median:.1f} | {first[name]:.1f} |')


if __name__ == '__main__':
    main()
