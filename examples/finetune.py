"""Fine-tune an NFNet on scikit-learn's handwritten digits, from converted timm weights or from scratch.

    python examples/finetune.py --model dm_nfnet_f0 --checkpoint dm_nfnet_f0.safetensors --output-dir runs/f0
    python examples/finetune.py --model test_nfnet --steps 300 --output-dir runs/digits
    python examples/finetune.py ... --resume          # continue the run saved in --output-dir
    python examples/finetune.py ... --fsdp --distributed  # on every host of a TPU pod slice

The digits (1,797 8x8 grayscale images, 10 classes, shipped with scikit-learn, no download) are
written as PNG files upsampled to --image-size, in OUTPUT_DIR/digits, a stratified fifth held out
for testing. Then `nfnet_jax.train.train_and_evaluate` trains on them, the loop of
`python -m nfnet_jax.finetune`, with the run in OUTPUT_DIR/run: the classifier replaced by a fresh
10-class one, the NFNet recipe (SGD + Nesterov, AGC, warmup + cosine, weight decay off gains and
biases, label smoothing, an EMA of the weights), mild random crops. Every --eval-every steps the
model and its EMA are evaluated on the held-out fifth and the whole training state is
checkpointed, so --resume continues exactly where a run stopped.

An epoch of that loop is --eval-every steps here: the training list (OUTPUT_DIR/digits/train.tsv)
holds --eval-every x --batch-size rows (at least the 1,437 training digits), the training digits
in one seeded shuffle after another, and the run has --steps / --eval-every epochs.

Training runs on `nfnet_jax.parallel.train.ShardedTrainer` over a mesh of every device of every
process: each batch split along 'data' (each process reads its own rows), the state replicated,
or with --fsdp split too, so the same command runs on one CPU, a multi-GPU host or (once per
host, with --distributed) a TPU pod slice. --output-dir must then be on a filesystem that every
host sees.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from nfnet_jax.cli import (
    USER_ERRORS,
    add_cpu_arguments,
    add_distributed_arguments,
    apply_cpu_arguments,
    initialize_from_args,
)
from nfnet_jax.files import atomic_write
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.progress import log
from nfnet_jax.train import FinetuneConfig, train_and_evaluate
from nfnet_jax.weights import read_checkpoint_metadata

DIGITS, TEST_FRACTION = 1797, 0.2
TRAIN_DIGITS = DIGITS - math.ceil(DIGITS * TEST_FRACTION)  # as train_test_split rounds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='test_nfnet', help='architecture, e.g. dm_nfnet_f0, nf_regnet_b0')
    parser.add_argument('--checkpoint', type=Path, help='converted weights (python -m convert.from_timm ...)')
    parser.add_argument('--output-dir', type=Path, required=True, help='where the run keeps its checkpoints')
    parser.add_argument('--resume', action='store_true', help='continue the run saved in --output-dir')
    parser.add_argument('--steps', type=int, default=400, help='training steps, a multiple of --eval-every')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--image-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=0.1, help='peak learning rate')
    parser.add_argument('--warmup-steps', type=int, default=20)
    parser.add_argument('--weight-decay', type=float, default=2e-5)
    parser.add_argument('--clip-factor', type=float, default=0.01, help='AGC clip factor; 0 turns AGC off')
    parser.add_argument('--label-smoothing', type=float, default=0.1)
    parser.add_argument('--ema-decay', type=float, default=0.99)
    parser.add_argument('--drop-rate', type=float, default=0.0, help='dropout before the classifier')
    parser.add_argument('--drop-path-rate', type=float, default=0.0, help='stochastic depth of the last block')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='compute dtype')
    parser.add_argument('--eval-every', type=int, default=100, help='steps between evaluations and checkpoints')
    parser.add_argument('--keep', type=int, default=2, help='checkpoints to keep')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=0, help='grain processes decoding the digits (0: this one)')
    parser.add_argument('--fsdp', action='store_true', help='split params and optimizer state over the devices too')
    add_cpu_arguments(parser)
    add_distributed_arguments(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The example's own flags; the run's are checked by FinetuneConfig and train_and_evaluate."""
    for name in ('steps', 'batch_size', 'image_size', 'eval_every'):
        if getattr(args, name) <= 0:
            raise ValueError(f'--{name.replace("_", "-")} must be positive')
    if args.eval_every * args.batch_size < TRAIN_DIGITS:
        raise ValueError(
            f'--eval-every {args.eval_every} steps of --batch-size {args.batch_size} would leave out some of the '
            f'{TRAIN_DIGITS} training digits: evaluate every {-(-TRAIN_DIGITS // args.batch_size)} steps or more'
        )
    if args.steps % args.eval_every:
        raise ValueError(f'--steps ({args.steps}) must be a multiple of --eval-every ({args.eval_every})')
    if not 0 <= args.warmup_steps < args.steps:
        raise ValueError(f'--warmup-steps ({args.warmup_steps}) must be in [0, --steps ({args.steps}))')
    if args.checkpoint is not None and args.checkpoint.is_file():
        architecture = read_checkpoint_metadata(args.checkpoint)['architecture']
        if architecture != resolve_name(args.model)[0]:
            raise ValueError(f'--checkpoint {args.checkpoint} holds a {architecture}: pass --model {architecture}')


