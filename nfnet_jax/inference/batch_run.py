"""A resumable batch run's folder (`python -m nfnet_jax.batch_predict`): its manifest, file list, chunks and locks,
predicting a chunk, and merging the chunks into one file in input order.

    RUN_DIR/manifest.json       what is computed: model, outputs, top-k, chunk size, the files' hash; and the
                                checkpoint's own class names, which `merge` labels the classes with
    RUN_DIR/files.txt           the input files in order, a list file as --list reads; a file's place (from 0)
                                is its index
    RUN_DIR/chunks/000042.npz   chunk 42's outputs: `index` (file indices), `probabilities` and `classes`
                                (top-k) or `embeddings`, `failed` and `errors` for unreadable files,
                                `process` (who wrote it)
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from nfnet_jax.data.loaders import batches
from nfnet_jax.files import atomic_write, check_output, display_name, list_file_bytes, name_fields, read_list_file
from nfnet_jax.inference.predictor import ClassNames, Predictor

FORMAT = 'nfnet_jax.batch_predict'
MANIFEST, FILE_LIST, CHUNKS = 'manifest.json', 'files.txt', 'chunks'
LOCK_PREFIX = '.lock-process-'
# Compared on resume: a run directory holds the outputs of exactly one computation.
SETTINGS = ('model', 'checkpoint', 'output', 'topk', 'test_size', 'chunk_size', 'files', 'files_sha256')


def chunk_range(chunk: int, chunk_size: int, num_files: int) -> range:
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_files))


def chunk_path(run_dir: Path, chunk: int) -> Path:
    return run_dir / CHUNKS / f'{chunk:06d}.npz'


def read_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding='utf-8'))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f'{run_dir} is not a batch_predict run directory (no readable {MANIFEST}): {err}'
        ) from None
    if manifest.get('format') != FORMAT:
        raise ValueError(f'{run_dir / MANIFEST} was not written by {FORMAT}')
    return manifest


def open_run_dir(run_dir: Path, settings: dict[str, Any], files: Sequence[Path]) -> None:
    """Create the run directory, or check that the one there is the same computation (then it resumes).

    Process 0 goes first; the others then find its manifest on a shared filesystem, or create
    their own (each host keeping its own chunks).
    """
    if jax.process_index() == 0:
        _create_or_check(run_dir, settings, files)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices('batch_predict: run directory ready')
    if jax.process_index() != 0:
        _create_or_check(run_dir, settings, files)


def _create_or_check(run_dir: Path, settings: dict[str, Any], files: Sequence[Path]) -> None:
    if check_run_dir(run_dir, settings, files):
        return
    atomic_write(run_dir / FILE_LIST, lambda tmp: Path(tmp).write_bytes(list_file_bytes(files)))
    manifest = json.dumps({'format': FORMAT, **settings}, indent=1)
    atomic_write(run_dir / MANIFEST, lambda tmp: Path(tmp).write_text(manifest, encoding='utf-8'))


def check_run_dir(run_dir: Path, settings: dict[str, Any], files: Sequence[Path] | None = None) -> bool:
    """True if `run_dir` holds this computation (to resume), False if it is new or empty; else an error."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f'{run_dir} exists and is not a directory')
    if (run_dir / MANIFEST).exists():
        check_settings(run_dir, settings, files)
        return True
    if run_dir.exists() and any(not path.name.startswith(LOCK_PREFIX) for path in run_dir.iterdir()):
        raise FileExistsError(f'{run_dir} is not empty and has no {MANIFEST}: choose an empty or new --output')
    return False


