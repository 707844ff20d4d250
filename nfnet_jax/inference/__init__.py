"""Pure, jitted inference: the weights prepared once, then one compiled function per kind of output.

    classify = nfnet_jax.inference.classifier(model)     # images (N, H, W, C) -> logits
    logits = classify(images)                             # compiled on the first call per shape/dtype

Each builder copies the model into eval mode with every conv's weight standardisation folded into
its kernel, so no call recomputes it (the model passed in is untouched), and returns an
`InferenceFn`: `fn(images)` is a jitted call, `fn.apply(fn.state, images)` the same pure function
for code that places, shards or nests it, and `fn.export(shape)` a `jax.export.Exported` with the
weights inside. Any NNX module with an NFNet inside works; `compile_forward(model, forward)` jits
any other output. `enable_compilation_cache(folder)` lets later processes skip compilation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import jax
import jax.extend.core
import jax.numpy as jnp
from flax import nnx

from nfnet_jax import cpu
from nfnet_jax.models.features import FeatureListNet
from nfnet_jax.models.layers import Array, ScaledStdConv2d
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.weights.params import clone_with_own_arrays

M = TypeVar('M', bound=nnx.Module)


@dataclass(frozen=True)
class InferenceFn:
    """A jitted pure function of (state, images) bound to its prepared state.

    `apply` is jitted with XLA's default options, so it can be nested in other jits and
    exported; `compiled` is the same function as a top-level jit, which with the CPU backend on
    takes its compiler options and runs a large batch in chunks (`cpu.in_chunks`); without it, the
    same program as `apply`. A call runs `compiled`, or `apply` when it is traced inside another jit.
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


def jit_inference(
    pure: Callable[[nnx.State, Array], Any], state: nnx.State, per_image: bool = False, **jit_kwargs: Any
) -> InferenceFn:
    """`pure` jitted twice (see `InferenceFn`), with `jit_kwargs` (shardings) for both, bound to `state`.

    `per_image`: `pure` computes every image on its own, so `compiled` may run a large batch in
    chunks on CPU (`cpu.in_chunks`).
    """
    top_level = cpu.in_chunks(pure) if per_image else pure
    compiled = jax.jit(top_level, compiler_options=cpu.compiler_options(), **jit_kwargs)
    return InferenceFn(jax.jit(pure, **jit_kwargs), state, compiled)


def inference_model(model: M) -> M:
    """A copy of `model` in eval mode with every conv's weight standardisation folded into its kernel.

    `model` is any NNX module: the NFNets inside a model of your own are folded too. The copy holds
    no random state: in eval mode dropout and drop path never draw, so their streams are removed,
    and the state is weights only (arrays numpy can read and `jax.export` can close over; a PRNG
    key is neither).
    """
    folded = clone_with_own_arrays(model)  # it outlives steps that donate the model's arrays
    folded.eval()
    for _, module in nnx.iter_modules(folded):
        if isinstance(module, ScaledStdConv2d):
            module.fold_standardization()
        for name, value in list(vars(module).items()):
            if isinstance(value, nnx.RngStream | nnx.Rngs):
                setattr(module, name, nnx.data(None))
    return folded


def compile_forward(model: M, forward: Callable[[M, Array], Any], per_image: bool = True) -> InferenceFn:
    """Jit `forward(model, images)` as a pure function of the folded model's state.

    `model` is any NNX module (an NFNet, or a model of your own with NFNets inside); `forward`
    receives its folded copy in eval mode and may call any of its methods, e.g.
    `compile_forward(net, lambda m, x: m.neck(m.backbone.forward_intermediates(x, intermediates_only=True)))`.
    `per_image`: `forward` computes every image on its own (true of every NFNet in eval mode), so
    a call on CPU may run a large batch in chunks (`cpu.in_chunks`); pass False if it mixes images.
    """
    graphdef, state = nnx.split(inference_model(model))

    def apply(state: nnx.State, images: Array) -> Any:
        return forward(nnx.merge(graphdef, state), images)

    return jit_inference(apply, cast_once(apply, state, _channels(model)), per_image)


def cast_once(apply: Callable[[nnx.State, Array], Any], state: nnx.State, channels: int) -> nnx.State:
    """`state` with every weight that `apply` only ever uses cast to one dtype stored in that dtype.

    A model computing in bfloat16 keeps float32 params and casts them on every call; a weight whose
    every use is that cast gives the same numbers cast once here, and the program no longer converts
    it (nor reads its float32 bytes) on each call. Found by tracing `apply` (no compilation) on a
    small batch of `channels`-channel images; weights used any other way, and a float32 model's, stay as they are.
    """
    arrays, treedef = jax.tree.flatten(state)
    images = jax.ShapeDtypeStruct((1, 64, 64, channels), jnp.float32)
    closed = jax.make_jaxpr(lambda arrays, images: apply(jax.tree.unflatten(treedef, arrays), images))(arrays, images)
    jaxpr = closed.jaxpr
    weights = jaxpr.invars[: len(arrays)]
    uses: dict[Any, list[Any]] = {var: [] for var in weights}
    for equation in jaxpr.eqns:
        for var in equation.invars:
            if isinstance(var, jax.extend.core.Var) and var in uses:
                uses[var].append(equation)
    for var in jaxpr.outvars:
        if isinstance(var, jax.extend.core.Var) and var in uses:
            uses[var].append(None)  # returned as it is
    for index, var in enumerate(weights):
        casts = {e.params['new_dtype'] if e and e.primitive.name == 'convert_element_type' else None for e in uses[var]}
        if len(casts) == 1 and None not in casts:
            arrays[index] = arrays[index].astype(casts.pop())
    return jax.tree.unflatten(treedef, arrays)


