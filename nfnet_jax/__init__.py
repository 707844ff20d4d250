"""NFNets in Flax NNX, numerically faithful to timm."""

from nfnet_jax import data
from nfnet_jax.configs import NfCfg, model_cfgs
from nfnet_jax.cpu_memory import keep_cpu_memory
from nfnet_jax.factory import create_model, from_timm, list_models, load_checkpoint
from nfnet_jax.features import FeatureInfo, FeatureListNet
from nfnet_jax.lowering import compiler_options
from nfnet_jax.model import NormFreeBlock, NormFreeNet, Stem, count_params
from nfnet_jax.pretrained import PretrainedCfg, pretrained_cfgs
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
    'compiler_options',
    'count_params',
    'create_model',
    'data',
    'from_timm',
    'keep_cpu_memory',
    'list_models',
    'load_checkpoint',
    'model_cfgs',
    'pretrained_cfgs',
    'read_checkpoint',
    'save_checkpoint',
]
