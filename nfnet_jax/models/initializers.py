"""The model's weight initialisers: timm's distributions, drawn by jax.random or, on request, by numpy.

Each is a Flax initializer, `init(key, shape, dtype)`, so the layers build as any Flax layer
does: under `jit`, `eval_shape` or a sharded init they draw with jax.random from `key`.
Inside `drawing_on_host(generator)` they draw from the numpy generator instead and return
numpy arrays. That is how `init_model` builds a model: an eager jax draw compiles a program
per shape, one jitted init compiles an output per weight, and a numpy draw compiles nothing;
its weights are also the same on every backend and every host for the same seed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[[Array, Sequence[int], Dtype], Any]

_HOST_GENERATOR: ContextVar[np.random.Generator | None] = ContextVar('host_generator', default=None)


@contextlib.contextmanager
def drawing_on_host(generator: np.random.Generator) -> Iterator[None]:
    """Within this block, the initialisers below draw from `generator` and return numpy arrays."""
    token = _HOST_GENERATOR.set(generator)
    try:
        yield
    finally:
        _HOST_GENERATOR.reset(token)


def fan_in(shape: Sequence[int]) -> int:
    """Inputs per output unit of an HWIO / (in, out) kernel: every axis but the last (as Flax and torch count it)."""
    return math.prod(shape[:-1])


def _random(distribution: str, scale: Callable[[Sequence[int]], float]) -> Initializer:
    """`scale(shape) * N(0, 1)`, or `scale(shape) * U(-1, 1)`."""

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Any:
        shape = tuple(shape)
        generator = _HOST_GENERATOR.get()
        if generator is not None:
            if distribution == 'normal':
                sample = generator.standard_normal(shape, np.float32)
            else:
                sample = generator.random(shape, np.float32) * 2 - 1
            return (sample * np.float32(scale(shape))).astype(dtype)
        if distribution == 'normal':
            sample = jax.random.normal(key, shape, dtype)
        else:
            sample = jax.random.uniform(key, shape, dtype, -1.0)
        return sample * jnp.asarray(scale(shape), dtype)

    return init


def constant(value: float) -> Initializer:
    """Every element `value` (biases, gains)."""

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Any:
        del key
        full = np.full if _HOST_GENERATOR.get() is not None else jnp.full
        return full(tuple(shape), value, dtype)

    return init


# torch's kaiming_normal_(mode='fan_in', nonlinearity='linear'), timm's NormFreeNet conv init.
kaiming_normal = _random('normal', lambda shape: fan_in(shape) ** -0.5)
# torch's default Conv1d init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)) (ECA's conv).
torch_conv_default = _random('uniform', lambda shape: fan_in(shape) ** -0.5)
zeros = constant(0.0)


def normal(stddev: float) -> Initializer:
    """N(0, stddev^2), timm's classifier init."""
    return _random('normal', lambda shape: stddev)
