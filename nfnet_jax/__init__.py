"""NFNets in Flax NNX, numerically faithful to timm."""

from nfnet_jax import cpu, data
from nfnet_jax.factory import create_model, from_timm, list_models, load_checkpoint
from nfnet_jax.models.configs import NfCfg, model_cfgs
from nfnet_jax.models.features import FeatureInfo, FeatureListNet
from nfnet_jax.models.nfnet import NormFreeBlock, NormFreeNet, Stem, count_params
from nfnet_jax.models.pretrained import PretrainedCfg, pretrained_cfgs
from nfnet_jax.weights import CheckpointError, StateMismatchError, read_checkpoint, save_checkpoint

__version__ = '0.1.0'

__all__ = [
    'CheckpointError',
    'FeatureInfo',
    'FeatureListNet',
    'NfCfg',
    'NormFreeBlock',
    'NormFreeNet',
    'PretrainedCfg',
    'StateMismatchError',
    'Stem',
    'cpu',
    'count_params',
    'create_model',
    'data',
    'from_timm',
    'list_models',
    'load_checkpoint',
    'model_cfgs',
    'pretrained_cfgs',
    'read_checkpoint',
    'save_checkpoint',
]
