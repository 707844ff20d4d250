"""One training step of nfnet_jax against timm's, in one process, on the same weights and batch.

    python -m benchmarks.train_step [--model dm_nfnet_f0] [--batch 8] [--size 160] [--steps 5] [--dtype bfloat16]

Both sides do the same work per step: forward, cross entropy with label smoothing 0.1,
backward, timm's AGC (clip 0.01, head excluded), SGD with Nesterov momentum and weight decay.
timm runs eager (NCHW and channels_last) and under `torch.compile` (channels_last; forward and
backward compiled, the optimizer eager), on the GPU when torch sees one; nfnet_jax runs its jitted
`train_step` on JAX's default device, on CPU as `python -m nfnet_jax.finetune` runs it: with the
CPU backend and its memory settings on (`nfnet_jax.cpu.enable`, when the benchmark is the
process; `--no-keep-cpu-memory` leaves the memory settings off, for timm too). `--dtype bfloat16`
computes in bfloat16 from float32 parameters on both sides: timm's forward and loss under
`torch.autocast`, nfnet_jax's model built with `dtype=jnp.bfloat16`. Timed steps alternate between
the configurations, so load from other processes hits them alike; each reports the median
seconds per step and its first step (compilation included), and nfnet_jax's speed against each.
Speed is also given as GFLOP/s, counting the FLOPs of nfnet_jax's step (forward, backward, AGC and
optimizer, from XLA's cost analysis: `step_flops`) for every configuration, and as a share of the
machine's ceiling, `benchmarks.vs_timm`'s fastest matmul of torch and XLA, timed in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.vs_timm import JAX_CONFIG, cpu_convolutions, cpu_memory_kept, matmul_ceiling, xla_convolutions
from nfnet_jax.cli import add_cpu_arguments, apply_cpu_arguments
from nfnet_jax.progress import progress


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


def jax_model(timm_model, dtype: str = 'float32'):
    """timm's model converted to nfnet_jax, computing in `dtype` (its parameters float32 either way)."""
    import nfnet_jax
    from nfnet_jax.factory import from_timm
    from nfnet_jax.weights import flat_params

    model = from_timm(timm_model)
    if dtype == 'bfloat16':
        model = nfnet_jax.create_model(
            timm_model.pretrained_cfg['architecture'], params=flat_params(model), dtype=jnp.bfloat16
        )
    return model


def jax_step(timm_model, images: np.ndarray, labels: np.ndarray, dtype: str = 'float32') -> Callable[[], None]:
    from nfnet_jax.train import TrainState, nfnet_optimizer, train_step

    state = TrainState(jax_model(timm_model, dtype), nfnet_optimizer(0.1))
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def step() -> None:
        jax.block_until_ready(train_step(state, x, y, label_smoothing=0.1))

    return step


def step_flops(model_name: str, batch: int, size: int, dtype: str = 'float32') -> float:
    """FLOPs of one nfnet_jax training step, from XLA's cost analysis of the unoptimised program with XLA's own
    convolutions (`xla_convolutions`).

    Both frameworks do the same arithmetic, so one count serves every configuration. About 3x
    the forward's: the backward computes each convolution's input and kernel gradients.
    """
    from flax import nnx

    import nfnet_jax
    from nfnet_jax.train import TrainState, nfnet_optimizer
    from nfnet_jax.train.step import pure_train_step

    # Shapes only: an eager init would compile every random draw of it.
    state = nnx.eval_shape(
        lambda: TrainState(nfnet_jax.create_model(model_name, dtype=jnp.dtype(dtype)), nfnet_optimizer(0.1))
    )
    graphdef, arrays = nnx.split(state)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with xla_convolutions():
        lowered = jax.jit(pure_train_step, static_argnums=(0, 4)).lower(graphdef, arrays, images, labels, 0.1)
    return lowered.cost_analysis()['flops']


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
    add_cpu_arguments(parser)  # for the whole process: timm runs with it too
    args = parser.parse_args(argv)
    apply_cpu_arguments(args, is_process=__name__ == '__main__')

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
    flops = step_flops(args.model, args.batch, args.size, args.dtype)
    ceiling = matmul_ceiling(args.dtype, device == 'cuda')
    kernels = cpu_convolutions()
    print(
        f'{args.model} training step, batch {args.batch} at {args.size}x{args.size}, {args.dtype}, '
        f'timm on {device} ({torch.get_num_threads()} torch threads), '
        f'jax {jax.__version__} on {jax.devices()[0].device_kind}{", keep_cpu_memory" if cpu_memory_kept() else ""}'
        f'{f", convolutions in {kernels}" if kernels else ""}; '
        f'{flops / 1e9:.1f} GFLOP per step; ceiling: the {ceiling.matmul} matmul at {ceiling.gflops:.0f} GFLOP/s'
    )
    print(
        '| configuration | median s/step | images/s | first step s | GFLOP/s (% of ceiling) | nfnet_jax / this |\n'
        '|---|---|---|---|---|---|'
    )
    for name, median in medians.items():
        gflops = flops / median / 1e9
        print(
            f'| {name} | {median:.2f} | {args.batch / median:.2f} | {first[name]:.1f} '
            f'| {gflops:.0f} ({100 * gflops / ceiling.gflops:.0f}%) | {median / ours:.2f}x |'
        )
    best_timm = min(value for name, value in medians.items() if not name.startswith(JAX_CONFIG))
    print(f'nfnet_jax / best timm: {best_timm / ours:.2f}x')


if __name__ == '__main__':
    main()