def check_settings(run_dir: Path, settings: dict[str, Any], files: Sequence[Path] | None = None) -> None:
    """Refuse a run directory that holds the outputs of another computation."""
    saved = read_manifest(run_dir)
    changed = [key for key in SETTINGS if saved.get(key) != settings[key]]
    if changed:
        details = ', '.join(
            f'{key}: {saved.get(key)!r} there, {settings[key]!r} now' for key in changed if key != 'files_sha256'
        )
        if 'files_sha256' in changed:
            details += (', ' if details else '') + 'the file list: ' + _list_difference(run_dir, files)
        raise ValueError(
            f'{run_dir} holds another computation ({details}); resume it with the same inputs and options '
            f'(its files: --list {run_dir / FILE_LIST}), or choose a new --output'
        )


def _list_difference(run_dir: Path, files: Sequence[Path] | None) -> str:
    """Where the run's file list and this one first part, and what each has there."""
    try:
        saved = read_list_file(run_dir / FILE_LIST)
    except OSError:
        return f'{FILE_LIST} is not readable'
    if files is None:
        return 'another one'
    first = next((i for i, (a, b) in enumerate(zip(saved, files, strict=False)) if a != b), min(len(saved), len(files)))
    there = display_name(saved[first]) if first < len(saved) else '(the end)'
    now = display_name(files[first]) if first < len(files) else '(the end)'
    more = f'; {len(saved)} files there, {len(files)} now' if len(saved) != len(files) else ''
    return f'file {first} is {there} there, {now} now{more}'


def lock_path(run_dir: Path, process: int) -> Path:
    """The lock a run's process holds while it works: one per process index, so the hosts of one run share nothing."""
    return run_dir / f'{LOCK_PREFIX}{process}'


def predict_chunk(
    files: Sequence[Path],
    indices: range,
    transform: Callable[[Any], np.ndarray],
    predictor: Predictor,
    batch_size: int,
    bar: tqdm,
) -> tuple[list[int], list[tuple[np.ndarray, ...]], dict[int, str]]:
    """One chunk's (file indices, output tuple per batch, {index: error} of unreadable files)."""
    index_of = {files[i]: i for i in indices}
    failed: dict[int, str] = {}

    def on_error(path: Path, message: str) -> None:
        failed[index_of[path]] = message
        bar.write(f'error: {message}', file=sys.stderr)
        bar.update()

    done, outputs = [], []
    for paths, images in batches([files[i] for i in indices], transform, batch_size, on_error):
        outputs.append(predictor(images, batch_size))
        done += [index_of[path] for path in paths]
        bar.update(len(paths))
    return done, outputs, failed


def write_chunk(
    run_dir: Path,
    chunk: int,
    done: list[int],
    outputs: list[tuple[np.ndarray, ...]],
    failed: dict[int, str],
    embeddings: bool,
    process: int,
) -> None:
    """One finished chunk, atomically: present means complete."""
    columns = [np.concatenate(column) for column in zip(*outputs, strict=True)] if outputs else None
    arrays: dict[str, np.ndarray] = {
        'index': np.asarray(done, np.int64),
        'failed': np.asarray(sorted(failed), np.int64),
        'errors': np.asarray([failed[i] for i in sorted(failed)], dtype=str),
        'process': np.asarray(process),
    }
    if embeddings:
        arrays['embeddings'] = columns[0].astype(np.float32) if columns else np.zeros((0, 0), np.float32)
    else:
        arrays['probabilities'] = columns[0] if columns else np.zeros((0, 0), np.float32)
        arrays['classes'] = columns[1].astype(np.int32) if columns else np.zeros((0, 0), np.int32)

    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)

    atomic_write(chunk_path(run_dir, chunk), write)


