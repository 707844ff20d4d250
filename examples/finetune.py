"""Fine-tune an NFNet on scikit-learn's handwritten digits, from converted timm weights or from scratch.

    python examples/finetune.py --model dm_nfnet_f0 --checkpoint dm_nfnet_f0.safetensors --output-dir runs/f0
    python examples/finetune.py --model test_nfnet --steps 300 --output-dir runs/digits
    python examples/finetune.py ... --resume          # continue the run saved in --output-dir
    python examples/finetune.py ... --fsdp --distributed  # on every host of a TPU pod slice

The digits (1,797 8x8 grayscale images, 10 classes, shipped with scikit-learn, no download) are
upsampled to --image-size, made RGB and normalised with the model's mean and std. The classifier
is replaced by a fresh 10-class one; everything trains with the NFNet recipe (SGD + Nesterov,
AGC, warmup + cosine, weight decay off gains and biases, label smoothing, an EMA of the
weights). Every --eval-every steps the model and its EMA are evaluated on the held-out fifth and
the whole training state is checkpointed, so --resume continues exactly where a run stopped.

Training runs on `nfnet_jax.parallel.train.ShardedTrainer` over a mesh of every device of every
process: each batch split along 'data' (each process feeds its own rows), the state replicated,
or with --fsdp split too, so the same command runs on one CPU, a multi-GPU host or (once per
host, with --distributed) a TPU pod slice. --output-dir must then be on a filesystem that every
host sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nfnet_jax
from nfnet_jax import parallel
from nfnet_jax.cli import (
    USER_ERRORS,
    add_cpu_arguments,
    add_distributed_arguments,
    apply_cpu_arguments,
    initialize_from_args,
    progress,
)
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.train import (
    TrainCheckpointer,
    TrainState,
    nfnet_optimizer,
    warmup_cosine_schedule,
)
from nfnet_jax.weights import CheckpointError

NUM_CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='test_nfnet', help='architecture, e.g. dm_nfnet_f0, nf_regnet_b0')
    parser.add_argument('--checkpoint', type=Path, help='converted weights (python -m convert.from_timm ...)')
    parser.add_argument('--output-dir', type=Path, required=True, help='where the run keeps its checkpoints')
    parser.add_argument('--resume', action='store_true', help='continue the run saved in --output-dir')
    parser.add_argument('--steps', type=int, default=400)
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
    parser.add_argument('--eval-every', type=int, default=100)
    parser.add_argument('--keep', type=int, default=2, help='checkpoints to keep')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--fsdp', action='store_true', help='split params and optimizer state over the devices too')
    parser.add_argument('--model-parallelism', type=int, default=1, help='devices splitting each big weight')
    add_cpu_arguments(parser)
    add_distributed_arguments(parser)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the command line, found before any work starts."""
    resolve_name(args.model)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise FileNotFoundError(f'no checkpoint at {args.checkpoint}')
    for name in ('steps', 'batch_size', 'image_size', 'eval_every'):
        if getattr(args, name) <= 0:
            raise ValueError(f'--{name.replace("_", "-")} must be positive')
    if args.batch_size % jax.device_count():
        raise ValueError(f'--batch-size {args.batch_size} must be divisible by the {jax.device_count()} devices')
    if args.warmup_steps >= args.steps:
        raise ValueError(f'--warmup-steps ({args.warmup_steps}) must be smaller than --steps ({args.steps})')
    has_checkpoints = args.output_dir.is_dir() and any(p.name.isdigit() for p in args.output_dir.iterdir())
    if has_checkpoints and not args.resume:
        raise FileExistsError(
            f'{args.output_dir} already holds checkpoints of a run: pass --resume to continue it, '
            'or choose another --output-dir'
        )
    if args.resume and not has_checkpoints:
        raise CheckpointError(f'--resume: no checkpoints in {args.output_dir}')


