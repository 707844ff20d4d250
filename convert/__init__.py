"""Weight conversion between timm (PyTorch) and nfnet_jax (Flax): the `python -m convert.from_timm` command.

The conversion itself is library code, in `nfnet_jax.weights` (`convert_state_dict`, `to_timm`); this package
holds the command and its check against timm (`verify`).
"""
