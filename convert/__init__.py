"""Weight conversion between timm (PyTorch) and nfnet_jax (Flax): the `python -m convert.from_timm` command.

The conversion itself lives in `nfnet_jax.weights`; `convert.from_timm` and `convert.to_timm`
re-export it for code written against them.
"""
