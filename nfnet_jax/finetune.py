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
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfnet_jax import parallel
from nfnet_jax.cli import (
    add_cpu_arguments,
    add_distributed_arguments,
    add_model_arguments,
    apply_cpu_arguments,
    check_model_arguments,
    initialize_from_args,
    log,
    progress,
    run_command,
)
from nfnet_jax.data import create_transform, loaders, resolve_model_data_config
from nfnet_jax.factory import create_model
from nfnet_jax.files import atomic_write
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.train import Mixup, TrainCheckpointer, TrainState, nfnet_optimizer, warmup_cosine_schedule
from nfnet_jax.train.optim import OPTIMIZERS
from nfnet_jax.weights import CheckpointError, read_checkpoint_metadata, save_checkpoint
from nfnet_jax.weights.params import flat_state

# Flags that do not change what the run computes: they may differ on --resume.
NOT_SETTINGS = {
    'resume',
    'workers',
    'output',
    'keep_cpu_memory',
    'distributed',
    'coordinator',
    'num_processes',
    'process_id',
}
SETTINGS, METRICS, PLOT, BEST = 'settings.json', 'metrics.jsonl', 'curves.png', 'best.safetensors'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m nfnet_jax.finetune', description=__doc__.split(': ', 1)[0])
    data = parser.add_argument_group('data')
    data.add_argument('--data', type=Path, required=True, help='a folder of class folders, or a list file')
    data.add_argument('--val', type=Path, help='validation folder or list file (same classes)')
    data.add_argument('--val-split', type=float, help='hold out this fraction of --data, per class (default 0.1)')
    data.add_argument('--workers', type=int, default=4, help='grain worker processes decoding and augmenting')
    model = parser.add_argument_group('model')
    add_model_arguments(model, 'NAME.TAG: pretrained hub weights; NAME: fresh weights (or --pretrained)')
    model.add_argument('--pretrained', action='store_true', help="with --model NAME: the default tag's weights")
    model.add_argument('--image-size', type=int, help="training and validation size (default: the model's)")
    model.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier')
    model.add_argument('--drop-path', type=float, help='stochastic depth rate')
    model.add_argument('--bf16', action='store_true', help='compute in bfloat16 (params and optimizer stay float32)')
    optim = parser.add_argument_group('optimizer and schedule')
    optim.add_argument('--epochs', type=int, default=300)
    optim.add_argument('--batch-size', '-b', type=int, default=128, help='global batch size, over every process')
    optim.add_argument('--opt', choices=OPTIMIZERS, default='sgd')
    optim.add_argument('--lr', type=float, help='peak learning rate (default: --lr-base scaled to the batch size)')
    optim.add_argument('--lr-base', type=float, default=0.1, help='learning rate per --lr-base-size images')
    optim.add_argument('--lr-base-size', type=int, default=256)
    optim.add_argument('--momentum', type=float, default=0.9)
    optim.add_argument('--weight-decay', type=float, default=2e-5)
    optim.add_argument('--warmup-epochs', type=float, default=5)
    optim.add_argument('--clip-grad', type=float, default=0.01, help='AGC clip factor (0: off)')
    optim.add_argument('--ema-decay', '--model-ema-decay', type=float, default=0.9998)
    optim.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    aug = parser.add_argument_group('augmentation (timm create_transform, Mixup)')
    aug.add_argument('--aa', help='AutoAugment / RandAugment policy, e.g. rand-m9-mstd0.5-inc1')
    aug.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random resized crop area range')
    aug.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), help='crop aspect ratio range')
    aug.add_argument('--hflip', type=float, default=0.5)
    aug.add_argument('--vflip', type=float, default=0.0)
    aug.add_argument('--color-jitter', type=float, default=0.4)
    aug.add_argument('--train-interpolation', default='random')
    aug.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    aug.add_argument('--remode', default='pixel')
    aug.add_argument('--recount', type=int, default=1)
    aug.add_argument('--mixup', type=float, default=0.0, help='Mixup alpha (0: off)')
    aug.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (0: off)')
    aug.add_argument('--mixup-prob', type=float, default=1.0)
    aug.add_argument('--mixup-switch-prob', type=float, default=0.5)
    aug.add_argument('--mixup-mode', default='batch')
    run = parser.add_argument_group('run')
    run.add_argument('--output', type=Path, required=True, help='the run directory')
    run.add_argument('--resume', action='store_true', help='continue the run in --output')
    run.add_argument('--seed', type=int, default=42)
    run.add_argument('--checkpoint-hist', type=int, default=10, help='training checkpoints to keep')
    run.add_argument('--fsdp', action='store_true', help='split params and optimizer state over the devices too')
    add_cpu_arguments(run)
    add_distributed_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(_run, parse_args(argv))


