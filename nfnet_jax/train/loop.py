"""The fine-tuning loop: `train_and_evaluate(config, workdir)`, what `python -m nfnet_jax.finetune` runs.

The data are read and checked before anything is built; the model gets a fresh head for the
data's classes and trains with the NFNet recipe on a `ShardedTrainer` over every device of every
process, fed uint8 batches by `nfnet_jax.data.loaders` (normalised, erased and mixed on the devices,
inside the step). Every epoch the model and its EMA are evaluated, and the run directory (`workdir`)
gets:

    settings.json         the config and the data, checked by a resume
    metrics.jsonl         one JSON line per training step and per evaluation
    curves.png            loss and accuracy curves (needs matplotlib)
    checkpoints/<step>    the whole training state (orbax), one per epoch
    data_position/<step>.json   where the input pipeline stands at that step
    best.safetensors      the best weights so far (model or EMA), with the class names
    .lock-process-<i>     held by process i while the run works in it: a second run on the folder is refused

`resume=True` continues from the last checkpoint and sees exactly the batches an uninterrupted run
would have seen. A run whose loss or weights become non-finite stops with `Diverged` (a ValueError):
best.safetensors keeps the last finite best, and metrics.jsonl, strict JSON, has null for the
non-finite numbers.

Multi-host: every process calls `train_and_evaluate`. Process 0 alone reads the run directory and
decides (whether to resume, from which checkpoint step, the input position and the evaluations so
far, hence the best score and step); every process acts on its answer (`parallel.leader_decides`),
so no host goes its own way on what it happens to see. The checkpoints, though, are orbax's: every
process writes its shards of each into the one run directory and reads them back from it, so the
hosts must share `workdir` (a filesystem they all mount). A run whose processes do not all see the
files process 0 writes there is refused at start, in one line, on every process.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfnet_jax import parallel
from nfnet_jax.data import create_transform, loaders, resolve_model_data_config
from nfnet_jax.data.device import device_stage
from nfnet_jax.factory import create_model
from nfnet_jax.files import atomic_write, hold_lock
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.parallel.train import ShardedTrainer
from nfnet_jax.progress import log, progress
from nfnet_jax.train.checkpoint import TrainCheckpointer
from nfnet_jax.train.config import FinetuneConfig
from nfnet_jax.train.mixup import Mixup
from nfnet_jax.train.optim import nfnet_optimizer, warmup_cosine_schedule
from nfnet_jax.train.state import TrainState
from nfnet_jax.train.step import Preprocess
from nfnet_jax.weights import CheckpointError, read_checkpoint_metadata, save_checkpoint
from nfnet_jax.weights.params import flat_state

SETTINGS, METRICS, PLOT, BEST = 'settings.json', 'metrics.jsonl', 'curves.png', 'best.safetensors'
LOCK_PREFIX = '.lock-process-'  # held by each process of a run while it works in the run folder
PATH_FLAGS = ('data', 'val', 'checkpoint')  # stored absolute: a resume may name them from another folder
WORKERS = 4  # grain processes decoding and augmenting, by default


def train_and_evaluate(
    config: FinetuneConfig, workdir: str | Path, *, resume: bool = False, workers: int = WORKERS
) -> dict[str, Any]:
    """Fine-tune as `config` says, keeping the run in `workdir`; returns the final metrics.

    `resume` continues the run in `workdir` (its settings must equal `config`'s); `workers` grain
    processes decode and augment. The result is the last evaluation's record of metrics.jsonl
    (`step`, `epoch`, `model` and `ema`: `top1`, `top5`, `loss`; `skipped`; `best`: whether it was
    the best so far) with `best_top1` and `best_step`, the best validation top-1 of the run and
    the step of the evaluation that reached it. Every process of a multi-host run calls it.
    """
    workdir = Path(workdir)
    check_environment(config, workers)
    train, val = read_data(config)
    settings = settings_of(config, train, val)
    start = parallel.leader_decides(lambda: open_run(workdir, settings, resume))
    check_one_run_folder(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with hold_lock(workdir / f'{LOCK_PREFIX}{jax.process_index()}', 'finetune run'):
        run = Finetuning(config, workdir, train, val, fresh=start is not None)
        if run.leader and (not resume or not (workdir / SETTINGS).is_file()):
            atomic_write(workdir / SETTINGS, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)), True)
        return run.train(resume, start, workers)


class Diverged(ValueError):
    """The loss or the weights became non-finite: the run stops, and nothing non-finite is kept as the best."""


def open_run(workdir: Path, settings: dict[str, Any], resume: bool) -> int | None:
    """Process 0's look at the run folder: checked (`check_workdir`), then the step of its last checkpoint to
    resume from (None: the run starts afresh)."""
    check_workdir(workdir, settings, resume)
    steps = [int(p.name) for p in (workdir / 'checkpoints').glob('*') if p.name.isdigit()] if resume else []
    return max(steps, default=None)


def check_one_run_folder(workdir: Path) -> None:
    """Refuse, on every process, a multi-process run whose processes do not all see the run folder process 0
    writes: orbax writes each checkpoint from every process, and reads it back the same way."""
    if jax.process_count() == 1:
        return
    probe = workdir / f'.process-0-{secrets.token_hex(8)}'
    name = parallel.leader_decides(lambda: workdir.mkdir(parents=True, exist_ok=True) or probe.touch() or probe.name)
    seen = (workdir / name).is_file()
    try:
        parallel.refuse_unless_all_agree(
            None
            if seen
            else f'--output {workdir}: process {jax.process_index()} does not see the files process 0 writes there; '
            'the processes of a multi-host run share one run folder (orbax writes and reads each checkpoint from '
            'all of them): put --output on a filesystem every host mounts'
        )
    finally:
        if jax.process_index() == 0:
            probe.unlink(missing_ok=True)


def check_environment(config: FinetuneConfig, workers: int) -> None:
    """What the config cannot say alone: the run's options, the devices, the starting checkpoint."""
    if workers < 0:
        raise ValueError('--workers must be 0 or more')
    if config.batch_size % jax.device_count():
        raise ValueError(f'--batch-size {config.batch_size} must be a multiple of the {jax.device_count()} devices')
    if config.checkpoint is not None and not config.checkpoint.is_file():
        raise FileNotFoundError(f'no checkpoint at {config.checkpoint}')


def read_data(config: FinetuneConfig) -> tuple[loaders.Samples, loaders.Samples]:
    """The training and validation samples, checked: enough classes, every class readable."""
    train = loaders.read_samples(config.data)
    if config.val is not None:
        val = loaders.read_samples(config.val, class_names=train.class_names)
    else:
        fraction = 0.1 if config.val_split is None else config.val_split
        train, val = loaders.split(train, fraction, config.seed)
    loaders.check_samples(train, f'--data {config.data}')
    if config.val is None and len(val) == 0:
        raise ValueError(
            f'--val-split {fraction} holds out no image of --data {config.data}: no class has two images to split; '
            'give validation images with --val'
        )
    loaders.check_samples(val, 'the validation images', min_classes=1)
    return train, val


def settings_of(config: FinetuneConfig, train: loaders.Samples, val: loaders.Samples) -> dict[str, Any]:
    """settings.json: the config, the data and the devices."""
    data = {'train_images': len(train), 'val_images': len(val), 'class_names': list(train.class_names)}
    flags = config.flags()
    flags |= {key: str(Path(flags[key]).absolute()) for key in PATH_FLAGS if flags[key] is not None}
    return {'flags': flags, 'data': data, 'processes': jax.process_count(), 'devices': jax.device_count()}


def check_workdir(workdir: Path, settings: dict[str, Any], resume: bool) -> None:
    """Refuse to start over another run, and to resume a run with other settings (naming each difference)."""
    if workdir.exists() and not workdir.is_dir():
        raise FileExistsError(f'--output {workdir} is a file; the run needs a directory')
    occupied = workdir.is_dir() and any(not p.name.startswith(LOCK_PREFIX) for p in workdir.iterdir())
    if not resume:
        if occupied:
            raise FileExistsError(
                f'--output {workdir} already holds files (another run?): pass --resume to continue that run, '
                'or choose another --output'
            )
        return
    if not (workdir / SETTINGS).is_file():
        raise CheckpointError(f'--resume: {workdir} holds no run ({SETTINGS} is missing)')
    saved = json.loads((workdir / SETTINGS).read_text())
    differences = []
    for key in sorted(set(saved['flags']) | set(settings['flags'])):
        before, now = saved['flags'].get(key), settings['flags'].get(key)
        if key in PATH_FLAGS and before is not None and now is not None:
            before, now = (str(Path(path).resolve()) for path in (before, now))  # one folder, however named
        if before != now:
            differences.append(f'--{key.replace("_", "-")} was {before}, now {now}')
    for key, value in settings['data'].items():
        if saved['data'].get(key) != value:
            differences.append(f'the data changed: {key} was {_short(saved["data"].get(key))}, now {_short(value)}')
    if differences:
        raise ValueError(f'--resume: this command differs from the run in {workdir}: ' + '; '.join(differences))


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) < 80 else text[:77] + '...'


