"""One training step of nfnet_jax against timm's, in one process, on the same weights and batch.

    python -m benchmarks.train_step [--model dm_nfnet_f0] [--batch 8] [--size 160] [--steps 5] [--dtype bfloat16]

Both sides do the same work per step: forward, cross entropy with label smoothing 0.1,
backward, timm's AGC (clip 0.01, head excluded), SGD with Nesterov momentum and weight decay.
timm runs eager (NCHW and channels_last) and under `torch.compile` (channels_last; forward and
backward compiled, the optimizer eager), on the GPU when torch sees one; nfnet_jax runs its jitted
`train_step` on JAX's default device. `--dtype bfloat16` computes in bfloat16 from float32
parameters on both sides: timm's forward and loss under `torch.autocast`, nfnet_jax's model built
with `dtype=jnp.bfloat16`. Timed steps alternate between
the configurations, so load from other processes hits them alike; each reports the median
seconds per step and its first step (compilation included), and nfnet_jax's speed against each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.vs_timm import JAX_CONFIG
from nfnet_jax.cli import progress


def timm_step(
    model,
    channels_last: bool,
    images: np.ndarray,
    labels: np.ndarray,
    device: str = 'cpu',
    compile: bool = False,
    dtype: str = 'float32',
) -> Callable[[], None]:
    """One timm training step on `device` ('cpu' or 'cuda'), returning when its work is done.

    With `compile`, the model's forward and backward run through `torch.compile`; with `dtype`
    'bfloat16', the forward and the loss run under autocast.
    """
    import torch
    from timm.models import model_parameters
    from timm.utils.agc import adaptive_clip_grad

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format).train()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device=device, memory_format=memory_format)
    y = torch.from_numpy(labels).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    forward = torch.compile(model) if compile else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16'):
            loss = loss_fn(forward(x), y)
        loss.backward()
        adaptive_clip_grad(model_parameters(model, exclude_head=True), clip_factor=0.01)
        optimizer.step()
        if device != 'cpu':
            torch.cuda.synchronize()

    return step


def jax_step(timm_model, images: np.ndarray, labels: np.ndarray, dtype: str = 'float32') -> Callable[[], None]:
    import nfnet_jax
    from nfnet_jax.factory import from_timm
    from nfnet_jax.train import TrainState, nfnet_optimizer, train_step
    from nfnet_jax.weights import flat_params

    model = from_timm(timm_model)
    if dtype == 'bfloat16':
        model = nfnet_jax.create_model(
            timm_model.pretrained_cfg['architecture'], params=flat_params(model), dtype=jnp.bfloat16
        )
    state = TrainState(model, nfnet_optimizer(0.1))
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def step() -> None:
        jax.block_until_ready(train_step(state, x, y, label_smoothing=0.1))

    return step


def build_steps(
    model_name: str, batch: int, size: int, device: str, compile: bool, dtype: str = 'float32'
) -> dict[str, Callable[[], None]]:
    """The configurations' steps on one random batch, timm's init converted for nfnet_jax, computing in `dtype`."""
    import copy

    import timm
    import torch

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, batch)
    torch.manual_seed(0)
    reference = timm.create_model(model_name)
    steps = {
        'timm eager NCHW': timm_step(copy.deepcopy(reference), False, images, labels, device, dtype=dtype),
        'timm eager channels_last': timm_step(copy.deepcopy(reference), True, images, labels, device, dtype=dtype),
    }
    if compile:
        steps['timm compile channels_last'] = timm_step(
            copy.deepcopy(reference), True, images, labels, device, compile=True, dtype=dtype
        )
    steps[f'{JAX_CONFIG} ({jax.default_backend()})'] = jax_step(reference, images, labels, dtype)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='dm_nfnet_f0')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=160)
    parser.add_argument('--steps', type=int, default=5, help='timed steps per configuration')
    parser.add_argument('--skip-compile', action='store_true', help='leave out torch.compile (minutes on CPU)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='compute dtype')
    args = parser.parse_args(argv)

    import torch

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    steps = build_steps(args.model, args.batch, args.size, device, not args.skip_compile, args.dtype)
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

    medians = {name: statistics.median(values) for name, values in times.items()}
    ours = next(value for name, value in medians.items() if name.startswith(JAX_CONFIG))
    print(
        f'{args.model} training step, batch {args.batch} at {args.size}x{args.size}, {args.dtype}, '
        f'timm on {device} ({torch.get_num_threads()} torch threads), '
        f'jax {jax.__version__} on {jax.devices()[0].device_kind}'
    )
    print('| configuration | median s/step | images/s | first step s | nfnet_jax / this |\n|---|---|---|---|---|')
    for name, median in medians.items():
        print(f'| {name} | {median:.2f} | {args.batch / median:.2f} | {first[name]:.1f} | {median / ours:.2f}x |')
    best_timm = min(value for name, value in medians.items() if not name.startswith(JAX_CONFIG))
    print(f'nfnet_jax / best timm: {best_timm / ours:.2f}x')


if __name__ == '__main__':
    main()
