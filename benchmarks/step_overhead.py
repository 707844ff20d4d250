"""Host time per step: the library's step functions against a plain `jax.jit` step over a state split once.

    python -m benchmarks.step_overhead [--model dm_nfnet_f0] [--size 32] [--calls 20] [--repeats 3]

On an accelerator a step takes milliseconds, so what Python does around each call decides how busy
the device stays. Each function is timed as the host sees it: the time until a call returns
(dispatch is asynchronous), with the device idle when it starts, at a tiny input. The
model trains with the NFNet optimizer (AGC, SGD with Nesterov momentum) and an EMA of its weights.

Per step function three forms are timed, interleaved, `--repeats` times, and the medians reported:
- `plain`: `jax.jit` of the same pure step over the state's flat arrays, split once by hand: the floor.
- `library`: `nfnet_jax.train.train_step` / `eval_step`, `ShardedTrainer.train_step` / `eval_step`
  and the `classifier` inference function, as users call them (the NNX module updated in place).
- `split per call`: `nnx.split` and `nnx.update` of the whole state around every call, as a step
  written the obvious way does (and as the library's did before it kept the state split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import nfnet_jax
from benchmarks.markdown import table
from nfnet_jax import parallel
from nfnet_jax.cli import add_cpu_arguments, apply_cpu_arguments
from nfnet_jax.files import atomic_write
from nfnet_jax.inference import classifier
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.progress import progress
from nfnet_jax.train import TrainState, eval_step, nfnet_optimizer, train_step
from nfnet_jax.train.step import pure_eval_step, pure_train_step


def host_ms(call: Callable[[], Any], calls: int) -> float:
    """The median milliseconds a call takes to return, over `calls` calls after a warm-up (compiling) one.

    Each call starts with the device idle (the previous result waited for), so that what is timed is
    the host's work alone, not a wait for a device busy with earlier steps.
    """
    jax.block_until_ready(call())
    seconds = []
    for _ in range(calls):
        begin = time.perf_counter()
        out = call()
        seconds.append(time.perf_counter() - begin)
        jax.block_until_ready(out)
    return 1e3 * statistics.median(seconds)


def plain_train(
    state: TrainState, images: jax.Array, labels: jax.Array, shardings: list[Any] | None = None
) -> Callable[[], Any]:
    """A plain jitted train step over the state's flat arrays, split once here (the state is not updated).

    `shardings`: the flat arrays' shardings, given to the jit as `ShardedTrainer` gives them.
    """
    graphdef, split_state = nnx.split(state)
    arrays, treedef = jax.tree.flatten(jax.tree.map(jnp.copy, split_state))

    def step(arrays: list[jax.Array], x: jax.Array, y: jax.Array) -> Any:
        new_state, metrics = pure_train_step(graphdef, jax.tree.unflatten(treedef, arrays), x, y)
        return jax.tree.leaves(new_state), metrics

    placed = {} if shardings is None else dict(in_shardings=(shardings, None, None), out_shardings=(shardings, None))
    jitted = jax.jit(step, donate_argnums=0, **placed)
    held = [arrays]

    def call() -> Any:
        held[0], metrics = jitted(held[0], images, labels)
        return metrics

    return call


def plain_eval(model: nnx.Module, images: jax.Array, labels: jax.Array) -> Callable[[], Any]:
    graphdef, state = nnx.split(model)
    arrays, treedef = jax.tree.flatten(jax.tree.map(jnp.copy, state))  # the library's train steps donate the model's
    jitted = jax.jit(lambda arrays, x, y: pure_eval_step(graphdef, jax.tree.unflatten(treedef, arrays), x, y))
    return lambda: jitted(arrays, images, labels)


def split_per_call_train(state: TrainState, images: jax.Array, labels: jax.Array) -> Callable[[], Any]:
    jitted = jax.jit(pure_train_step, static_argnums=0, donate_argnums=1)

    def call() -> Any:
        graphdef, arrays = nnx.split(state)
        new_state, metrics = jitted(graphdef, arrays, images, labels)
        nnx.update(state, new_state)
        return metrics

    return call


def split_per_call_eval(model: nnx.Module, images: jax.Array, labels: jax.Array) -> Callable[[], Any]:
    jitted = jax.jit(pure_eval_step, static_argnums=0)

    def call() -> Any:
        graphdef, arrays = nnx.split(model)
        return jitted(graphdef, arrays, images, labels)

    return call


def new_state(model_name: str) -> TrainState:
    model = nfnet_jax.create_model(model_name, num_classes=10, rngs=nnx.Rngs(0))
    return TrainState(model, nfnet_optimizer(1e-3), ema_decay=0.9999)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.step_overhead', description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='dm_nfnet_f0')
    parser.add_argument('--size', type=int, default=32, help='image size: tiny, so that device time stays small')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--calls', type=int, default=20, help='timed calls per form and repeat')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', help='also write the results to this JSON file')
    add_cpu_arguments(parser, on_by_default=False)  # keeping CPU memory makes dispatch synchronous
    args = parser.parse_args(argv)
    apply_cpu_arguments(args, is_process=__name__ == '__main__')

    images = jnp.zeros((args.batch, args.size, args.size, 3), jnp.float32)
    labels = jnp.zeros((args.batch,), jnp.int32)
    state, sharded_state, other_state = new_state(args.model), new_state(args.model), new_state(args.model)
    leaves = len(jax.tree.leaves(nnx.state(state)))
    trainer = ShardedTrainer(sharded_state, parallel.make_mesh())
    infer = classifier(state.model)
    plain_infer = jax.jit(infer.apply)
    functions: dict[str, dict[str, Callable[[], Any]]] = {
        'train_step': {
            'plain': plain_train(other_state, images, labels),
            'library': lambda: train_step(state, images, labels),
            'split per call': split_per_call_train(other_state, images, labels),
        },
        'eval_step': {
            'plain': plain_eval(state.eval_model, images, labels),
            'library': lambda: eval_step(state.eval_model, images, labels),
            'split per call': split_per_call_eval(state.eval_model, images, labels),
        },
        'ShardedTrainer.train_step': {
            'plain': plain_train(other_state, images, labels, jax.tree.leaves(trainer.state_shardings)),
            'library': lambda: trainer.train_step(images, labels),
        },
        'ShardedTrainer.eval_step': {
            'plain': plain_eval(sharded_state.eval_model, images, labels),
            'library': lambda: trainer.eval_step(images, labels),
        },
        'classifier (inference)': {
            'plain': lambda: plain_infer(infer.state, images),
            'library': lambda: infer(images),
        },
    }
    times: dict[str, dict[str, list[float]]] = {name: {form: [] for form in forms} for name, forms in functions.items()}
    total = args.repeats * sum(len(forms) for forms in functions.values())
    with progress(total=total, desc='timing', unit='form') as bar:
        for _ in range(args.repeats):
            for name, forms in functions.items():
                for form, call in forms.items():
                    times[name][form].append(host_ms(call, args.calls))
                    bar.update()
    results = {name: {form: statistics.median(ms) for form, ms in forms.items()} for name, forms in times.items()}
    rows = []
    for name, ms in results.items():
        over = ms['library'] - ms['plain']
        rows.append([name, ms['plain'], ms['library'], over, ms['library'] / ms['plain'], ms.get('split per call')])
    print(
        f'{args.model}, NFNet optimizer + EMA ({leaves} arrays in the train state), batch {args.batch} at '
        f'{args.size} px on {jax.devices()[0].platform}: host ms a call, median of {args.repeats} x {args.calls} calls'
    )
    print(
        '\n'.join(table(['step', 'plain jit', 'library', 'library - plain', 'library / plain', 'split per call'], rows))
    )
    if args.json:
        report = json.dumps({'model': args.model, 'leaves': leaves, 'ms_per_call': results}, indent=1)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(report), force=True)


if __name__ == '__main__':
    main()