def check_args(args: argparse.Namespace) -> None:
    """The command line's own errors, found before anything is read."""
    for name in ('epochs', 'batch_size', 'lr_base_size', 'recount'):
        if getattr(args, name) <= 0:
            raise ValueError(f'--{name.replace("_", "-")} must be positive')
    if args.image_size is not None and args.image_size <= 0:
        raise ValueError('--image-size must be positive')
    if args.workers < 0:
        raise ValueError('--workers must be 0 or more')
    if args.batch_size % jax.device_count():
        raise ValueError(f'--batch-size {args.batch_size} must be a multiple of the {jax.device_count()} devices')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ValueError('Mixup and CutMix need an even --batch-size')
    if args.val is not None and args.val_split is not None:
        raise ValueError('pass --val or --val-split, not both')
    if args.warmup_epochs < 0 or args.warmup_epochs >= args.epochs:
        raise ValueError(f'--warmup-epochs ({args.warmup_epochs}) must be in [0, --epochs ({args.epochs}))')
    check_model_arguments(args)
    if args.pretrained and (args.model is None or '.' in args.model):
        raise ValueError('--pretrained goes with --model NAME (a NAME.TAG is pretrained already)')


def read_data(args: argparse.Namespace) -> tuple[loaders.Samples, loaders.Samples]:
    """The training and validation samples, checked: enough classes, every class readable."""
    train = loaders.read_samples(args.data)
    if args.val is not None:
        val = loaders.read_samples(args.val, class_names=train.class_names)
    else:
        train, val = loaders.split(train, 0.1 if args.val_split is None else args.val_split, args.seed)
    loaders.check_samples(train, f'--data {args.data}')
    loaders.check_samples(val, 'the validation images', min_classes=1)
    return train, val


def settings_of(args: argparse.Namespace, train: loaders.Samples, val: loaders.Samples) -> dict[str, Any]:
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in NOT_SETTINGS}
    flags = {k: list(v) if isinstance(v, tuple) else v for k, v in flags.items()}
    data = {'train_images': len(train), 'val_images': len(val), 'class_names': list(train.class_names)}
    return {'flags': flags, 'data': data, 'processes': jax.process_count(), 'devices': jax.device_count()}


