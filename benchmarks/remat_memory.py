"""The training step's temporary memory with and without per-block gradient checkpointing, as XLA plans it.

    python -m benchmarks.remat_memory --model dm_nfnet_f3 --size 320 --batch 8 [--json OUT]

Nothing runs: the step (forward, cross-entropy, backward, an SGD update) is lowered from abstract
inputs and compiled for this machine's backend, and `compiled.memory_analysis()` gives the bytes
XLA allocates for temporaries (activations kept for the backward pass, among others) next to the
arguments. Beside XLA's plan, the residuals: what the backward pass keeps from the forward pass
(the leaves of `jax.vjp`'s function, shapes only), whatever a backend's scheduler makes of them.
XLA's CPU backend plans the same temporaries with or without `jax.checkpoint` (even for a chain
of dense layers), so there the residuals are the figure that shows the saving.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks import markdown
from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.nfnet import abstract_model

MIB = 2**20


Loss = Callable[[nnx.State, nnx.State, jax.Array, jax.Array], jax.Array]


def abstract_training(model_name: str, size: int, batch: int, grad_checkpointing: bool) -> tuple[Loss, tuple]:
    """The abstract model's training cross-entropy and its abstract arguments (params, rest, images, labels)."""
    model = abstract_model(model_cfgs[model_name], grad_checkpointing=grad_checkpointing)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params: nnx.State, rest: nnx.State, images: jax.Array, labels: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params, rest)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return loss, (params, rest, images, labels)


def residual_bytes(loss: Loss, arguments: tuple) -> int:
    """The bytes the backward pass of `loss` keeps from the forward: the leaves of `jax.vjp`'s function, shapes
    only."""

    def backward(params: nnx.State, rest: nnx.State, images: jax.Array, labels: jax.Array) -> Any:
        return jax.vjp(lambda params: loss(params, rest, images, labels), params)[1]

    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(jax.eval_shape(backward, *arguments)))


def step_memory(model_name: str, size: int, batch: int, grad_checkpointing: bool) -> dict[str, Any]:
    """Compile one abstract training step and return XLA's memory analysis of it (bytes) and the compile time."""
    loss, arguments = abstract_training(model_name, size, batch, grad_checkpointing)

    def train_step(params: nnx.State, rest: nnx.State, images: jax.Array, labels: jax.Array) -> nnx.State:
        grads = jax.grad(loss)(params, rest, images, labels)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    residuals = residual_bytes(loss, arguments)
    start = time.perf_counter()
    analysis = jax.jit(train_step).lower(*arguments).compile().memory_analysis()
    return {
        'temp_bytes': analysis.temp_size_in_bytes,
        'residual_bytes': residuals,
        'argument_bytes': analysis.argument_size_in_bytes,
        'output_bytes': analysis.output_size_in_bytes,
        'compile_s': time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='dm_nfnet_f3')
    parser.add_argument('--size', type=int, default=320)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    results = {
        name: step_memory(args.model, args.size, args.batch, grad_checkpointing=remat)
        for name, remat in (('plain', False), ('grad_checkpointing', True))
    }
    rows = [
        [
            name,
            f'{r["residual_bytes"] / MIB:.0f}',
            f'{r["temp_bytes"] / MIB:.0f}',
            f'{r["argument_bytes"] / MIB:.0f}',
            f'{r["compile_s"]:.0f}',
        ]
        for name, r in results.items()
    ]
    print(f'{args.model}, {args.batch}x{args.size}x{args.size}, training step on {jax.default_backend()}')
    print(
        '\n'.join(
            markdown.table(['step', 'residuals (MiB)', 'XLA temporaries (MiB)', 'arguments (MiB)', 'compile (s)'], rows)
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps({'model': args.model, 'size': args.size, 'results': results}, indent=2))


if __name__ == '__main__':
    main()
