"""Weight conversion between timm (PyTorch) and nfnet_jax (Flax).

`convert.from_timm` (library and command) goes from timm to Flax, `convert.to_timm` back;
`convert.table` is the one mapping both use.
"""