def check_output(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Refuse to start over another run, and to resume a run with other settings (naming each difference)."""
    out = args.output
    if out.exists() and not out.is_dir():
        raise FileExistsError(f'--output {out} is a file; the run needs a directory')
    occupied = out.is_dir() and any(out.iterdir())
    if not args.resume:
        if occupied:
            raise FileExistsError(
                f'--output {out} already holds files (another run?): pass --resume to continue that run, '
                'or choose another --output'
            )
        return
    if not (out / SETTINGS).is_file():
        raise CheckpointError(f'--resume: {out} holds no run ({SETTINGS} is missing)')
    saved = json.loads((out / SETTINGS).read_text())
    differences = []
    for key in sorted(set(saved['flags']) | set(settings['flags'])):
        before, now = saved['flags'].get(key), settings['flags'].get(key)
        if before != now:
            differences.append(f'--{key.replace("_", "-")} was {before}, now {now}')
    for key, value in settings['data'].items():
        if saved['data'].get(key) != value:
            differences.append(f'the data changed: {key} was {_short(saved["data"].get(key))}, now {_short(value)}')
    if differences:
        raise ValueError(f'--resume: this command differs from the run in {out}: ' + '; '.join(differences))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + '...'


def model_name(args: argparse.Namespace) -> str:
    if args.checkpoint is not None:
        metadata = read_checkpoint_metadata(args.checkpoint)
        return metadata.get('model_name') or metadata['architecture']
    return resolve_name(args.model)[1].name if args.pretrained else args.model


def build_model(args: argparse.Namespace, num_classes: int, fresh: bool) -> NormFreeNet:
    """The backbone with a fresh head for `num_classes`; `fresh` skips loading weights (a resume overwrites them)."""
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes,
        drop_rate=args.drop,
        dtype=jnp.bfloat16 if args.bf16 else None,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
    )
    if args.drop_path is not None:
        kwargs['drop_path_rate'] = args.drop_path
    name = model_name(args)
    if fresh:
        return create_model(name, **kwargs)
    if args.checkpoint is not None:
        return create_model(name, checkpoint_path=args.checkpoint, **kwargs)
    return create_model(name, pretrained=args.pretrained or '.' in args.model, **kwargs)


class Metrics:
    """RUN/metrics.jsonl, written by process 0: one line per record, flushed."""

    def __init__(self, path: Path, keep_up_to_step: int | None, leader: bool):
        self.path, self.leader = path, leader
        self.records: list[dict[str, Any]] = []
        if keep_up_to_step is not None and path.is_file():  # a resumed run: drop what came after its checkpoint
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if record['step'] <= keep_up_to_step:
                    self.records.append(record)
        if leader:
            text = ''.join(json.dumps(r) + '\n' for r in self.records)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=True)
            self.file = open(path, 'a')  # noqa: SIM115 (kept open for the run)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.leader:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()

    def best(self) -> float:
        evals = [r for r in self.records if r['kind'] == 'eval']
        return max((max(r['model']['top1'], r['ema']['top1']) for r in evals), default=-1.0)


def plot_curves(records: list[dict[str, Any]], path: Path) -> str | None:
    """Loss and accuracy curves as a PNG; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return f'no {path.name}: install matplotlib for the loss and accuracy plot'
    train = [r for r in records if r['kind'] == 'train']
    evals = [r for r in records if r['kind'] == 'eval']
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot([r['step'] for r in train], [r['loss'] for r in train], lw=0.6, label='train')
    loss_ax.plot([r['step'] for r in evals], [r['model']['loss'] for r in evals], 'o-', label='validation')
    loss_ax.set(xlabel='step', ylabel='loss', title='loss')
    for which in ('model', 'ema'):
        acc_ax.plot([r['step'] for r in evals], [r[which]['top1'] for r in evals], 'o-', label=f'{which} top-1')
    acc_ax.set(xlabel='step', ylabel='validation accuracy', title='validation top-1', ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=100), force=True)
    plt.close(fig)
    return None


def gathered_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's params as numpy, gathered from every process (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    params = {}
    for path, var in flat_state(model, nnx.Param):
        value = var[...]
        if not value.is_fully_addressable:
            value = multihost_utils.process_allgather(value, tiled=True)
        params[path] = np.asarray(value)
    return params


def evaluate(trainer: ShardedTrainer, models: dict[str, nnx.Module], loader: loaders.EvalLoader) -> dict[str, Any]:
    """Top-1, top-5 and mean loss of each model on the validation images (each batch decoded once)."""
    totals = {name: {'loss_sum': 0.0, 'correct': 0, 'correct_top5': 0, 'count': 0} for name in models}
    skipped = []
    for batch in loader:
        skipped += batch.skipped
        for name, model in models.items():
            for key, value in trainer.eval_step(batch.images, batch.labels, model).items():
                totals[name][key] += value.item()
    result: dict[str, Any] = {
        name: {
            'top1': t['correct'] / max(t['count'], 1),
            'top5': t['correct_top5'] / max(t['count'], 1),
            'loss': t['loss_sum'] / max(t['count'], 1),
        }
        for name, t in totals.items()
    }
    result['skipped'] = skipped
    return result


