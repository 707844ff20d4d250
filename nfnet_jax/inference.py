"""Pure, jitted inference: the weights prepared once, then one compiled function per kind of output.

    classify = nfnet_jax.inference.classifier(model)     # images (N, H, W, C) -> logits
    logits = classify(images)                             # compiled on the first call per shape/dtype

Each builder returns an `InferenceFn`: `fn(images)` is a jitted call and nothing else, and
`fn.apply(fn.state, images)` is the same pure function for code that manages the state itself
(placing it on devices, sharding it, nesting it in its own jit), jitted with XLA's default
options, where `fn(images)` compiles with those of `nfnet_jax.lowering` (faster convolutions on
CPU). The state is prepared once: the model is copied into eval mode
and every weight-standardised conv gets its standardised kernel folded in
(`ScaledStdConv2d.fold_standardization`), so no call recomputes it. The model passed in is
untouched and keeps training with the usual per-call standardisation. The state holds weights
only (no random state: an inference model never draws).

`fn.export(shape)` is the function as a `jax.export.Exported`, weights included, for serving
from a process that has jax and nothing else (`python -m nfnet_jax.export` writes one to a file).

Mixed precision is the model's own `dtype`: build it with `create_model(name, dtype=jnp.bfloat16)`
to compute in bfloat16 from float32 parameters (standardisation and pooling stay float32).

Cold start: compiling dm_nfnet_f0 takes seconds to tens of seconds per input shape. Call
`enable_compilation_cache(folder)` before the first compilation and later processes load the
compiled executable from that folder instead of compiling again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nfnet_jax import lowering
from nfnet_jax.layers import Array, ScaledStdConv2d
from nfnet_jax.model import NormFreeNet


@dataclass(frozen=True)
class InferenceFn:
    """A jitted pure function of (state, images) bound to its prepared state.

    `apply` is jitted with XLA's default options, so it can be nested in other jits and
    exported; `compiled` is the same function jitted with the compiler options of the state's
    platform (`nfnet_jax.lowering`), which only a top-level jit may take. A call runs `compiled`,
    or `apply` when it is traced inside another jit.
    """

    apply: Callable[[nnx.State, Array], Any]
    state: nnx.State
    compiled: Callable[[nnx.State, Array], Any]

    def __call__(self, images: Array) -> Any:
        run = self.apply if isinstance(images, jax.core.Tracer) else self.compiled
        return run(self.state, images)

    def export(
        self,
        shape: Sequence[int | str],
        dtype: Any = jnp.float32,
        platforms: Sequence[str] | None = None,
    ) -> jax.export.Exported:
        """`jax.export` of `images -> fn(images)` with the state closed over: the weights travel inside.

        `shape` is the images' (N, H, W, C); a str dimension is symbolic (`jax.export.symbolic_shape`),
        e.g. `('batch', 224, 224, 3)` for any batch size. `platforms` are jax.export's ('cpu', 'cuda',
        'rocm', 'tpu'; default: the default backend's). `exported.serialize()` gives bytes that any
        process with jax loads back with `jax.export.deserialize(data).call(images)`.
        """
        names = list(dict.fromkeys(dim for dim in shape if isinstance(dim, str)))
        symbols = dict(zip(names, jax.export.symbolic_shape(','.join(names)), strict=True)) if names else {}
        spec = jax.ShapeDtypeStruct(tuple(symbols.get(dim, dim) for dim in shape), dtype)
        # A top-level jit of its own with the state as constants: the artifact's only argument is the images.
        state = self.state
        closed = jax.jit(lambda images: self.apply(state, images))
        return jax.export.export(closed, platforms=None if platforms is None else tuple(platforms))(spec)


def jit_inference(pure: Callable[[nnx.State, Array], Any], state: nnx.State, **jit_kwargs: Any) -> InferenceFn:
    """`pure` jitted twice (see `InferenceFn`), with `jit_kwargs` (shardings) for both, bound to `state`."""
    platform = lowering.platform_of(state)
    return InferenceFn(jax.jit(pure, **jit_kwargs), state, lowering.jit(pure, platform, **jit_kwargs))


def inference_model(model: NormFreeNet) -> NormFreeNet:
    """A copy of `model` in eval mode with every conv's weight standardisation folded into its kernel.

    The copy holds no random state: in eval mode dropout and drop path never draw, so their
    streams are removed, and the state is weights only (arrays numpy can read and `jax.export`
    can close over; a PRNG key is neither).
    """
    folded = nnx.clone(model)
    folded.eval()
    for _, module in nnx.iter_modules(folded):
        if isinstance(module, ScaledStdConv2d):
            module.fold_standardization()
        for name, value in list(vars(module).items()):
            if isinstance(value, nnx.RngStream | nnx.Rngs):
                setattr(module, name, nnx.data(None))
    return folded


def compile_forward(model: NormFreeNet, forward: Callable[[NormFreeNet, Array], Any]) -> InferenceFn:
    """Jit `forward(model, images)` as a pure function of the folded model's state."""
    graphdef, state = nnx.split(inference_model(model))

    def apply(state: nnx.State, images: Array) -> Any:
        return forward(nnx.merge(graphdef, state), images)

    return jit_inference(apply, state)


def classifier(model: NormFreeNet) -> InferenceFn:
    """images (N, H, W, C) -> logits (N, num_classes), as `model(images)`."""
    return compile_forward(model, lambda m, x: m(x))


def embedder(model: NormFreeNet) -> InferenceFn:
    """images -> the pooled pre-logits embedding (N, model.head_hidden_size)."""
    return compile_forward(model, lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))


def feature_extractor(model: NormFreeNet, indices: int | Sequence[int] | None = None) -> InferenceFn:
    """images -> the list of NHWC feature maps at timm's taps `indices` (see `forward_intermediates`).

    Only the stages the deepest tap needs are run.
    """
    if indices is not None and not isinstance(indices, int):
        indices = tuple(indices)  # the compiled function must not follow later changes to the caller's list
    return compile_forward(model, lambda m, x: m.forward_intermediates(x, indices, intermediates_only=True))


def enable_compilation_cache(folder: str | os.PathLike) -> None:
    """Keep every compiled executable in `folder` (JAX's persistent compilation cache) for later processes.

    Call it before the first compilation: JAX sets the cache up once per process. Entries are
    keyed by the program, the input shapes, the backend and the jax version, so a changed model
    or shape simply compiles again. JAX's default skips computations that compiled in under a
    second; here everything is kept, so small models and batch shapes start fast too.
    """
    folder = os.path.expanduser(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
