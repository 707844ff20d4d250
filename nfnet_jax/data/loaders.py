"""An input pipeline for training on your own images: folders or list files, decoded and augmented by grain workers.

- `image_folder(root)` finds timm's ImageFolder samples (one sub-folder per class, class names in
  natural sort order, files in natural sort order, timm's extensions; a folder's images are
  found by `nfnet_jax.data.images.list_images`, as the commands' are); `list_file(path)` reads
  `path<TAB>label` or `path,label` lines. `split` holds out a seeded, per-class fraction.
- `TrainLoader` yields global steps of training batches: each epoch a fresh permutation drawn
  from (seed, epoch); each global batch the next `global_batch_size` samples of it (the last,
  partial batch of an epoch dropped, as timm's train loader does); each process reads only its
  own rows (`nfnet_jax.parallel.process_rows`), in the order `parallel.global_batch` joins them.
- Every sample's augmentation draws come from `numpy.random.default_rng((seed, epoch, index))`,
  `index` being the sample's place in the data set. A batch is therefore a function of
  (seed, step) only: it does not depend on the number of grain workers or processes, and a
  loader started at step `s` yields exactly what an uninterrupted one yields from `s` on. The
  position to save with a training checkpoint is `loader.position(step)`.
- A file that cannot be decoded is replaced by the next sample of the epoch's order (so every
  batch keeps its shape and stays deterministic); its name comes back with the batch
  (`batch.skipped`) for the caller to report and count.

The work runs in grain's `MapDataset`: worker processes (`workers`) decode and augment, each
producing whole batches, while the main process trains. Given a transform's `host_part()`, the
batches are uint8 (a quarter of float32's bytes through grain's shared memory and to the device),
for `nfnet_jax.data.device.device_stage` to normalise (and erase) inside the jitted step. An
iterator yields exactly `len(loader)` batches and stops its workers in the background, so a pass
never waits for them to exit.
"""

from __future__ import annotations

import atexit
import csv
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:
    import grain
except ImportError as err:  # a dependency that may be missing where nfnet_jax was not installed with pip
    raise ImportError('nfnet_jax.data.loaders needs grain: pip install grain') from err

from nfnet_jax.data.images import IMAGE_EXTENSIONS, is_hidden, list_images, load_image, natural_key, natural_order
from nfnet_jax.files import display_name

# A decode failure is replaced by the next sample of the epoch; this many failures in a row mean the data is gone.
MAX_REPLACEMENTS = 64
# A list file's class indices stay below this: one stray huge index would otherwise build that many class names.
MAX_CLASSES = 1_000_000


def this_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(this process's index, the number of processes): JAX's, unless both are given (tests, tools)."""
    if process_index is None or process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return process_index, process_count


@dataclass(frozen=True)
class Samples:
    """Image files, their class indices and the class names (index -> name)."""

    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str = ''

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Samples:
        indices = np.asarray(indices, np.int64)
        return Samples(tuple(self.files[i] for i in indices), self.labels[indices], self.class_names, self.source)

    def counts(self) -> np.ndarray:
        """How many samples each class has."""
        return np.bincount(self.labels, minlength=len(self.class_names))


def image_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> Samples:
    """timm's ImageFolder: the images under each sub-folder of `root` (searched recursively), one class per folder.

    Class indices follow the folder names in natural sort order, unless `class_names` gives them
    (a validation folder must use the training folder's). Raises a ValueError naming the problem
    for an empty folder, image files outside any class folder, or a class folder with no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'{root}: no such folder')
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)), key=lambda p: p.name)
    loose = [
        p.name for p in root.iterdir() if p.is_file() and not is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if loose:
        raise ValueError(
            f'{root} has image files outside any class folder ({", ".join(sorted(loose)[:3])}...): '
            'put each class in its own sub-folder'
        )
    if not folders:
        raise ValueError(f'{root} has no class folders: expected one sub-folder of images per class')
    names = sorted((p.name for p in folders), key=natural_key) if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}
    label_of: dict[Path, int] = {}
    for folder in folders:
        found = list_images(folder, IMAGE_EXTENSIONS)
        if not found:
            raise ValueError(f'class folder {folder} holds no image ({", ".join(IMAGE_EXTENSIONS)} files)')
        if folder.name not in index:
            raise ValueError(f'{folder}: class {folder.name!r} is not one of the training classes')
        label_of |= dict.fromkeys(found, index[folder.name])
    samples = [(str(path), label_of[path]) for path in natural_order(label_of)]
    return _samples(samples, names, str(root))