def model_name(config: FinetuneConfig) -> str:
    if config.checkpoint is not None:
        metadata = read_checkpoint_metadata(config.checkpoint)
        return metadata.get('model_name') or metadata['architecture']
    return resolve_name(config.model)[1].name if config.pretrained else config.model


def build_model(config: FinetuneConfig, num_classes: int, fresh: bool) -> NormFreeNet:
    """The backbone with a fresh head for `num_classes`; `fresh` skips loading weights (a resume overwrites them)."""
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes,
        drop_rate=config.drop,
        dtype=jnp.bfloat16 if config.bf16 else None,
        rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
    )
    if config.drop_path is not None:
        kwargs['drop_path_rate'] = config.drop_path
    name = model_name(config)
    if fresh:
        return create_model(name, **kwargs)
    if config.checkpoint is not None:
        return create_model(name, checkpoint_path=config.checkpoint, **kwargs)
    return create_model(name, pretrained=config.pretrained or '.' in config.model, **kwargs)


class Metrics:
    """metrics.jsonl, written by process 0: one line per record, flushed; every process keeps the records."""

    def __init__(self, path: Path, records: list[dict[str, Any]], leader: bool):
        self.path, self.leader = path, leader
        self.records = list(records)
        if leader:
            text = ''.join(json_line(r) for r in self.records)
            atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=True)
            self.file = open(path, 'a')  # noqa: SIM115 (kept open for the run)

    @staticmethod
    def read(path: Path, up_to_step: int) -> list[dict[str, Any]]:
        """The records of a run's metrics.jsonl up to `up_to_step` (a resumed run drops what came after)."""
        records = []
        for number, line in enumerate(path.read_text().splitlines() if path.is_file() else [], 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if not isinstance(record, dict) or not isinstance(record.get('step'), int) or 'kind' not in record:
                raise CheckpointError(
                    f'--resume: {path} line {number} is not a record of the run (no "step" and "kind"): '
                    'delete that line, or restore the file, and resume again'
                )
            if record['step'] <= up_to_step:
                records.append(record)
        return records

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.leader:
            self.file.write(json_line(record))
            self.file.flush()

    def evaluations(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r['kind'] == 'eval']

    def best(self) -> float:
        return max((max(r['model']['top1'], r['ema']['top1']) for r in self.evaluations()), default=-1.0)


def json_line(record: dict[str, Any]) -> str:
    """A record as one line of strict JSON: a non-finite number (a diverged loss) is written as null."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(record), allow_nan=False) + '\n'


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


class Finetuning:
    """One run: its parts built from the config and data (the model and its recipe on the mesh, the transforms),
    then `train`, which restores the last checkpoint when there is one and runs the epochs left."""

    # Set by `train` for the run's steps and evaluations:
    checkpointer: TrainCheckpointer
    loader: loaders.TrainLoader
    val_loader: loaders.EvalLoader
    metrics: Metrics
    best: float  # the best validation top-1 so far (-1 before the first evaluation)
    bar: Any  # the progress bar

    def __init__(
        self, config: FinetuneConfig, workdir: Path, train: loaders.Samples, val: loaders.Samples, fresh: bool
    ):
        self.config, self.workdir, self.train_samples, self.val_samples = config, workdir, train, val
        self.leader = jax.process_index() == 0
        model = build_model(config, len(train.class_names), fresh=fresh)
        data_config = resolve_model_data_config(model)
        self.size = config.image_size or data_config['input_size'][-1]
        self.train_transform = create_transform(
            self.size,
            is_training=True,
            scale=config.scale,
            ratio=config.ratio,
            hflip=config.hflip,
            vflip=config.vflip,
            color_jitter=config.color_jitter,
            auto_augment=config.aa,
            interpolation=config.train_interpolation,
            mean=data_config['mean'],
            std=data_config['std'],
            re_prob=config.reprob,
            re_mode=config.remode,
            re_count=config.recount,
        )
        self.eval_transform = create_transform(**(data_config | {'input_size': self.size}))
        whole_run = loaders.TrainLoader(
            train, self.train_transform, config.batch_size, seed=config.seed, epochs=config.epochs
        )
        self.steps_per_epoch, self.total_steps = whole_run.steps_per_epoch, whole_run.total_steps
        warmup_steps = int(config.warmup_epochs * self.steps_per_epoch)
        if warmup_steps >= self.total_steps:
            raise ValueError(
                f'--warmup-epochs {config.warmup_epochs} leaves no step of the {self.total_steps} to train'
            )

        scaling = math.sqrt if config.opt == 'adamw' else (lambda x: x)  # timm's --lr-base-scale: sqrt for Adam
        self.lr = (
            config.lr if config.lr is not None else config.lr_base * scaling(config.batch_size / config.lr_base_size)
        )
        self.schedule = warmup_cosine_schedule(self.lr, self.total_steps, warmup_steps)
        # The learning rate of every step, computed once: reading it never waits for the devices.
        self.learning_rates = np.asarray(jax.jit(jax.vmap(self.schedule))(np.arange(self.total_steps)))
        tx = nfnet_optimizer(
            self.schedule,
            opt=config.opt,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            clip_factor=config.clip_grad or None,
        )
        self.state = TrainState(model, tx, ema_decay=config.ema_decay or None)
        self.mesh = parallel.make_mesh()
        self.trainer = ShardedTrainer(
            self.state,
            self.mesh,
            fsdp=config.fsdp,
            label_smoothing=config.smoothing,
            preprocess=self._preprocess(),
            eval_preprocess=device_stage(self.eval_transform),
        )

    def _preprocess(self) -> Preprocess:
        """What the devices do to a uint8 training batch inside the step: the transform's normalisation and random
        erasing (`device_stage`), then Mixup/CutMix; every draw a function of (seed, step)."""
        config = self.config
        stage = device_stage(self.train_transform)
        mixup = None
        if config.mixup > 0 or config.cutmix > 0:
            mixup = Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                mode=config.mixup_mode,
                label_smoothing=config.smoothing,
                num_classes=len(self.train_samples.class_names),
            )
        erase_key, mix_key = jax.random.split(jax.random.key(config.seed))

        def preprocess(step: jax.Array, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
            images = stage(images, jax.random.fold_in(erase_key, step))
            if mixup is not None:
                images, labels = mixup(jax.random.fold_in(mix_key, step), images, labels)
            return images, labels

        return preprocess

    def train(self, resume: bool, start: int | None, workers: int) -> dict[str, Any]:
        """The epochs left (all of them, or those after checkpoint step `start`), then the final metrics."""
        config, out, leader = self.config, self.workdir, self.leader
        with TrainCheckpointer(out / 'checkpoints', max_to_keep=config.checkpoint_hist) as checkpointer:
            self.checkpointer = checkpointer
            step = checkpointer.restore(self.state, start) if start is not None else 0
            self.loader = loaders.TrainLoader(
                self.train_samples, self.train_transform.host_part(), config.batch_size, seed=config.seed,
                epochs=config.epochs, start_step=step, workers=workers,
            )  # fmt: skip
            kept: list[dict[str, Any]] = []  # process 0's records of the run so far; the others get its evaluations

            def run_so_far() -> list[dict[str, Any]]:
                kept.extend(self.run_so_far(resume, start))
                return [r for r in kept if r['kind'] == 'eval']

            evaluations = parallel.leader_decides(run_so_far)
            if start is not None:
                position = self.loader.position(step)
                log(f'resuming {out} at step {step}: epoch {position["epoch"]}, batch {position["batch_in_epoch"]}')
            elif resume:
                log(f'--resume: {out} has no checkpoint yet, starting from step 0')
            self.metrics = Metrics(out / METRICS, kept if leader else evaluations, leader)
            self.best = self.metrics.best()
            self.val_loader = loaders.EvalLoader(
                self.val_samples, self.eval_transform.host_part(), config.batch_size, workers=min(workers, 2)
            )
            if leader:
                log(
                    f'{model_name(config)} -> {len(self.train_samples.class_names)} classes: '
                    f'{len(self.train_samples)} training images ({self.steps_per_epoch} steps of {config.batch_size} '
                    f'per epoch), {len(self.val_samples)} validation images, {self.size} px, '
                    f'{jax.device_count()} devices in {jax.process_count()} processes, peak lr {self.lr:.3g}'
                )
            started = time.perf_counter()
            skipped = self.train_steps(self.loader, step)
            checkpointer.wait()
        if leader:
            note = plot_curves(self.metrics.records, out / PLOT)
            if note:
                log(note)
            seconds = time.perf_counter() - started
            log(
                f'done: best validation top-1 {self.best:.4f}, weights in {out / BEST}; {len(skipped)} unreadable '
                f'images skipped; {self.total_steps - step} steps in {seconds:.0f} s'
            )
        evaluations = self.metrics.evaluations()
        best_step = next(r['step'] for r in evaluations if max(r['model']['top1'], r['ema']['top1']) == self.best)
        return evaluations[-1] | {'best_top1': self.best, 'best_step': best_step}

    def run_so_far(self, resume: bool, start: int | None) -> list[dict[str, Any]]:
        """Process 0: the saved input position checked against checkpoint step `start`, and the records of
        metrics.jsonl up to it (none for a run that starts afresh)."""
        if start is not None:
            position = json.loads((self.workdir / 'data_position' / f'{start}.json').read_text())
            if position != self.loader.position(start):
                raise CheckpointError(
                    f'{self.workdir}: the saved input position {position} does not match step {start}'
                )
        return Metrics.read(self.workdir / METRICS, start or 0) if resume else []

    def train_steps(self, batches: Iterable[loaders.Batch], start: int) -> set[str]:
        """Train on `batches` (the steps from `start` on), evaluating at the end of every epoch; returns the
        unreadable files.

        The loop never waits for the step it has just launched: the next two batches are read and sent to
        the devices while a step runs (`parallel.prefetch_to_device`), a step's metrics are read only once
        the next step is launched, and the learning rate comes from a table on the host.
        """
        config, leader, metrics = self.config, self.leader, self.metrics
        skipped: set[str] = set()
        self.state.model.train()
        self.bar = bar = progress(
            total=(self.total_steps - start) * config.batch_size, unit='img', unit_scale=True, disable=not leader
        )
        pending: tuple[int, Any] | None = None

        def record(step: int, result: Any) -> None:
            values = {k: v.item() for k, v in jax.device_get(result).items()}
            values['lr'] = float(self.learning_rates[step - 1])
            metrics.write({'kind': 'train', 'step': step, 'epoch': (step - 1) // self.steps_per_epoch} | values)
            bar.set_postfix(epoch=(step - 1) // self.steps_per_epoch, loss=f'{values["loss"]:.3f}')
            if not math.isfinite(values['loss']):
                bar.close()
                raise self.diverged(step, f'the training loss is {values["loss"]}')

        on_devices = parallel.prefetch_to_device(
            ((batch.step, batch.skipped, (batch.images, batch.labels)) for batch in batches), self.mesh
        )
        for index, names, (images, labels) in on_devices:
            for name in names:
                if name not in skipped:
                    skipped.add(name)
                    if leader:
                        bar.write(f'warning: {name}: not a readable image, skipped', file=sys.stderr)
            result = self.trainer.train_step(images, labels)
            if pending is not None:  # the previous step's metrics, read while this one runs
                record(*pending)
            step = index + 1
            pending = (step, result)
            bar.update(config.batch_size)
            if step % self.steps_per_epoch == 0:
                record(*pending)
                pending = None
                self.end_of_epoch(step)
        bar.close()
        if pending is not None:
            record(*pending)
        return skipped

    def end_of_epoch(self, step: int) -> None:
        """Evaluate the model and its EMA, keep the best weights, checkpoint the run."""
        state, out, leader, bar = self.state, self.workdir, self.leader, self.bar
        state.model.eval()
        models = {'model': state.model, 'ema': state.eval_model}
        result = evaluate(self.trainer, models, self.val_loader)
        state.model.train()
        epoch = step // self.steps_per_epoch - 1
        which = max(('model', 'ema'), key=lambda name: result[name]['top1'])
        losses = {name: result[name]['loss'] for name in models}
        finite = all(math.isfinite(loss) for loss in losses.values())
        improved = finite and result[which]['top1'] > self.best
        record = {'kind': 'eval', 'step': step, 'epoch': epoch, 'model': result['model'], 'ema': result['ema']}
        record |= {'skipped': len(result['skipped']), 'best': improved}
        self.metrics.write(record)
        if not finite:
            bar.close()
            raise self.diverged(step, 'the validation loss is ' + ', '.join(f'{v} ({k})' for k, v in losses.items()))
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
            self.save_best(models[which], which, step, epoch, result[which]['top1'])
            self.best = result[which]['top1']
        if leader:
            position = json.dumps(self.loader.position(step))
            atomic_write(out / 'data_position' / f'{step}.json', lambda tmp: Path(tmp).write_text(position), True)
            plot_curves(self.metrics.records, out / PLOT)
        if step not in self.checkpointer.steps():
            self.checkpointer.save(state)

    def diverged(self, step: int, what: str) -> Diverged:
        """The error that stops a run whose loss or weights became non-finite at `step`."""
        kept = (
            f'{self.workdir / BEST} keeps the best finite weights so far (top-1 {self.best:.4f})'
            if self.best >= 0
            else 'no weights were saved'
        )
        return Diverged(
            f'training diverged at step {step}: {what}; {kept}. Start again in a new --output with a lower --lr '
            f'(the peak was {self.lr:.3g})'
        )

    def save_best(self, weights: nnx.Module, which: str, step: int, epoch: int, top1: float) -> None:
        """best.safetensors: `weights` (the model or its EMA) with the class names, size and validation top-1;
        never weights that are not finite."""
        params = gathered_params(weights)  # every process takes part in the gather
        if not all(np.isfinite(value).all() for value in params.values()):
            raise self.diverged(step, f'the {which} weights are not finite')
        if not self.leader:
            return
        model = self.state.model
        extra = {
            'class_names': json.dumps(list(self.val_samples.class_names)),
            'model_name': model.pretrained_cfg.name if model.pretrained_cfg is not None else '',
            'input_size': json.dumps([model.in_chans, *self.val_loader.transform.img_size]),
            'finetune': json.dumps({'step': step, 'epoch': epoch, 'weights': which, 'top1': top1}),
        }
        save_checkpoint(
            self.workdir / BEST,
            params,
            architecture=model.pretrained_cfg.architecture,
            num_classes=model.num_classes,
            global_pool=model.global_pool,
            in_chans=model.in_chans,
            extra_metadata={k: v for k, v in extra.items() if v},
            force=True,
        )