def config_of(args: argparse.Namespace, digits: Path) -> FinetuneConfig:
    """The run: the example's flags in the fine-tuning command's terms, one epoch being --eval-every steps."""
    warmup_epochs = args.warmup_steps / args.eval_every
    if int(warmup_epochs * args.eval_every) < args.warmup_steps:  # the loop counts int(epochs x steps per epoch)
        warmup_epochs = math.nextafter(warmup_epochs, math.inf)
    return FinetuneConfig(
        data=digits / 'train.tsv',
        val=digits / 'test.tsv',
        model=None if args.checkpoint else args.model,
        checkpoint=args.checkpoint,
        image_size=args.image_size,
        drop=args.drop_rate,
        drop_path=args.drop_path_rate,
        bf16=args.dtype == 'bfloat16',
        epochs=args.steps // args.eval_every,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=warmup_epochs,
        clip_grad=args.clip_factor,
        ema_decay=args.ema_decay,
        smoothing=args.label_smoothing,
        scale=(0.8, 1.0),  # mild random crops; no flips or colour jitter for digits
        hflip=0.0,
        color_jitter=0.0,
        seed=args.seed,
        checkpoint_hist=args.keep,
        fsdp=args.fsdp,
    )


def write_digits(folder: Path, image_size: int, rows_per_epoch: int, seed: int) -> int:
    """The digits as PNGs (`images/<class>/<index>.png`), the training list of `rows_per_epoch` rows and the
    test list; returns the number of test digits.

    The same arguments write the same files, each replaced whole: every process of a multi-host run
    writes them, and none ever reads a half file.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit('this example needs scikit-learn: pip install "nfnet-jax[examples]"') from None
    digits = load_digits()
    train, test = train_test_split(
        np.arange(len(digits.target)), test_size=TEST_FRACTION, random_state=seed, stratify=digits.target
    )
    rows = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        name = f'images/{label}/{index}.png'
        image = Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        atomic_write(folder / name, lambda tmp, image=image: image.save(tmp, format='PNG'), force=True)
        rows.append(f'{name}\t{label}\n')
    rng = np.random.default_rng(seed)
    shuffles = np.concatenate([rng.permutation(train) for _ in range(-(-rows_per_epoch // len(train)))])
    for list_name, indices in (('train.tsv', shuffles[:rows_per_epoch]), ('test.tsv', test)):
        text = ''.join(rows[i] for i in indices)
        atomic_write(folder / list_name, lambda tmp, text=text: Path(tmp).write_text(text), force=True)
    return len(test)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns `train_and_evaluate`'s final metrics."""
    args = parse_args(argv)
    initialize_from_args(args)  # joins a multi-host run: before any JAX computation
    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # before any JAX computation
    check_args(args)
    config = config_of(args, args.output_dir / 'digits')
    tested = write_digits(args.output_dir / 'digits', args.image_size, args.eval_every * args.batch_size, args.seed)
    result = train_and_evaluate(config, args.output_dir / 'run', resume=args.resume, workers=args.workers)
    if jax.process_index() == 0:
        log(
            f'final test accuracy {result["model"]["top1"]:.4f} (EMA {result["ema"]["top1"]:.4f}) '
            f'on {tested} held-out digits after {result["step"]} steps'
        )
    return result


if __name__ == '__main__':
    try:
        main()
    except USER_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
