"""Weight conversion between timm (PyTorch) and nfnet_jax (Flax)."""

from convert.from_timm import convert_state_dict, from_timm, read_timm_checkpoint
from convert.to_timm import to_timm

__all__ = ['convert_state_dict', 'from_timm', 'read_timm_checkpoint', 'to_timm']
