"""`FinetuneConfig`: what a fine-tuning run computes, as `python -m nfnet_jax.finetune`'s flags say it.

Each field is one of the command's flags by its argparse name (`--batch-size` is `batch_size`),
with the flag's default. A config is checked when it is made, so the command and a Python caller
get the same one-line errors, named by the flags, before any work starts. What may change
between a run and its resume without changing what it computes (the run directory, `resume`, the
input workers, the CPU memory and multi-host settings) is not part of it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.train.optim import OPTIMIZERS


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run's data, model, recipe and augmentation (see docs/finetune.md for each flag).

    Paths may be given as strings; `scale` and `ratio` as any pair. Exactly one of `model`
    (NAME.TAG: hub weights; NAME: fresh weights, or the default tag's with `pretrained`) and
    `checkpoint` (a converted .safetensors file) names the starting weights.
    """

    data: Path
    val: Path | None = None
    val_split: float | None = None
    model: str | None = None
    checkpoint: Path | None = None
    pretrained: bool = False
    image_size: int | None = None
    drop: float = 0.0
    drop_path: float | None = None
    bf16: bool = False
    epochs: int = 300
    batch_size: int = 128
    opt: str = 'sgd'
    lr: float | None = None
    lr_base: float = 0.1
    lr_base_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 2e-5
    warmup_epochs: float = 5
    clip_grad: float = 0.01
    ema_decay: float = 0.9998
    smoothing: float = 0.1
    aa: str | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    train_interpolation: str = 'random'
    reprob: float = 0.0
    remode: str = 'pixel'
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    seed: int = 42
    checkpoint_hist: int = 10
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ('data', 'val', 'checkpoint'):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(os.fspath(value)))
        for name in ('scale', 'ratio'):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        self.check()

    def check(self) -> None:
        """Raise a ValueError naming the flag for a value that cannot run, whatever the data and the machine."""
        for name in ('epochs', 'batch_size', 'lr_base_size', 'recount'):
            if getattr(self, name) <= 0:
                raise ValueError(f'--{_flag(name)} must be positive')
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError('--image-size must be positive')
        if self.opt not in OPTIMIZERS:
            raise ValueError(f'--opt {self.opt!r} is not one of {", ".join(OPTIMIZERS)}')
        for name in ('scale', 'ratio'):
            if len(getattr(self, name)) != 2:
                raise ValueError(f'--{name} takes two numbers, got {list(getattr(self, name))}')
        self.check_ranges()
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError('Mixup and CutMix need an even --batch-size')
        if self.val is not None and self.val_split is not None:
            raise ValueError('pass --val or --val-split, not both')
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs:
            raise ValueError(f'--warmup-epochs ({self.warmup_epochs}) must be in [0, --epochs ({self.epochs}))')
        if (self.model is None) == (self.checkpoint is None):
            raise ValueError('pass one of --model and --checkpoint: the weights to start from')
        if self.model is not None:
            resolve_name(self.model)
        if self.pretrained and (self.model is None or '.' in self.model):
            raise ValueError('--pretrained goes with --model NAME (a NAME.TAG is pretrained already)')

    def check_ranges(self) -> None:
        """Every number within the range that can run: checked here, before a run folder is written, rather
        than by the first batch or step that trips over it."""
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in numbers.items():
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ValueError(f'--{_flag(name)} must be a finite number, got {value}')
        (low, high), (ratio_low, ratio_high) = self.scale, self.ratio
        if not 0 < low <= high <= 1:
            raise ValueError(f'--scale {low} {high}: the crop area range needs 0 < low <= high <= 1')
        if not 0 < ratio_low <= ratio_high:
            raise ValueError(f'--ratio {ratio_low} {ratio_high}: the aspect ratio range needs 0 < low <= high')
        if not 0 <= self.smoothing < 1:
            raise ValueError(f'--smoothing {self.smoothing} must be in [0, 1)')
        for name in ('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'drop', 'drop_path', 'momentum'):
            value = numbers[name]
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f'--{_flag(name)} {value} must be in [0, 1]')
        if self.val_split is not None and not 0 < self.val_split < 1:
            raise ValueError(f'--val-split {self.val_split} must be between 0 and 1 (a fraction of each class)')
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f'--ema-decay {self.ema_decay} must be in [0, 1) (0: no EMA)')
        for name in ('lr', 'lr_base', 'weight_decay', 'clip_grad', 'color_jitter', 'mixup', 'cutmix'):
            value = numbers[name]
            if value is not None and value < 0:
                raise ValueError(f'--{_flag(name)} {value} must not be negative')

    def flags(self) -> dict[str, Any]:
        """The fields as JSON values (paths as strings, pairs as lists), in the command's flag order."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _flag(name: str) -> str:
    """A field's flag name: `batch_size` -> `batch-size`."""
    return name.replace('_', '-')
