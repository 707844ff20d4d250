"""XLA compiler options for NFNet programs, chosen per platform.

Every jit in nfnet_jax that runs the model (the inference functions, the train and eval steps,
the sharded ones) passes `compiler_options(platform_of(state))`. Code that jits the model itself can do the same:

    forward = jax.jit(apply, compiler_options=nfnet_jax.compiler_options('cpu'))

XLA:CPU hands convolutions to YNNPACK by default. On NFNets' 3x3 convolutions (one per group,
see `layers.conv2d`) XLA's own Eigen convolutions are faster: 110-140 GFLOP/s against YNNPACK's
95-120 on the shapes of dm_nfnet_f0 at batch 8 on an AVX2 machine; for the whole network 7-8%
more images/s (batch 1 and 8) and a training step in 3.6 s instead of 4.6. So on CPU the list of
op kinds given to YNNPACK is XLA's default without convolutions: matmuls and reductions stay there.
Other platforms compile with XLA's defaults.
"""

from __future__ import annotations

from typing import Any

import jax

CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


def compiler_options(platform: str | None) -> dict[str, str] | None:
    """The options for `jax.jit(..., compiler_options=)` on `platform` ('cpu', 'gpu', 'tpu'); None: XLA's defaults."""
    return dict(CPU_OPTIONS) if platform == 'cpu' else None


def platform_of(tree: Any) -> str | None:
    """The platform of the first placed array in `tree`; the default backend if there is none.

    None inside a trace: a jit nested in another one may not take compiler options (those of
    the outermost jit apply to the whole program).
    """
    leaves = jax.tree.leaves(tree)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return None
    placed = (leaf for leaf in leaves if isinstance(leaf, jax.Array))
    first = next(placed, None)
    return jax.default_backend() if first is None else next(iter(first.devices())).platform