def merge(run_dir: Path, out: Path, force: bool = False) -> tuple[int, int, int]:
    """Join a finished run's chunks into one file in input order: JSON lines (`out` .jsonl) or, for embeddings,
    an (N, D) .npy and a .files.txt naming each row. (rows written, files, unreadable files)."""
    manifest = read_manifest(run_dir)
    if hashlib.sha256((run_dir / FILE_LIST).read_bytes()).hexdigest() != manifest['files_sha256']:
        raise ValueError(f'{run_dir / FILE_LIST} does not match its manifest: the run directory was altered')
    files = [str(path) for path in read_list_file(run_dir / FILE_LIST)]
    embeddings = manifest['output'] == 'embeddings'
    suffix = '.npy' if embeddings else '.jsonl'
    if out.suffix != suffix:
        raise ValueError(f'{out}: this run holds {manifest["output"]}, merged into a {suffix} file')
    row_files = out.with_suffix('.files.txt')
    for path in (out, row_files) if embeddings else (out,):
        check_output(path, force)
    num_chunks = -(-len(files) // manifest['chunk_size'])
    missing = [c for c in range(num_chunks) if not chunk_path(run_dir, c).exists()]
    if missing:
        raise FileNotFoundError(
            f'{len(missing)} of {num_chunks} chunks are not finished (first: {missing[0]}); '
            'run the same `run` command again to finish them, then merge'
        )
    chunks = [
        open_chunk(chunk_path(run_dir, c), 'embeddings' if embeddings else 'probabilities') for c in range(num_chunks)
    ]
    failed = {int(i): str(e) for chunk in chunks for i, e in zip(chunk['failed'], chunk['errors'], strict=True)}
    if embeddings:
        rows = _merge_embeddings(chunks, files, out, row_files, force)
    else:
        # The labels of the run's Predictor: its checkpoint's own class names, as the run recorded them.
        class_names = ClassNames.of(manifest['num_classes'], manifest.get('class_names'))
        rows = _merge_predictions(chunks, files, failed, class_names, out, force)
    return rows, len(files), len(failed)


def open_chunk(path: Path, output: str) -> Any:
    """A finished chunk's arrays (read lazily, as `np.load` does), each read once here so that a damaged chunk
    (truncated, overwritten, not a chunk at all) is one ValueError that names it and says what to do."""
    try:
        chunk = np.load(path, allow_pickle=False)
        for key in ('index', 'failed', 'errors', output):
            chunk[key]
    except Exception as err:  # zipfile, numpy and the OS each report damage their own way
        raise ValueError(
            f'{display_name(path)}: a damaged chunk ({type(err).__name__}: not a complete .npz of this run); '
            'delete it and run the same `run` command again to recompute it, then merge'
        ) from None
    return chunk


def _merge_predictions(
    chunks: list, files: list[str], failed: dict[int, str], class_names: ClassNames, out: Path, force: bool
) -> int:

    def write(tmp: str) -> None:
        with open(tmp, 'w', encoding='utf-8') as f:
            for chunk in chunks:  # chunks are in file order, and so are the rows of each
                rows = {int(i): row for row, i in enumerate(chunk['index'])}
                for i in sorted(rows.keys() | set(int(j) for j in chunk['failed'])):
                    if i in failed:
                        f.write(json.dumps({**name_fields(files[i]), 'error': failed[i]}) + '\n')
                        continue
                    top = chunk['probabilities'][rows[i]], chunk['classes'][rows[i]]
                    f.write(class_names.format_topk(Path(files[i]), *top, as_json=True) + '\n')

    atomic_write(out, write, force=force)
    return sum(len(chunk['index']) for chunk in chunks)


def _merge_embeddings(chunks: list, files: list[str], out: Path, row_files: Path, force: bool) -> int:
    """An (N, D) float32 .npy written chunk by chunk (never all in memory) and the file of each row."""
    rows = sum(len(chunk['index']) for chunk in chunks)
    width = next((chunk['embeddings'].shape[1] for chunk in chunks if len(chunk['index'])), 0)

    def write(tmp: str) -> None:
        array = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=(rows, width))
        start = 0
        for chunk in chunks:
            block = chunk['embeddings']
            array[start : start + len(block)] = block
            start += len(block)
        array.flush()
        del array

    atomic_write(out, write, force=force)
    names = list_file_bytes(files[int(i)] for chunk in chunks for i in chunk['index'])
    atomic_write(row_files, lambda tmp: Path(tmp).write_bytes(names), force=force)
    return rows