def list_file(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> Samples:
    """Samples from a text file of `path<TAB>label` lines, or a CSV of `path,label` (a header line is skipped).

    The file is UTF-8 (a byte-order mark is allowed). Relative paths are relative to the list file.
    Labels are class names (indexed in natural sort order, or as `class_names` gives them) or, when
    every label is a whole number (ASCII digits), class indices below `MAX_CLASSES`; a mix of the two
    is refused, as it would silently make the indices names. Every file must exist: the missing ones
    are named in one error. Every other error names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such list file')
    try:
        text = path.read_text(encoding='utf-8-sig')
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b'\n') + 1
        raise ValueError(f'{path}: line {line} is not UTF-8 text ({err.reason}); save the list file as UTF-8') from None
    delimiter = '\t' if '\t' in text else ','
    lines = [
        (number, row)
        for number, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1)
        if row and any(c.strip() for c in row)
    ]
    if lines and lines[0][1][0].strip().lower() in ('path', 'file', 'filename', 'image'):
        lines = lines[1:]
    bad = [(number, row) for number, row in lines if len(row) != 2]
    if bad:
        raise ValueError(f'{path}: line {bad[0][0]} is not "path{delimiter!r}label": {bad[0][1]}')
    files = [str(path.parent / row[0].strip()) for _, row in lines]
    labels = [row[1].strip() for _, row in lines]
    line_of = {label: number for (number, _), label in reversed(list(zip(lines, labels, strict=True)))}
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(
            f'{path} names {len(missing)} missing file(s): {", ".join(missing[:5])}{"..." if len(missing) > 5 else ""}'
        )
    if class_names is not None:
        names = list(class_names)
    else:
        names = class_names_of(labels, line_of, path)
        labels = [str(int(label)) if is_class_index(label) else label for label in labels]  # '007' is class 7
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index), key=line_of.__getitem__)
    if unknown:
        raise ValueError(
            f'{path}: line {line_of[unknown[0]]}: labels {unknown[:5]} are not among the classes {names[:10]}'
        )
    return _samples([(f, index[label]) for f, label in zip(files, labels, strict=True)], names, str(path))


def is_class_index(label: str) -> bool:
    """A label that is a class index: ASCII digits only (not '²' or other characters Python calls digits)."""
    return label.isascii() and label.isdigit()


def class_names_of(labels: Sequence[str], line_of: Mapping[str, int], source: Path) -> list[str]:
    """A list file's classes: its labels in natural order, or, when all are indices, '0' to the largest.

    Refused, naming `source` and the line (`line_of`): an index of `MAX_CLASSES` or more (which would
    build that many class names), and indices mixed with names.
    """
    indices = [label for label in labels if is_class_index(label)]
    if not indices:
        return sorted(set(labels), key=natural_key)
    named = next((label for label in labels if not is_class_index(label)), None)
    if named is not None:
        raise ValueError(
            f'{source}: line {line_of[named]}: label {named!r} is a class name, but line {line_of[indices[0]]} '
            f'has the class index {indices[0]!r}; give every line a class name, or every line an index'
        )
    largest = max(indices, key=int)
    if int(largest) >= MAX_CLASSES:
        raise ValueError(
            f'{source}: line {line_of[largest]}: class index {largest} is over the limit of {MAX_CLASSES:,} '
            'classes; class indices count from 0 (use class names for other labels)'
        )
    return [str(i) for i in range(int(largest) + 1)]


def read_samples(source: str | os.PathLike, class_names: Sequence[str] | None = None) -> Samples:
    """A folder (`image_folder`) or a list file (`list_file`)."""
    return image_folder(source, class_names) if Path(source).is_dir() else list_file(source, class_names)


def _samples(samples: list[tuple[str, int]], names: Sequence[str], source: str) -> Samples:
    files = tuple(s[0] for s in samples)
    return Samples(files, np.array([s[1] for s in samples], np.int32), tuple(names), source)


def split(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """(train, held out): `fraction` of every class (rounded, at least one of a class with two or more), seeded."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f'the validation fraction must be between 0 and 1, got {fraction}')
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in range(len(samples.class_names)):
        members = rng.permutation(np.flatnonzero(samples.labels == label))
        count = min(max(round(fraction * len(members)), 1), len(members) - 1) if len(members) > 1 else 0
        held.append(members[:count])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(samples)), held_out)
    return samples.subset(kept), samples.subset(held_out)


