"""Fine-tune an NFNet on your own images: `python -m nfnet_jax.finetune --data DIR --model NAME.TAG --output RUN`.

`--data` is a folder with one sub-folder of images per class (timm's ImageFolder) or a list file
(`path<TAB>label` or CSV). Validation images come from `--val` or a seeded `--val-split` of the
training images. The head is replaced by one for the data's classes, and everything trains with
the NFNet recipe: AGC (the new head unclipped), SGD with Nesterov momentum or AdamW, warmup and
cosine decay, weight decay off biases and gains, label smoothing or Mixup/CutMix, an EMA of the
weights. The flags are timm's train.py flags, with its defaults where it has them.

Every epoch the model and its EMA are evaluated on the validation images (top-1, top-5, loss),
and the run directory gets:

    RUN/settings.json         the run's settings and data, checked by --resume
    RUN/metrics.jsonl         one JSON line per training step and per evaluation
    RUN/curves.png            loss and accuracy curves (needs matplotlib)
    RUN/checkpoints/<step>    the whole training state (orbax), one per epoch
    RUN/data_position/<step>.json   where the input pipeline stands at that step
    RUN/best.safetensors      the best weights so far (model or EMA), with the class names

`--resume` continues from the last checkpoint and sees exactly the batches an uninterrupted run
would have seen. `python -m nfnet_jax.predict --checkpoint RUN/best.safetensors IMAGES` then
prints the class names.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from nfnet_jax.cli import (
    add_cpu_arguments,
    add_distributed_arguments,
    add_model_arguments,
    apply_cpu_arguments,
    initialize_from_args,
    run_command,
)
from nfnet_jax.train import FinetuneConfig, train_and_evaluate
from nfnet_jax.train.loop import WORKERS
from nfnet_jax.train.optim import OPTIMIZERS

# The flags' defaults are FinetuneConfig's: one place says them.
CONFIG_DEFAULTS = {
    field.name: field.default
    for field in dataclasses.fields(FinetuneConfig)
    if field.default is not dataclasses.MISSING
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m nfnet_jax.finetune', description=__doc__.split(': ', 1)[0])
    data = parser.add_argument_group('data')
    data.add_argument('--data', type=Path, required=True, help='a folder of class folders, or a list file')
    data.add_argument('--val', type=Path, help='validation folder or list file (same classes)')
    data.add_argument('--val-split', type=float, help='hold out this fraction of --data, per class (default 0.1)')
    data.add_argument('--workers', type=int, default=WORKERS, help='grain worker processes decoding and augmenting')
    model = parser.add_argument_group('model')
    add_model_arguments(model, 'NAME.TAG: pretrained hub weights; NAME: fresh weights (or --pretrained)')
    model.add_argument('--pretrained', action='store_true', help="with --model NAME: the default tag's weights")
    model.add_argument('--image-size', type=int, help="training and validation size (default: the model's)")
    model.add_argument('--drop', type=float, help='dropout before the classifier')
    model.add_argument('--drop-path', type=float, help='stochastic depth rate')
    model.add_argument('--bf16', action='store_true', help='compute in bfloat16 (params and optimizer stay float32)')
    optim = parser.add_argument_group('optimizer and schedule')
    optim.add_argument('--epochs', type=int)
    optim.add_argument('--batch-size', '-b', type=int, help='global batch size, over every process')
    optim.add_argument('--opt', choices=OPTIMIZERS)
    optim.add_argument('--lr', type=float, help='peak learning rate (default: --lr-base scaled to the batch size)')
    optim.add_argument('--lr-base', type=float, help='learning rate per --lr-base-size images')
    optim.add_argument('--lr-base-size', type=int)
    optim.add_argument('--momentum', type=float)
    optim.add_argument('--weight-decay', type=float)
    optim.add_argument('--warmup-epochs', type=float)
    optim.add_argument('--clip-grad', type=float, help='AGC clip factor (0: off)')
    optim.add_argument('--ema-decay', '--model-ema-decay', type=float)
    optim.add_argument('--smoothing', type=float, help='label smoothing')
    aug = parser.add_argument_group('augmentation (timm create_transform, Mixup)')
    aug.add_argument('--aa', help='AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1')
    aug.add_argument('--scale', type=float, nargs=2, help='random resized crop area range')
    aug.add_argument('--ratio', type=float, nargs=2, help='crop aspect ratio range')
    aug.add_argument('--hflip', type=float)
    aug.add_argument('--vflip', type=float)
    aug.add_argument('--color-jitter', type=float)
    aug.add_argument('--train-interpolation')
    aug.add_argument('--reprob', type=float, help='random erasing probability')
    aug.add_argument('--remode')
    aug.add_argument('--recount', type=int)
    aug.add_argument('--mixup', type=float, help='Mixup alpha (0: off)')
    aug.add_argument('--cutmix', type=float, help='CutMix alpha (0: off)')
    aug.add_argument('--mixup-prob', type=float)
    aug.add_argument('--mixup-switch-prob', type=float)
    aug.add_argument('--mixup-mode')
    run = parser.add_argument_group('run')
    run.add_argument('--output', type=Path, required=True, help='the run directory')
    run.add_argument('--resume', action='store_true', help='continue the run in --output')
    run.add_argument('--seed', type=int)
    run.add_argument('--checkpoint-hist', type=int, help='training checkpoints to keep')
    run.add_argument('--fsdp', action='store_true', help='split params and optimizer state over the devices too')
    add_cpu_arguments(run)
    add_distributed_arguments(parser)
    parser.set_defaults(**CONFIG_DEFAULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, parse_args(argv))


def config_of(args: argparse.Namespace) -> FinetuneConfig:
    """The run's config: the flags that say what it computes (the others are how and where it runs)."""
    return FinetuneConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(FinetuneConfig)})


def _run(args: argparse.Namespace) -> int:
    config = config_of(args)
    initialize_from_args(args)  # joins a multi-host run: before any JAX computation
    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # before any JAX computation
    train_and_evaluate(config, args.output, resume=args.resume, workers=args.workers)
    return 0


if __name__ == '__main__':
    sys.exit(main())