@dataclass
class Digits:
    """The digits as normalised NHWC float32 images, split 80/20 with every class in both parts."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int) -> Digits:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit('this example needs scikit-learn: pip install "nfnet-jax[examples]"') from None
    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # (N, 8, 8, 1) in [0, 1]
    images = jax.image.resize(images, (len(images), image_size, image_size, 1), method='bilinear')
    images = (np.repeat(np.asarray(images), 3, axis=-1) - np.float32(mean)) / np.float32(std)
    split = train_test_split(
        images, digits.target.astype(np.int32), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return Digits(*split[0::2], *split[1::2])


def build_model(args: argparse.Namespace, rngs: nnx.Rngs) -> NormFreeNet:
    """The backbone (converted or fresh) with a fresh 10-class classifier."""
    kwargs: dict[str, Any] = dict(
        drop_rate=args.drop_rate,
        drop_path_rate=args.drop_path_rate,
        dtype=jnp.bfloat16 if args.dtype == 'bfloat16' else None,
        rngs=rngs,
    )
    if args.checkpoint is None:
        return nfnet_jax.create_model(args.model, num_classes=NUM_CLASSES, **kwargs)
    model = nfnet_jax.create_model(args.model, checkpoint_path=args.checkpoint, **kwargs)
    model.reset_classifier(NUM_CLASSES, rngs=rngs)
    return model


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """The examples of a step: a fresh shuffle every epoch, a function of (seed, step) only, so a
    resumed run sees the same batches as an uninterrupted one."""
    epoch, offset = divmod(step * batch_size, num_examples)
    order = np.concatenate([np.random.default_rng((seed, epoch + i)).permutation(num_examples) for i in (0, 1)])
    return order[offset : offset + batch_size]


def evaluate(
    trainer: ShardedTrainer, model: nnx.Module, images: np.ndarray, labels: np.ndarray, batch_size: int
) -> dict[str, float]:
    """Accuracy and mean loss over a whole split, in padded batches of one shape."""
    pad = -len(images) % batch_size
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.full(pad, -1, labels.dtype)])
    totals = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
    mine = parallel.process_rows(batch_size)
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        metrics = trainer.eval_step(images[batch][mine], labels[batch][mine], model)
        for key in totals:
            totals[key] += metrics[key].item()
    return {'accuracy': totals['correct'] / totals['count'], 'loss': totals['loss_sum'] / totals['count']}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns the history (train losses, evaluations, final accuracies)."""
    args = parse_args(argv)
    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # before any JAX computation
    initialize_from_args(args)
    check_args(args)
    start_time = time.perf_counter()
    rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1)
    model = build_model(args, rngs)
    cfg = model.pretrained_cfg
    data = load_digits(args.image_size, cfg.mean, cfg.std, args.seed)

    schedule = warmup_cosine_schedule(args.lr, args.steps, args.warmup_steps)
    tx = nfnet_optimizer(schedule, weight_decay=args.weight_decay, clip_factor=args.clip_factor or None)
    state = TrainState(model, tx, ema_decay=args.ema_decay)

    mesh = parallel.make_mesh(args.model_parallelism)
    trainer = ShardedTrainer(state, mesh, fsdp=args.fsdp, label_smoothing=args.label_smoothing)
    mine = parallel.process_rows(args.batch_size)
    leader = jax.process_index() == 0  # the one process that reports

    history: dict[str, Any] = {'train_loss': [], 'evals': []}
    with TrainCheckpointer(args.output_dir, max_to_keep=args.keep) as checkpointer:
        if args.resume:
            print(f'resuming from step {checkpointer.restore(state)} of {args.output_dir}', file=sys.stderr)

        def evaluate_and_save() -> None:
            step = state.step
            result = {'step': step}
            for label, eval_model in (('model', state.model), ('ema', state.eval_model)):
                eval_model.eval()
                result[label] = evaluate(trainer, eval_model, data.test_images, data.test_labels, args.batch_size)
            state.model.train()
            history['evals'].append(result)
            if leader:
                bar.write(
                    f'step {step}: test accuracy {result["model"]["accuracy"]:.3f} '
                    f'(EMA {result["ema"]["accuracy"]:.3f}), test loss {result["model"]["loss"]:.3f}'
                )
            if step not in checkpointer.steps():
                checkpointer.save(state)

        state.model.train()
        bar = progress(range(state.step, args.steps), desc=f'fine-tuning {args.model}', unit='step', disable=not leader)
        for step in bar:
            batch = batch_indices(step, len(data.train_images), args.batch_size, args.seed)[mine]
            metrics = trainer.train_step(data.train_images[batch], data.train_labels[batch])
            loss = metrics['loss'].item()
            history['train_loss'].append(loss)
            bar.set_postfix(loss=f'{loss:.3f}', lr=f'{float(schedule(step)):.3g}')
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                evaluate_and_save()
        if not history['evals']:  # resumed at the last step: nothing left to train
            evaluate_and_save()
        checkpointer.wait()

    final = history['evals'][-1]
    history |= {'final_accuracy': final['model']['accuracy'], 'final_ema_accuracy': final['ema']['accuracy']}
    history['seconds'] = time.perf_counter() - start_time
    if leader:
        print(
            f'final test accuracy {final["model"]["accuracy"]:.4f} (EMA {final["ema"]["accuracy"]:.4f}) '
            f'on {len(data.test_labels)} held-out digits after {state.step} steps, {history["seconds"]:.0f} s',
            file=sys.stderr,
        )
    return history


if __name__ == '__main__':
    try:
        main()
    except USER_ERRORS as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