def check_samples(samples: Samples, what: str, min_classes: int = 2) -> None:
    """Refuse, before any long work, what cannot train: too few classes, or a class whose images all fail to decode.

    Each class's files are opened in order until one decodes, so a class of unreadable files is
    found however big the data set is (and a readable data set costs one decode per class).
    """
    if len(samples) == 0:
        raise ValueError(f'{what} ({samples.source}) holds no images')
    present = np.flatnonzero(samples.counts())
    if len(present) < min_classes:
        raise ValueError(
            f'{what} ({samples.source}) has {len(present)} class(es) with images; fine-tuning a classifier needs at '
            f'least {min_classes}'
        )
    for label in present:
        files = [f for f, lab in zip(samples.files, samples.labels, strict=True) if lab == label]
        errors = []
        for file in files:
            try:
                load_image(file)
                break
            except OSError as err:
                errors.append(str(err))
        else:
            raise ValueError(
                f'{what}: class {samples.class_names[label]!r} has no readable image ({len(files)} files; '
                f'first error: {errors[0]})'
            )


@dataclass
class Batch:
    """This process's rows of one global batch: images (N, H, W, C) (uint8 from a host_part transform, else
    float32), labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray
    step: int
    skipped: list[str] = field(default_factory=list)  # files that failed to decode, replaced by the next sample


def _load(samples: Samples, order: np.ndarray, at: int, transform: Callable, rng_for: Callable | None) -> tuple:
    """The sample at place `at` of `order`, or the next readable one; (image, label, skipped files)."""
    skipped = []
    for offset in range(MAX_REPLACEMENTS):
        index = int(order[(at + offset) % len(order)])
        try:
            image = load_image(samples.files[index])
        except OSError:
            skipped.append(samples.files[index])
            continue
        pixels = transform(image) if rng_for is None else transform(image, rng_for(index))
        return pixels, samples.labels[index], skipped
    raise OSError(f'{MAX_REPLACEMENTS} files in a row could not be read, the last {skipped[-1]}: is the data there?')


def _stack(rows: Sequence[tuple], step: int) -> tuple:
    """A batch as it leaves a worker: a tuple of arrays and plain values (grain moves arrays in shared memory)."""
    images = np.stack([r[0] for r in rows])
    images = images if images.dtype == np.uint8 else images.astype(np.float32, copy=False)
    return images, np.array([r[1] for r in rows], np.int32), step, [f for r in rows for f in r[2]]


@dataclass(frozen=True)
class InWorker:
    """`fn` run where grain runs it, with this process's settings a worker process would not have: PIL's
    decompression-bomb limit (`nfnet_jax.data.images.set_max_image_pixels`)."""

    fn: Callable[[Any], Any]
    max_image_pixels: int | None = field(default_factory=lambda: Image.MAX_IMAGE_PIXELS)

    def __call__(self, element: Any) -> Any:
        Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        return self.fn(element)


def iterate(fn: Callable[[int], Any], count: int, workers: int, threads: int | None = None) -> Iterator[Any]:
    """`fn(0)`, ..., `fn(count - 1)` in order, computed ahead by `workers` grain processes (0: threads of this one).

    Each worker computes `threads` elements at a time (default: 1 in a worker process, whose
    parallelism is the processes; 4 in this one, as PIL releases the GIL while it decodes). The
    iterator stops after `count` elements, stopping the workers on a thread of its own: grain
    would take a second or more to find the end and join them.
    """
    threads = (1 if workers > 0 else 4) if threads is None else max(threads, 1)
    dataset = grain.MapDataset.range(count).map(InWorker(fn))
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside an absl app, take the defaults
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return _first(iter(iter_dataset), count)


def _first(iterator: Any, count: int) -> Iterator[Any]:
    try:
        for _ in range(count):
            yield next(iterator)
    finally:
        # Collected while the interpreter exits, a thread would never start (the workers end with the process).
        if sys is not None and not sys.is_finalizing():
            closing = threading.Thread(target=iterator.close, name='grain-close', daemon=True)
            closing.start()
            _CLOSING.append(closing)


_CLOSING: list[threading.Thread] = []  # iterators being closed in the background


@atexit.register  # after grain's import, so it runs before multiprocessing's exit finalizers close them again
def _finish_closing() -> None:
    for closing in _CLOSING:
        closing.join(timeout=30)


class TrainLoader:
    """Training batches for global steps `start_step` ..: this process's rows of each, augmented by `transform`.

    `transform(image, rng)` is a training transform (`nfnet_jax.data.create_transform(...,
    is_training=True)`). `process_index` / `process_count` default to JAX's, so each host of a
    multi-host run reads only its own share.
    """

    def __init__(
        self,
        samples: Samples,
        transform: Callable[[Any, np.random.Generator], np.ndarray],
        global_batch_size: int,
        *,
        seed: int = 0,
        epochs: int = 1,
        start_step: int = 0,
        workers: int = 0,
        threads: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        process_index, process_count = this_process(process_index, process_count)
        if global_batch_size % process_count:
            raise ValueError(f'the batch size {global_batch_size} must be a multiple of the {process_count} processes')
        if len(samples) < global_batch_size:
            raise ValueError(
                f'{len(samples)} training images are fewer than one batch of {global_batch_size}: lower --batch-size'
            )
        self.samples, self.transform, self.seed, self.epochs = samples, transform, seed, epochs
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.first_row = process_index * self.local_batch_size
        self.steps_per_epoch = len(samples) // global_batch_size
        self.total_steps = epochs * self.steps_per_epoch
        if not 0 <= start_step <= self.total_steps:
            raise ValueError(f'start step {start_step} is outside the run of {self.total_steps} steps')
        self.start_step, self.workers, self.threads = start_step, workers, threads

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the samples: a function of (seed, epoch) alone."""
        return _epoch_order(len(self.samples), self.seed, epoch)

    def position(self, step: int) -> dict[str, int]:
        """Where the loader stands after `step` global steps: what a checkpoint saves to resume it."""
        epoch, batch = divmod(step, self.steps_per_epoch)
        return {
            'step': step,
            'epoch': epoch,
            'batch_in_epoch': batch,
            'samples_seen': step * self.global_batch_size,
            'seed': self.seed,
            'global_batch_size': self.global_batch_size,
            'num_samples': len(self.samples),
        }

    def batch(self, step: int) -> Batch:
        """This process's rows of global step `step` (what iterating yields, computed here)."""
        return Batch(*self._rows(step))

    def _rows(self, step: int) -> tuple:
        epoch, batch = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        start = batch * self.global_batch_size + self.first_row
        seed = self.seed

        def rng_for(index: int) -> np.random.Generator:
            return np.random.default_rng((seed, epoch, index))

        rows = [_load(self.samples, order, start + r, self.transform, rng_for) for r in range(self.local_batch_size)]
        return _stack(rows, step)

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self) -> Iterator[Batch]:
        rows = iterate(functools.partial(_offset, self._rows, self.start_step), len(self), self.workers, self.threads)
        return (Batch(*row) for row in rows)


