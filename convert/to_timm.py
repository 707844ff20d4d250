"""nfnet_jax params back to a timm state dict (re-exported from `nfnet_jax.weights.timm`)."""

from nfnet_jax.weights.timm import to_timm

__all__ = ['to_timm']
