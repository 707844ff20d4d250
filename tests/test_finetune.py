"""python -m nfnet_jax.finetune and its input pipeline, on a real image folder: scikit-learn's digits as PNG files.

600 digits (60 per class, 8x8 upsampled to 32x32 PNGs) in ten class folders named 'zero' .. 'nine',
plus one file that is not an image. test_nfnet trains from fresh weights at 32 px, batches of 32,
AdamW, 3 epochs of 15 steps; chance is 0.1 and the run must reach 0.6 validation top-1.
Then: predict prints the folder's class names; a run killed (SIGKILL) in the middle of its
second epoch and resumed writes the very metrics of the uninterrupted run (bit for bit, CPU);
bad inputs are refused by name before any training, a bad config with the same message by the
command and by FinetuneConfig; train_and_evaluate called from Python runs the command's run and
returns its last evaluation; two processes of two devices (gloo) train the run of one process of
four devices, FSDP, Mixup and CutMix included, to within 1e-5.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from multihost import ROOT, child_env, free_port, run_processes
from PIL import Image

from nfnet_jax import finetune
from nfnet_jax.data import create_transform, loaders
from nfnet_jax.train import FinetuneConfig, train_and_evaluate
from nfnet_jax.weights import CheckpointError, read_checkpoint

NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
PER_CLASS = 60
STEPS_PER_EPOCH = 15  # 480 training images (600 less a fifth held out) in batches of 32
ARGS = [
    '--model', 'test_nfnet', '--val-split', '0.2', '--epochs', '3', '--batch-size', '32', '--image-size', '32',
    '--opt', 'adamw', '--lr', '0.003', '--weight-decay', '0.01', '--warmup-epochs', '0.5', '--ema-decay', '0.9',
    '--scale', '0.8', '1', '--hflip', '0', '--color-jitter', '0', '--workers', '0', '--seed', '3',
]  # fmt: skip


def write_digits(root: Path, per_class: int = PER_CLASS) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts = dict.fromkeys(range(10), 0)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        if counts[label] == per_class:
            continue
        counts[label] += 1
        folder = root / NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8))
        pixels.resize((32, 32), Image.Resampling.BILINEAR).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def digits(tmp_path_factory) -> Path:
    root = write_digits(tmp_path_factory.mktemp('digits'))
    (root / 'three' / 'broken.png').write_bytes(b'not an image at all')  # reported and skipped, never fatal
    return root


@pytest.fixture(scope='module')
def finished_run(digits, tmp_path_factory) -> tuple[Path, str, float]:
    """The uninterrupted run: (run directory, its stderr, seconds)."""
    run = tmp_path_factory.mktemp('runs') / 'uninterrupted'
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'nfnet_jax.finetune', '--data', str(digits), '--output', str(run), *ARGS],
        env=child_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result.stderr, time.perf_counter() - start


def records(run: Path) -> list[dict]:
    """The run's metrics; a last line still being written is left out."""
    lines = (run / 'metrics.jsonl').read_text().split('\n')[:-1]
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_finetuning_a_folder_learns_it_and_writes_the_run(finished_run):
    run, stderr, seconds = finished_run
    evals = [r for r in records(run) if r['kind'] == 'eval']
    assert [r['step'] for r in evals] == [15, 30, 45]
    best = max(max(r['model']['top1'], r['ema']['top1']) for r in evals)
    print(f'validation top-1 by epoch {[round(r["model"]["top1"], 3) for r in evals]}, best {best}, {seconds:.0f} s')
    assert best >= 0.6, evals  # chance: 0.1
    assert len([r for r in records(run) if r['kind'] == 'train']) == 45
    assert 'broken.png: not a readable image' in stderr
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['15', '30', '45']
    assert (run / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    _, metadata = read_checkpoint(run / 'best.safetensors')
    assert json.loads(metadata['class_names']) == sorted(NAMES, key=loaders.natural_key)
    assert json.loads(metadata['finetune'])['top1'] == best


@pytest.mark.slow
def test_predict_prints_the_folders_class_names(finished_run, digits, capsys):
    from nfnet_jax import predict

    run = finished_run[0]
    images = [digits / name / sorted(os.listdir(digits / name))[0] for name in NAMES]
    assert predict.main([*map(str, images), '--checkpoint', str(run / 'best.safetensors'), '--topk', '1']) == 0
    lines = capsys.readouterr().out.splitlines()
    predicted = [lines[i + 1].split('%')[1].strip() for i in range(0, len(lines), 2)]
    assert set(predicted) <= set(NAMES)
    assert sum(p == name for p, name in zip(predicted, NAMES, strict=True)) >= 5, predicted


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_into_the_uninterrupted_metrics(finished_run, digits, tmp_path):
    """SIGKILL in the middle of epoch 2 (after the epoch-1 checkpoint), then --resume: every record equals."""
    run = tmp_path / 'killed'
    command = [sys.executable, '-m', 'nfnet_jax.finetune', '--data', str(digits), '--output', str(run), *ARGS]
    child = subprocess.Popen(command, env=child_env(1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and child.poll() is None:
            steps = (
                [r['step'] for r in records(run) if r['kind'] == 'train'] if (run / 'metrics.jsonl').exists() else []
            )
            if max(steps, default=0) >= STEPS_PER_EPOCH + 7 and (run / 'checkpoints' / '15').is_dir():
                break
            time.sleep(0.2)
        assert child.poll() is None, 'the run ended before it could be killed'
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert max(r['step'] for r in records(run)) < 3 * STEPS_PER_EPOCH
    # The CPU memory setting may differ on --resume (off here, on by default before), and computes the same steps
    resumed = subprocess.run(
        [*command, '--resume', '--no-keep-cpu-memory'], env=child_env(1), cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming' in resumed.stderr and 'at step 15' in resumed.stderr

    reference = records(finished_run[0])
    assert records(run) == reference  # every step's loss, accuracy and lr, every evaluation: bit for bit
    ours, theirs = (
        read_checkpoint(run / 'best.safetensors')[0],
        read_checkpoint(finished_run[0] / 'best.safetensors')[0],
    )
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_batches_do_not_depend_on_workers_processes_or_where_the_loader_starts(digits):
    samples = loaders.image_folder(digits)
    transform = create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)
    whole = loaders.TrainLoader(samples, transform, 16, seed=1, epochs=2, process_index=0, process_count=1)
    later = whole.steps_per_epoch + 2  # a step of the second epoch
    expected = whole.batch(later)
    halves = [
        loaders.TrainLoader(samples, transform, 16, seed=1, epochs=2, process_index=i, process_count=2).batch(later)
        for i in range(2)
    ]
    assert np.array_equal(np.concatenate([h.images for h in halves]), expected.images)
    assert np.array_equal(np.concatenate([h.labels for h in halves]), expected.labels)
    resumed = loaders.TrainLoader(samples, transform, 16, seed=1, epochs=2, start_step=later, workers=1)
    first = next(iter(resumed))  # from a grain worker process
    assert first.step == later and np.array_equal(first.images, expected.images)
    assert not np.array_equal(whole.batch(later - whole.steps_per_epoch).labels, expected.labels)  # reshuffled


def test_folder_order_is_timms_and_unreadable_files_are_replaced_and_named(digits):
    from timm.data.readers.reader_image_folder import find_images_and_targets

    samples = loaders.image_folder(digits)
    theirs, class_to_idx = find_images_and_targets(str(digits))
    assert list(samples.files) == [f for f, _ in theirs] and samples.labels.tolist() == [t for _, t in theirs]
    assert list(samples.class_names) == list(class_to_idx)
    broken = samples.files.index(str(digits / 'three' / 'broken.png'))
    transform = create_transform(32, is_training=True)
    loader = loaders.TrainLoader(samples, transform, 8, seed=0, process_index=0, process_count=1)
    at = int(np.flatnonzero(loader.order(0) == broken)[0])
    batch = loader.batch(at // 8)
    assert batch.skipped == [samples.files[broken]] and batch.images.shape == (8, 32, 32, 3)


def test_list_files_name_their_missing_files(digits, tmp_path):
    listing = tmp_path / 'train.tsv'
    listing.write_text(f'{digits}/one/{os.listdir(digits / "one")[0]}\tone\n{digits}/gone.png\ttwo\n')
    with pytest.raises(FileNotFoundError, match='gone.png'):
        loaders.list_file(listing)
    listing.write_text(''.join(f'{digits / n / os.listdir(digits / n)[0]}\t{n}\n' for n in NAMES))
    assert loaders.list_file(listing).class_names == tuple(sorted(NAMES, key=loaders.natural_key))


def bad_run(argv: list[str], capsys) -> str:
    start = time.perf_counter()
    assert finetune.main(argv) == 2
    assert time.perf_counter() - start < 30  # refused before any model is built or trained
    return capsys.readouterr().err


@pytest.mark.slow  # needs the finished run
def test_bad_inputs_are_refused_before_any_work(finished_run, digits, tmp_path, capsys):
    out = ['--output', str(tmp_path / 'run'), *ARGS]
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert 'no class folders' in bad_run(['--data', str(empty), *out], capsys)
    one = tmp_path / 'one'
    (one / 'seven').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(one / 'seven' / 'a.png')
    assert 'at least 2' in bad_run(['--data', str(one), *out], capsys)
    unreadable = tmp_path / 'unreadable'
    for name in ('cat', 'dog'):
        (unreadable / name).mkdir(parents=True)
        (unreadable / name / 'x.jpg').write_bytes(b'\xff\xd8 truncated' if name == 'dog' else b'')
    Image.new('RGB', (8, 8)).save(unreadable / 'cat' / 'fine.png')
    assert "class 'dog' has no readable image" in bad_run(['--data', str(unreadable), *out], capsys)
    listing = tmp_path / 'list.csv'
    listing.write_text('path,label\nmissing/a.png,cat\n')
    assert 'missing/a.png' in bad_run(['--data', str(listing), *out], capsys)

    existing = ['--data', str(digits), '--output', str(finished_run[0]), *ARGS]
    assert '--resume' in bad_run(existing, capsys)
    message = bad_run([*existing, '--resume', '--lr', '0.01'], capsys)
    assert '--lr was 0.003, now 0.01' in message


def test_train_and_evaluate_from_python_returns_the_runs_last_evaluation(digits, tmp_path):
    """The command's run as a function call: one epoch, in this process, and the metrics it returns."""
    config = FinetuneConfig(
        data=str(digits), model='test_nfnet', val_split=0.2, epochs=1, batch_size=32, image_size=32, opt='adamw',
        lr=0.003, weight_decay=0.01, warmup_epochs=0.5, ema_decay=0.9, scale=[0.8, 1], hflip=0, color_jitter=0, seed=3,
    )  # fmt: skip
    run = tmp_path / 'run'
    result = train_and_evaluate(config, run, workers=0)
    evals = [r for r in records(run) if r['kind'] == 'eval']
    assert [r['step'] for r in evals] == [STEPS_PER_EPOCH]
    last = evals[-1]  # one epoch: its evaluation is the best
    assert result == last | {'best_top1': max(last['model']['top1'], last['ema']['top1']), 'best_step': last['step']}
    assert {'top1', 'top5', 'loss'} <= set(result['model']) == set(result['ema'])
    # The settings the command would write for the same run: either may resume the other's run.
    command = finetune.parse_args(['--data', str(digits), '--output', str(run), *ARGS, '--epochs', '1'])
    assert json.loads((run / 'settings.json').read_text())['flags'] == finetune.config_of(command).flags()


@pytest.mark.parametrize(
    ('flags', 'fields', 'message'),
    [
        (['--epochs', '-1'], {'epochs': -1}, '--epochs must be positive'),
        (['--warmup-epochs', '3'], {'warmup_epochs': 3.0}, '--warmup-epochs (3.0) must be in [0, --epochs (3))'),
        (
            ['--mixup', '0.2', '-b', '31'],
            {'mixup': 0.2, 'batch_size': 31},
            'Mixup and CutMix need an even --batch-size',
        ),
        (['--model', 'nfnet_x9'], {'model': 'nfnet_x9'}, "unknown model 'nfnet_x9'"),
        (['--scale', '1.0', '0.0'], {'scale': (1.0, 0.0)}, '--scale 1.0 0.0: the crop area range needs 0 < low'),
        (['--scale', '0.5', '1.5'], {'scale': (0.5, 1.5)}, '--scale 0.5 1.5: the crop area range needs 0 < low'),
        (['--ratio', '2', '1'], {'ratio': (2.0, 1.0)}, '--ratio 2.0 1.0: the aspect ratio range needs 0 < low'),
        (['--smoothing', '1.5'], {'smoothing': 1.5}, '--smoothing 1.5 must be in [0, 1)'),
        (['--hflip', '2'], {'hflip': 2.0}, '--hflip 2.0 must be in [0, 1]'),
        (['--reprob', '-0.1'], {'reprob': -0.1}, '--reprob -0.1 must be in [0, 1]'),
        (['--lr', 'nan'], {'lr': float('nan')}, '--lr must be a finite number, got nan'),
        (['--weight-decay', '-1'], {'weight_decay': -1.0}, '--weight-decay -1.0 must not be negative'),
    ],
)
def test_the_command_and_the_config_refuse_a_bad_config_alike(digits, tmp_path, capsys, flags, fields, message):
    out = tmp_path / 'run'
    assert finetune.main(['--data', str(digits), '--output', str(out), *ARGS, *flags]) == 2
    printed = capsys.readouterr().err.strip()
    command = finetune.parse_args(['--data', str(digits), '--output', str(out), *ARGS])
    settings = {field.name: getattr(command, field.name) for field in dataclasses.fields(FinetuneConfig)}
    with pytest.raises(ValueError) as refused:
        FinetuneConfig(**settings | fields)
    assert printed == f'error: {refused.value}' and str(refused.value).startswith(message)
    assert not out.exists()  # refused before anything was written


@pytest.mark.slow
def test_two_processes_of_two_devices_train_the_run_of_one_process_of_four(tmp_path):
    """The same run (FSDP, Mixup and CutMix on the global batch) on 2 processes x 2 devices and on 1 x 4, gloo."""
    data = write_digits(tmp_path / 'digits', per_class=20)  # 160 training images: 5 steps of 32 per epoch
    args = ['--data', str(data), *ARGS, '--epochs', '2', '--warmup-epochs', '0', '--mixup', '0.2', '--cutmix', '1']
    args += ['--fsdp']  # params and optimizer state split over the devices: over both processes' devices
    command = ['python', '-m', 'nfnet_jax.finetune', *args]
    single = run_processes([[*command, '--output', str(tmp_path / 'one')]], devices=4, timeout=600)[0]
    assert single.returncode == 0, single.output[-3000:]
    distributed = ['--output', str(tmp_path / 'two'), '--coordinator', f'127.0.0.1:{free_port()}']
    runs = run_processes(
        [[*command, *distributed, '--num-processes', '2', '--process-id', str(i)] for i in range(2)],
        devices=2,
        timeout=600,
    )
    for finished in runs:
        assert finished.returncode == 0, finished.output[-3000:]
    one, two = records(tmp_path / 'one'), records(tmp_path / 'two')
    assert [r['step'] for r in one] == [r['step'] for r in two] and len(one) == 12

    def numbers(record: dict) -> list[float]:
        nested = [numbers(record[k]) for k in ('model', 'ema') if k in record]
        return [v for _, v in sorted(record.items()) if isinstance(v, float)] + sum(nested, [])

    ours, theirs = (np.array([v for r in rs for v in numbers(r)]) for rs in (two, one))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # measured: at most 4.8e-7 apart

    # The run as if stopped in epoch 2 (its last checkpoint and input position gone), resumed by both processes:
    # process 0 decides from the run folder where to resume and the evaluations so far, and both act on it.
    shutil.rmtree(tmp_path / 'two' / 'checkpoints' / '10')
    (tmp_path / 'two' / 'data_position' / '10.json').unlink()
    port = ['--coordinator', f'127.0.0.1:{free_port()}']
    runs = run_processes(
        [
            [*command, *distributed[:2], *port, '--resume', '--num-processes', '2', '--process-id', str(i)]
            for i in range(2)
        ],
        devices=2,
        timeout=600,
    )
    for finished in runs:
        assert finished.returncode == 0, finished.output[-3000:]
        assert 'resuming' in finished.output and 'at step 5' in finished.output
    assert records(tmp_path / 'two') == two  # bit for bit


@pytest.mark.slow
def test_processes_that_do_not_share_the_run_folder_are_refused_at_start(tmp_path):
    """Two processes given separate --output folders (hosts with their own disks): orbax writes each checkpoint
    from every process into one folder, so both refuse at once, in one line, before any model is built."""
    data = write_digits(tmp_path / 'digits', per_class=20)
    command = ['python', '-m', 'nfnet_jax.finetune', '--data', str(data), *ARGS, '--coordinator']
    command += [f'127.0.0.1:{free_port()}', '--num-processes', '2']
    runs = run_processes(
        [[*command, '--output', str(tmp_path / f'out{i}'), '--process-id', str(i)] for i in range(2)], 2, 300
    )
    for finished in runs:
        assert finished.returncode == 2, finished.output[-3000:]
        [line] = [line for line in finished.output.splitlines() if line.startswith('error: ')]
        assert f'--output {tmp_path / "out1"}: process 1 does not see the files process 0 writes there' in line
        assert 'put --output on a filesystem every host mounts' in line
        assert 'test_nfnet -> 10 classes' not in finished.output  # nothing built, nothing trained
    assert list((tmp_path / 'out0').iterdir()) == [] and not (tmp_path / 'out1').exists()


class SlowDevice:
    """A trainer whose steps run one after another on a thread of their own, as a device runs what the host
    launched: `train_step` returns at once, and step k ends only once the loop has loaded batch k + 2 (or after
    a deadline, which a loop that waits for its steps before reading ahead always meets)."""

    DEADLINE_S = 30

    def __init__(self, events: list[tuple[str, int]], loaded: dict[int, threading.Event], batches: int):
        self.events, self.loaded, self.batches = events, loaded, batches
        self.device = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.steps = 0
        self.missed: list[int] = []  # steps that ended at the deadline, without the batch they waited for
        self.placed: list[bool] = []  # each step's batch: a global array on the mesh's devices

    def train_step(self, images: Any, labels: Any) -> dict[str, Any]:
        k = self.steps
        self.steps += 1
        self.placed.append(isinstance(images, jax.Array) and isinstance(labels, jax.Array))
        self.events.append(('launch', k))

        def run() -> float:
            ahead = k + 2
            if ahead < self.batches and not self.loaded[ahead].wait(self.DEADLINE_S):
                self.missed.append(k)
            self.events.append(('step ends', k))
            return float(k)

        done = self.device.submit(run)
        return {'loss': Deferred(done, k, self.events)}


class Deferred:
    """A metric of a step still running: reading it waits for the step, as reading a JAX array does."""

    def __init__(self, done: concurrent.futures.Future, step: int, events: list[tuple[str, int]]):
        self.done, self.step, self.events = done, step, events

    def item(self) -> float:
        self.events.append(('read metrics', self.step))
        return self.done.result()


def test_the_loop_loads_the_next_batches_while_a_step_runs(digits, tmp_path, monkeypatch):
    """Step k (on its own 'device' thread) cannot end before batch k + 2 is loaded: a loop that waited for a step
    before reading ahead would leave each step at its deadline. Events are compared by order, never by time."""
    from nfnet_jax.train import loop

    config = FinetuneConfig(
        data=str(digits), model='test_nfnet', val_split=0.2, epochs=1, warmup_epochs=0.5, batch_size=32, image_size=32
    )
    train, val = loop.read_data(config)
    run = loop.Finetuning(config, tmp_path, train, val, fresh=True)
    events: list[tuple[str, int]] = []
    count = 8
    loaded = {k: threading.Event() for k in range(count)}

    def batches() -> Iterator[loaders.Batch]:
        for k in range(count):
            events.append(('load', k))
            loaded[k].set()
            yield loaders.Batch(np.zeros((32, 32, 32, 3), np.float32), np.zeros(32, np.int32), step=k)

    run.trainer = device = SlowDevice(events, loaded, count)
    run.metrics = loop.Metrics(tmp_path / 'metrics.jsonl', [], leader=True)
    monkeypatch.setattr(jax, 'device_get', lambda tree: tree)  # the Deferred metrics are read by .item()
    run.train_steps(batches(), 0)

    print('events:', ', '.join(f'{what} {k}' for what, k in events))
    assert device.missed == [] and all(device.placed) and device.steps == count
    at = {event: i for i, event in enumerate(events)}
    for k in range(count - 2):
        # batch k + 2 is loaded after step k is launched and before it ends
        assert at['launch', k] < at['load', k + 2] < at['step ends', k], events
    for k in range(count - 1):
        assert at['launch', k + 1] < at['read metrics', k], events  # metrics read one step late
    assert [r['step'] for r in run.metrics.records] == list(range(1, count + 1))
    assert [r['lr'] for r in run.metrics.records] == [float(run.schedule(k)) for k in range(count)]


def test_a_lock_held_on_the_output_refuses_a_second_run_naming_its_holder(digits, tmp_path):
    """Two runs on one --output: the second finds the first's lock and names it, before any model is built."""
    import socket

    from nfnet_jax.files import hold_lock
    from nfnet_jax.train.loop import LOCK_PREFIX

    config = FinetuneConfig(data=digits, model='test_nfnet', val_split=0.2, epochs=1, warmup_epochs=0, image_size=32)
    run = tmp_path / 'run'
    run.mkdir()
    with hold_lock(run / f'{LOCK_PREFIX}0', 'finetune run'), pytest.raises(FileExistsError) as refused:
        train_and_evaluate(config, run, workers=0)
    assert f'another finetune run (process {os.getpid()} on {socket.gethostname()}) holds' in str(refused.value)
    assert list(run.iterdir()) == []  # nothing written, and the holder's lock gone with it


def test_resume_reads_a_run_folder_however_its_data_folder_is_named(digits, tmp_path, monkeypatch):
    """settings.json keeps the data folder absolute: --data given relative, then absolute, is one run."""
    from nfnet_jax.train import loop

    monkeypatch.chdir(digits.parent)
    relative = FinetuneConfig(data=digits.name, model='test_nfnet', val_split=0.2, epochs=1, warmup_epochs=0)
    train, val = loop.read_data(relative)
    run = tmp_path / 'run'
    run.mkdir()
    (run / loop.SETTINGS).write_text(json.dumps(loop.settings_of(relative, train, val)))
    absolute = dataclasses.replace(relative, data=digits)
    loop.check_workdir(run, loop.settings_of(absolute, train, val), resume=True)  # no difference
    other = dataclasses.replace(relative, data=digits / 'one')
    with pytest.raises(ValueError, match='--data was'):
        loop.check_workdir(run, loop.settings_of(other, train, val), resume=True)


def test_a_metrics_line_that_is_no_record_is_named_by_resume(tmp_path):
    from nfnet_jax.train.loop import Metrics

    path = tmp_path / 'metrics.jsonl'
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "loss": 1.0}\n{"kind": "tr')
    with pytest.raises(CheckpointError, match=r'metrics.jsonl line 2 is not a record of the run \(no "step"'):
        Metrics.read(path, 10)
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "tr')  # a last line cut by a kill: dropped
    assert Metrics.read(path, 10) == [{'kind': 'train', 'step': 1, 'loss': 2.0}]


def test_metrics_lines_are_strict_json_with_null_for_a_non_finite_loss(tmp_path):
    from nfnet_jax.train.loop import Metrics

    metrics = Metrics(tmp_path / 'metrics.jsonl', [], leader=True)
    metrics.write({'kind': 'eval', 'step': 3, 'model': {'loss': float('nan'), 'top1': 0.1}, 'lr': float('inf')})

    def refuse(token: str) -> None:
        raise AssertionError(f'{token} is not JSON')

    [line] = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert json.loads(line, parse_constant=refuse) == {
        'kind': 'eval',
        'step': 3,
        'model': {'loss': None, 'top1': 0.1},
        'lr': None,
    }


def test_classes_of_one_image_each_say_that_the_split_holds_out_nothing(tmp_path):
    from nfnet_jax.train import loop

    for name in ('a', 'b', 'c'):
        (tmp_path / name).mkdir()
        Image.new('RGB', (8, 8)).save(tmp_path / name / 'only.png')
    config = FinetuneConfig(data=tmp_path, model='test_nfnet', epochs=1, warmup_epochs=0)
    with pytest.raises(
        ValueError, match=r'--val-split 0.1 holds out no image of --data .*give validation images with --val'
    ):
        loop.read_data(config)


def tiny_config(data: Path, **fields: Any) -> FinetuneConfig:
    """A run of 5 steps of 16 per epoch on `write_digits(per_class=10)`."""
    settings = dict(data=data, model='test_nfnet', val_split=0.2, epochs=2, batch_size=16, image_size=32, opt='adamw')
    return FinetuneConfig(**settings | dict(lr=0.003, warmup_epochs=0, hflip=0, color_jitter=0, seed=3) | fields)


def strict_records(run: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: NaN or Infinity tokens fail."""

    def refuse(token: str) -> None:
        raise AssertionError(f'{token} is not JSON')

    return [json.loads(line, parse_constant=refuse) for line in (run / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_first_non_finite_loss_and_saves_no_weights(tmp_path):
    from nfnet_jax.train.loop import Diverged

    run = tmp_path / 'run'
    with pytest.raises(
        Diverged, match=r'training diverged at step \d: the training loss is -?(nan|inf); no weights were'
    ):
        train_and_evaluate(tiny_config(write_digits(tmp_path / 'digits', 10), lr=1e30), run, workers=0)
    last = strict_records(run)[-1]
    assert last['kind'] == 'train' and last['loss'] is None and last['step'] < 5
    assert not (run / 'best.safetensors').exists() and not list((run / 'checkpoints').iterdir())


@pytest.mark.slow
def test_a_run_whose_validation_loss_turns_non_finite_stops_and_keeps_the_last_finite_best(tmp_path, monkeypatch):
    from nfnet_jax.train import loop

    evaluations = []

    def evaluate(*args: Any) -> dict[str, Any]:
        result = real_evaluate(*args)
        evaluations.append(result)
        if len(evaluations) == 2:
            result['ema']['loss'] = float('inf')  # as weights gone non-finite give
        return result

    real_evaluate = loop.evaluate
    monkeypatch.setattr(loop, 'evaluate', evaluate)
    run = tmp_path / 'run'
    with pytest.raises(loop.Diverged, match=r'step 10: the validation loss is [\d.]+ \(model\), inf \(ema\); .*keeps'):
        train_and_evaluate(tiny_config(write_digits(tmp_path / 'digits', 10)), run, workers=0)
    evals = [r for r in strict_records(run) if r['kind'] == 'eval']
    assert [(r['step'], r['best'], r['ema']['loss']) for r in evals][1] == (10, False, None)
    params, metadata = read_checkpoint(run / 'best.safetensors')
    assert json.loads(metadata['finetune'])['step'] == 5
    assert all(np.isfinite(value).all() for value in params.values())
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['5']  # no checkpoint of the diverged state


def test_best_weights_that_are_not_finite_are_never_written(digits, tmp_path):
    from flax import nnx

    from nfnet_jax.train import loop

    config = tiny_config(digits, epochs=1)
    run = loop.Finetuning(config, tmp_path, *loop.read_data(config), fresh=True)
    run.best = 0.5
    model = run.state.model
    nnx.update(model, jax.tree.map(lambda x: x * np.nan, nnx.state(model, nnx.Param)))
    with pytest.raises(loop.Diverged, match='the model weights are not finite; .* keeps the best finite weights'):
        run.save_best(model, 'model', 5, 0, 0.6)
    assert not (tmp_path / 'best.safetensors').exists()


FAILING_SAVE = """
import sys
from nfnet_jax import finetune
from nfnet_jax.train import checkpoint

saves = []
real = checkpoint.state_checksums


def second_save_fails(state):  # its run record cannot be written: the save fails in orbax's threads
    saves.append(state)
    return real(state) if len(saves) == 1 else {'unwritable': object()}


checkpoint.state_checksums = second_save_fails
sys.exit(finetune.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failed_checkpoint_save_ends_the_run_in_one_line(tmp_path):
    """The second epoch's save fails in orbax's background threads: the run ends (no hang) with exit 2 and one
    line naming the step, and no temporary checkpoint folder is left."""
    data = write_digits(tmp_path / 'digits', per_class=10)
    run = tmp_path / 'run'
    args = ['--data', str(data), '--output', str(run), *ARGS, '--batch-size', '16', '--warmup-epochs', '0']
    result = subprocess.run(
        [sys.executable, '-c', FAILING_SAVE, *args],
        env=child_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr and 'ERROR:absl' not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors == [
        f'error: could not save checkpoint step 10 in {run / "checkpoints"} (Object of type object is not JSON '
        'serializable); nothing half-written was kept: free space there (or make it writable), then resume from '
        'the last finished checkpoint'
    ]
    assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['5']
    assert not list(run.glob('.lock-*'))  # the lock went with the run