def _run(args: argparse.Namespace) -> int:
    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # before any JAX computation
    initialize_from_args(args)
    check_args(args)
    train, val = read_data(args)
    settings = settings_of(args, train, val)
    check_output(args, settings)
    if jax.process_count() > 1:  # every process has seen --output as it was before process 0 writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices('nfnet_jax.finetune: output checked')
    leader = jax.process_index() == 0
    out = args.output
    has_checkpoint = args.resume and any(p.name.isdigit() for p in (out / 'checkpoints').glob('*'))

    model = build_model(args, len(train.class_names), fresh=has_checkpoint)
    cfg = resolve_model_data_config(model)
    size = args.image_size or cfg['input_size'][-1]
    train_transform = create_transform(
        size,
        is_training=True,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=args.train_interpolation,
        mean=cfg['mean'],
        std=cfg['std'],
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
    )
    eval_transform = create_transform(**(cfg | {'input_size': size}))
    loader = loaders.TrainLoader(train, train_transform, args.batch_size, seed=args.seed, epochs=args.epochs)
    steps_per_epoch, total_steps = loader.steps_per_epoch, loader.total_steps
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps:
        raise ValueError(f'--warmup-epochs {args.warmup_epochs} leaves no step of the {total_steps} to train')

    scaling = math.sqrt if args.opt == 'adamw' else (lambda x: x)  # timm's --lr-base-scale: sqrt for Adam
    lr = args.lr if args.lr is not None else args.lr_base * scaling(args.batch_size / args.lr_base_size)
    schedule = warmup_cosine_schedule(lr, total_steps, warmup_steps)
    tx = nfnet_optimizer(
        schedule,
        opt=args.opt,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        clip_factor=args.clip_grad or None,
    )
    state = TrainState(model, tx, ema_decay=args.ema_decay or None)
    mesh = parallel.make_mesh()
    trainer = ShardedTrainer(state, mesh, fsdp=args.fsdp, label_smoothing=args.smoothing)
    mix = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=len(train.class_names),
        )
        data = parallel.batch_sharding(mesh)

        def mix_batch(step: jax.Array, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
            return mixup(jax.random.fold_in(jax.random.key(args.seed), step), images, labels)

        mix = jax.jit(mix_batch, out_shardings=(data, data))

    if leader:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume or not (out / SETTINGS).is_file():
            atomic_write(out / SETTINGS, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)), True)
    with TrainCheckpointer(out / 'checkpoints', max_to_keep=args.checkpoint_hist) as checkpointer:
        start = 0
        if has_checkpoint:
            start = checkpointer.restore(state)
            position = json.loads((out / 'data_position' / f'{start}.json').read_text())
            if position != loader.position(start):
                raise CheckpointError(f'{out}: the saved input position {position} does not match step {start}')
            log(f'resuming {out} at step {start}: epoch {position["epoch"]}, batch {position["batch_in_epoch"]}')
        elif args.resume:
            log(f'--resume: {out} has no checkpoint yet, starting from step 0')
        metrics = Metrics(out / METRICS, start if args.resume else None, leader)
        best = metrics.best()
        loader = loaders.TrainLoader(
            train, train_transform, args.batch_size, seed=args.seed, epochs=args.epochs, start_step=start,
            workers=args.workers,
        )  # fmt: skip
        val_loader = loaders.EvalLoader(val, eval_transform, args.batch_size, workers=min(args.workers, 2))
        if leader:
            log(
                f'{model_name(args)} -> {len(train.class_names)} classes: {len(train)} training images '
                f'({steps_per_epoch} steps of {args.batch_size} per epoch), {len(val)} validation images, {size} px, '
                f'{jax.device_count()} devices in {jax.process_count()} processes, peak lr {lr:.3g}'
            )
        skipped: set[str] = set()
        state.model.train()
        bar = progress(total=(total_steps - start) * args.batch_size, unit='img', unit_scale=True, disable=not leader)
        pending: tuple[int, Any] | None = None

        def record(step: int, result: Any) -> None:
            values = {k: v.item() for k, v in result.items()} | {'lr': float(schedule(step - 1))}
            metrics.write({'kind': 'train', 'step': step, 'epoch': (step - 1) // steps_per_epoch} | values)
            bar.set_postfix(epoch=(step - 1) // steps_per_epoch, loss=f'{values["loss"]:.3f}')

        started = time.perf_counter()
        for batch in loader:
            for name in batch.skipped:
                if name not in skipped:
                    skipped.add(name)
                    if leader:
                        bar.write(f'warning: {name}: not a readable image, skipped', file=sys.stderr)
            images, labels = parallel.global_batch((batch.images, batch.labels), mesh)
            if mix is not None:
                images, labels = mix(np.int32(batch.step), images, labels)
            result = trainer.train_step(images, labels)
            if pending is not None:  # read the previous step's metrics while this one runs
                record(*pending)
            pending = (batch.step + 1, result)
            bar.update(args.batch_size)
            step = batch.step + 1
            if step % steps_per_epoch == 0:
                record(*pending)
                pending = None
                best = end_of_epoch(args, trainer, state, val_loader, metrics, checkpointer, loader, step, best, bar)
        bar.close()
        if pending is not None:
            record(*pending)
        checkpointer.wait()
    if leader:
        note = plot_curves(metrics.records, out / PLOT)
        if note:
            log(note)
        seconds = time.perf_counter() - started
        log(
            f'done: best validation top-1 {best:.4f}, weights in {out / BEST}; {len(skipped)} unreadable images '
            f'skipped; {total_steps - start} steps in {seconds:.0f} s'
        )
    return 0


def end_of_epoch(
    args: argparse.Namespace,
    trainer: ShardedTrainer,
    state: TrainState,
    val_loader: loaders.EvalLoader,
    metrics: Metrics,
    checkpointer: TrainCheckpointer,
    loader: loaders.TrainLoader,
    step: int,
    best: float,
    bar: Any,
) -> float:
    """Evaluate the model and its EMA, keep the best weights, checkpoint the run; returns the best top-1."""
    leader = jax.process_index() == 0
    state.model.eval()
    models = {'model': state.model, 'ema': state.eval_model}
    result = evaluate(trainer, models, val_loader)
    state.model.train()
    epoch = step // loader.steps_per_epoch - 1
    which = max(('model', 'ema'), key=lambda name: result[name]['top1'])
    improved = result[which]['top1'] > best
    record = {'kind': 'eval', 'step': step, 'epoch': epoch, 'model': result['model'], 'ema': result['ema']}
    record |= {'skipped': len(result['skipped']), 'best': improved}
    metrics.write(record)
    if leader:
        bar.write(
            f'epoch {epoch}: validation top-1 {result["model"]["top1"]:.4f} (EMA {result["ema"]["top1"]:.4f}), '
            f'top-5 {result["model"]["top5"]:.4f}, loss {result["model"]["loss"]:.4f}'
            + (f' -- best so far ({which})' if improved else ''),
            file=sys.stderr,
        )
        for name in result['skipped']:
            bar.write(f'warning: {name}: not a readable image, left out of the validation', file=sys.stderr)
    if improved:
        best = result[which]['top1']
        params = gathered_params(models[which])  # every process takes part in the gather
        if leader:
            model = state.model
            extra = {
                'class_names': json.dumps(list(val_loader.samples.class_names)),
                'model_name': model.pretrained_cfg.name if model.pretrained_cfg is not None else '',
                'input_size': json.dumps([model.in_chans, *val_loader.transform.img_size]),
                'finetune': json.dumps({'step': step, 'epoch': epoch, 'weights': which, 'top1': best}),
            }
            save_checkpoint(
                args.output / BEST,
                params,
                architecture=model.pretrained_cfg.architecture,
                num_classes=model.num_classes,
                global_pool=model.global_pool,
                in_chans=model.in_chans,
                extra_metadata={k: v for k, v in extra.items() if v},
                force=True,
            )
    if leader:
        position = json.dumps(loader.position(step))
        atomic_write(args.output / 'data_position' / f'{step}.json', lambda tmp: Path(tmp).write_text(position), True)
        plot_curves(metrics.records, args.output / PLOT)
    if step not in checkpointer.steps():
        checkpointer.save(state)
    return best


if __name__ == '__main__':
    sys.exit(main())
