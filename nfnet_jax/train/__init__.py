"""Training NFNets in Flax: timm's AGC, the paper's recipe, Mixup/CutMix, the train state, its step and checkpoints,
and fine-tuning as a function: `train_and_evaluate(FinetuneConfig(...), workdir)` (`nfnet_jax.train.loop`).

`train_and_evaluate` loads with its first use, not with this package: its loop needs grain (the
`finetune` extra) and builds on `nfnet_jax.parallel.train`, which imports this package's state and step.
"""

from __future__ import annotations

from typing import Any

from nfnet_jax.train.agc import adaptive_clip_grad, unitwise_norm
from nfnet_jax.train.checkpoint import TrainCheckpointer
from nfnet_jax.train.config import FinetuneConfig
from nfnet_jax.train.mixup import Mixup, mixup_target, soft_target_cross_entropy
from nfnet_jax.train.optim import cross_entropy_loss, nfnet_optimizer, warmup_cosine_schedule
from nfnet_jax.train.paths import (
    classifier_of,
    classifier_paths,
    is_bias_or_gain,
    is_classifier,
    is_gain,
    matches,
    path_mask,
)
from nfnet_jax.train.state import ModelEma, TrainState
from nfnet_jax.train.step import eval_step, eval_step_fn, train_step, train_step_fn
from nfnet_jax.weights.params import dotted_path

__all__ = [
    'FinetuneConfig',
    'Mixup',
    'ModelEma',
    'TrainCheckpointer',
    'TrainState',
    'adaptive_clip_grad',
    'classifier_of',
    'classifier_paths',
    'cross_entropy_loss',
    'dotted_path',
    'eval_step',
    'eval_step_fn',
    'is_bias_or_gain',
    'is_classifier',
    'is_gain',
    'matches',
    'mixup_target',
    'nfnet_optimizer',
    'path_mask',
    'soft_target_cross_entropy',
    'train_and_evaluate',
    'train_step',
    'train_step_fn',
    'unitwise_norm',
    'warmup_cosine_schedule',
]


def __getattr__(name: str) -> Any:
    """`train_and_evaluate`, imported when first asked for (see the module's docstring)."""
    if name == 'train_and_evaluate':
        from nfnet_jax.train.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