def _offset(fn: Callable[[int], Any], start: int, index: int) -> Any:
    return fn(start + index)


@functools.lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(num_samples)


class EvalLoader:
    """Evaluation batches of every sample once, in order, through `transform` (an eval transform).

    Every global batch has `global_batch_size` rows; the last is padded with zero images
    labelled -1, which `nfnet_jax.train.eval_step_fn` leaves out of its sums. A file that fails
    to decode is left out the same way, and named in `batch.skipped`.
    """

    def __init__(
        self,
        samples: Samples,
        transform: Callable[[Any], np.ndarray],
        global_batch_size: int,
        *,
        workers: int = 0,
        threads: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        process_index, process_count = this_process(process_index, process_count)
        self.samples, self.transform, self.workers, self.threads = samples, transform, workers, threads
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.first_row = process_index * self.local_batch_size
        self.num_batches = -(-len(samples) // global_batch_size)
        height, width = transform.img_size
        self.image_shape = (height, width, len(transform.mean))
        self.dtype = getattr(transform, 'dtype', np.float32)

    def batch(self, index: int) -> Batch:
        """This process's rows of batch `index` (what iterating yields, computed here)."""
        return Batch(*self._rows(index))

    def _rows(self, index: int) -> tuple:
        rows = []
        for r in range(self.local_batch_size):
            at = index * self.global_batch_size + self.first_row + r
            if at >= len(self.samples):
                rows.append((np.zeros(self.image_shape, self.dtype), -1, []))
                continue
            try:
                rows.append((self.transform(load_image(self.samples.files[at])), self.samples.labels[at], []))
            except OSError:  # counted as skipped, left out of the accuracy like padding
                rows.append((np.zeros(self.image_shape, self.dtype), -1, [self.samples.files[at]]))
        return _stack(rows, index)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return (Batch(*rows) for rows in iterate(self._rows, self.num_batches, self.workers, self.threads))


# Reading in worker processes pays off from this many files on: a worker starts in about a second.
FILES_PER_WORKER = 128


def batches(
    files: Sequence[Path],
    transform: Callable,
    batch_size: int,
    on_error: Callable[[Path, str], None],
    workers: int | None = None,
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """The readable images in batches of `batch_size`, in order; unreadable files go to `on_error` and are skipped.

    Files are read and transformed by grain (`iterate`), `batch_size` files at a time, ahead of the
    caller, in `workers` processes (default: one per core, at most 8, and one per `FILES_PER_WORKER`
    files; 0: threads of this process), so memory stays bounded however many files there are. A
    transform's `host_part()` gives uint8 batches.
    """
    if workers is None:
        workers = min(os.cpu_count() or 1, 8, len(files) // FILES_PER_WORKER)
    reader = ReadFiles(tuple(files), transform, batch_size)
    paths, arrays = [], []
    for start, (images, errors) in zip(
        range(0, len(files), batch_size), iterate(reader, reader.count, workers), strict=True
    ):
        read = iter(images)
        for path in files[start : start + batch_size]:
            if path in errors:
                on_error(path, errors[path])
                continue
            paths.append(path)
            arrays.append(next(read))
            if len(arrays) == batch_size:
                yield paths, np.stack(arrays)
                paths, arrays = [], []
    if arrays:
        yield paths, np.stack(arrays)


@dataclass(frozen=True)
class ReadFiles:
    """Chunk `i` of `files` (`batch_size` files each) read and transformed: (the readable images stacked,
    {path: error} of the others). A chunk is read in one grain worker and crosses as one array."""

    files: tuple[Path, ...]
    transform: Callable
    batch_size: int

    @property
    def count(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __call__(self, chunk: int) -> tuple[np.ndarray, dict[Path, str]]:
        arrays, errors = [], {}
        for path in self.files[chunk * self.batch_size : (chunk + 1) * self.batch_size]:
            try:
                arrays.append(self.transform(load_image(path)))
            except OSError as err:
                errors[path] = str(err)
            except Exception as err:  # the transform failing on one image stops nothing but that image
                errors[path] = f'{display_name(path)}: {type(err).__name__}: {err}'
        return (np.stack(arrays) if arrays else np.zeros((0,), np.uint8)), errors