def _channels(model: nnx.Module) -> int:
    """The image channels the model's NFNet takes (3 when it holds none, or several)."""
    try:
        net = submodule(model, backbone_path(model))
    except ValueError:
        return 3
    return (net.backbone if isinstance(net, FeatureListNet) else net).in_chans


def classifier(model: nnx.Module) -> InferenceFn:
    """images (N, H, W, C) -> logits (N, num_classes), as `model(images)`; any NNX module that returns logits."""
    return compile_forward(model, lambda m, x: m(x))


def backbone_path(model: nnx.Module) -> str:
    """The path of the one NFNet (or features_only model) in `model`: '' for the model itself."""
    if isinstance(model, (NormFreeNet, FeatureListNet)):
        return ''
    found = {path: m for path, m in nnx.iter_modules(model) if isinstance(m, (NormFreeNet, FeatureListNet))}
    # A FeatureListNet holds its NormFreeNet: the outermost one is the backbone.
    outer = [path for path in found if not any(path[: len(p)] == p and path != p for p in found)]
    if len(outer) != 1:
        what = 'no NFNet' if not outer else f'{len(outer)} NFNets ({", ".join(".".join(map(str, p)) for p in outer)})'
        raise ValueError(
            f'{type(model).__name__} holds {what}; pass the NFNet itself, or say what to compute with '
            'compile_forward(model, lambda m, x: ...)'
        )
    return '.'.join(map(str, outer[0]))


def submodule(model: nnx.Module, path: str) -> Any:
    for key in path.split('.') if path else ():
        model = model[int(key)] if key.isdigit() else getattr(model, key)
    return model


def embedder(model: nnx.Module) -> InferenceFn:
    """images -> the pooled pre-logits embedding (N, head_hidden_size) of the model's NFNet.

    A model of your own holding one NFNet gives that NFNet's embedding (what its own head reads,
    if that head takes the pooled features).
    """
    path = backbone_path(model)
    if isinstance(submodule(model, path), FeatureListNet):
        raise ValueError('a features_only model has no pooled embedding: use feature_extractor')

    def embed(m: nnx.Module, x: Array) -> Array:
        net = submodule(m, path)
        return net.forward_head(net.forward_features(x), pre_logits=True)

    return compile_forward(model, embed)


def feature_extractor(model: nnx.Module, indices: int | Sequence[int] | None = None) -> InferenceFn:
    """images -> the list of NHWC feature maps at timm's taps `indices` (see `forward_intermediates`).

    Only the stages the deepest tap needs are run. A features_only model (`FeatureListNet`)
    gives the taps it was built with (`indices` must then be None), and a model of your own
    holding one NFNet gives that NFNet's taps.
    """
    path = backbone_path(model)
    if isinstance(submodule(model, path), FeatureListNet):
        if indices is not None:
            raise ValueError(
                'a features_only model returns the taps it was built with (its out_indices): '
                'leave indices=None, or build it with create_model(..., out_indices=...)'
            )
        return compile_forward(model, lambda m, x: submodule(m, path)(x))
    if indices is not None and not isinstance(indices, int):
        indices = tuple(indices)  # the compiled function must not follow later changes to the caller's list
    return compile_forward(
        model, lambda m, x: submodule(m, path).forward_intermediates(x, indices, intermediates_only=True)
    )


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


OUTPUTS = ('logits', 'embeddings', 'features')  # what `for_output` and `export_inference` compute
BATCH_SYMBOL = 'batch'  # the symbolic batch dimension of an artifact for any batch size


def for_output(model: NormFreeNet, output: str = 'logits') -> InferenceFn:
    """The inference function of `output`: 'logits', 'embeddings' (pooled pre-logits) or 'features' (every tap)."""
    builders = {
        'logits': classifier,
        'embeddings': embedder,
        'features': feature_extractor,
    }
    if output not in builders:
        raise ValueError(f'unknown output {output!r}; choose one of {OUTPUTS}')
    return builders[output](model)


def export_inference(
    model: NormFreeNet,
    *,
    output: str = 'logits',
    batch: int | None = 1,
    size: int | tuple[int, int] | None = None,
    platforms: Sequence[str] | None = None,
) -> jax.export.Exported:
    """`model`'s inference function of `output` as a `jax.export.Exported`, weights included.

    Its one argument is float32 images (batch, H, W, in_chans): `batch=None` takes any batch size
    (a symbolic dimension), `size` is H and W (default: the model's pretrained input size).
    `platforms` as `jax.export` takes them (default: the default backend's). The compute dtype
    and the conv/matmul precision are the model's (`create_model(..., dtype=, precision=)`).
    `exported.serialize()` is the artifact's bytes.
    """
    if batch is not None and batch < 1:
        raise ValueError(f'batch must be at least 1 (or None for any), not {batch}')
    height, width = default_size(model) if size is None else (size, size) if isinstance(size, int) else size
    shape = (BATCH_SYMBOL if batch is None else batch, height, width, model.in_chans)
    return for_output(model, output).export(shape, jnp.float32, platforms)


def default_size(model: NormFreeNet) -> tuple[int, int]:
    """The (H, W) the model's pretrained weights were trained at (timm's `input_size`)."""
    cfg = model.pretrained_cfg
    return (224, 224) if cfg is None else tuple(cfg.input_size[1:])
