"""Classify or embed a whole image collection on every device of every host, resumably.

    python -m nfnet_jax.batch_predict run IMAGES_OR_FOLDERS... --model dm_nfnet_f0.dm_in1k --output RUN_DIR
    python -m nfnet_jax.batch_predict merge RUN_DIR predictions.jsonl

The files (folders searched recursively, or `--list FILE`: one path per line, or NUL-separated) are split
into chunks of `--chunk-size` consecutive files; chunk c belongs to process c % num_processes,
which reads only its own chunks' images and writes each finished chunk atomically:

    RUN_DIR/manifest.json       what is computed: model, outputs, top-k, chunk size, the files' hash; and the
                                checkpoint's own class names, which `merge` labels the classes with
    RUN_DIR/files.txt           the input files in order, a list file as --list reads; a file's place (from 0)
                                is its index
    RUN_DIR/chunks/000042.npz   chunk 42's outputs: `index` (file indices), `probabilities` and `classes`
                                (top-k) or `embeddings`, `failed` and `errors` for unreadable files,
                                `process` (who wrote it)

Running the same command again resumes: finished chunks are skipped, so an interruption costs
at most the chunks in progress. `merge` writes one file in input order once every chunk is
there: JSON lines (the `predict --json` format, plus `{"file", "error"}` for unreadable files),
or an (N, D) .npy of embeddings with a `.files.txt` naming each row. Unreadable files are
reported by name and skipped; `run` exits with status 1 if it met one, 2 for bad arguments.

Multi-host: run `run` once per host with `--distributed` (TPU pods, SLURM: found automatically)
or `--coordinator HOST:PORT --num-processes N --process-id I`. Every host must see the same
input list and the same RUN_DIR (a shared filesystem); without one, each host keeps its own
chunks, resumes with the same process count, and the chunk folders are copied together to merge.
"""

from __future__ import annotations

import argparse
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

from nfnet_jax import parallel
from nfnet_jax.cli import (
    add_cpu_arguments,
    add_distributed_arguments,
    add_image_arguments,
    add_model_arguments,
    apply_cpu_arguments,
    apply_image_arguments,
    check_model_arguments,
    initialize_from_args,
    load_model,
    run_command,
)
from nfnet_jax.data import batches, create_transform, find_images, resolve_model_data_config
from nfnet_jax.files import (
    atomic_write,
    check_output,
    check_output_folder,
    display_name,
    hold_lock,
    list_file_bytes,
    name_fields,
    read_list_file,
)
from nfnet_jax.inference.predictor import ClassNames, Predictor
from nfnet_jax.progress import log, progress

FORMAT = 'nfnet_jax.batch_predict'
MANIFEST, FILE_LIST, CHUNKS = 'manifest.json', 'files.txt', 'chunks'
LOCK_PREFIX = '.lock-process-'
# Compared on resume: a run directory holds the outputs of exactly one computation.
SETTINGS = ('model', 'checkpoint', 'output', 'topk', 'test_size', 'chunk_size', 'files', 'files_sha256')


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m nfnet_jax.batch_predict',
        description='Top-k classes or embeddings of many images, on all devices of all hosts, resumable.',
    )
    commands = parser.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', help='compute (or resume computing) the outputs into a run directory')
    run.add_argument('inputs', nargs='*', type=Path, help='image files, or folders (searched recursively)')
    run.add_argument('--list', type=Path, help='a file naming one image per line, or NUL-separated (instead of inputs)')
    add_model_arguments(run)
    run.add_argument('--output', type=Path, required=True, help='the run directory (created, or resumed)')
    run.add_argument('--embeddings', action='store_true', help='pooled embeddings instead of top-k classes')
    run.add_argument('--topk', type=int, default=5, help='classes kept per image (default 5)')
    run.add_argument('--batch-size', type=int, help='images per step over all devices (default 8 per data shard)')
    run.add_argument('--chunk-size', type=int, default=512, help='files per output chunk (default 512)')
    run.add_argument('--model-parallelism', type=int, default=1, help='devices splitting the weights (default 1)')
    run.add_argument('--test-size', action='store_true', help="use the tag's larger test resolution and crop")
    add_cpu_arguments(run)
    add_image_arguments(run)
    add_distributed_arguments(run)
    merge = commands.add_parser('merge', help='write one file with every output, in input order')
    merge.add_argument('run_dir', type=Path, help='a run directory whose chunks are all finished')
    merge.add_argument('out', type=Path, help='predictions .jsonl, or embeddings .npy (plus OUT.files.txt)')
    merge.add_argument('--force', action='store_true', help='overwrite OUT if it exists')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    return run_command(_run if args.command == 'run' else _merge, args)


# ------------------------------------------------------------------------------------------ run


def input_files(args: argparse.Namespace) -> list[Path]:
    """The inputs' files (`find_images`), or those of the `--list` file (one per line, or NUL-separated), each once."""
    if bool(args.inputs) == bool(args.list):
        raise ValueError('name the images either as inputs (files or folders) or with --list FILE, not both')
    if args.list and not args.list.is_file():
        raise FileNotFoundError(f'{args.list}: no such list file')
    files = read_list_file(args.list) if args.list else find_images(args.inputs)
    if not files:
        raise FileNotFoundError('no image files to process')
    seen: set[Path] = set()
    repeated = [path for path in files if path in seen or seen.add(path)]
    if repeated:
        raise ValueError(f'{len(repeated)} files are listed more than once (e.g. {repeated[0]}); list each once')
    return files


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


def _run(args: argparse.Namespace) -> int:
    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # before any JAX computation
    initialize_from_args(args)
    if args.topk < 1 or args.chunk_size < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError('--topk, --chunk-size and --batch-size must be at least 1')
    apply_image_arguments(args)
    files = input_files(args)
    mesh = parallel.make_mesh(args.model_parallelism)
    data_shards, processes, process = mesh.shape[parallel.DATA_AXIS], jax.process_count(), jax.process_index()
    batch_size = args.batch_size or 8 * data_shards
    if data_shards % processes:
        raise ValueError(
            f'--model-parallelism {args.model_parallelism} spans hosts ({mesh.devices.size} devices, {processes} '
            'processes): keep it to the devices of one host'
        )
    if batch_size % data_shards:
        raise ValueError(f'--batch-size {batch_size} must be a multiple of the {data_shards} data shards of the mesh')
    process_batch = batch_size // processes
    settings = {
        'model': args.model,
        'checkpoint': None if args.checkpoint is None else str(args.checkpoint),
        'output': 'embeddings' if args.embeddings else 'topk',
        'topk': None if args.embeddings else args.topk,
        'test_size': args.test_size,
        'chunk_size': args.chunk_size,
        'files': len(files),
        'files_sha256': hashlib.sha256(list_file_bytes(files)).hexdigest(),
    }
    check_model_arguments(args)
    # Refused before the model loads. Only process 0 may find the folder half-made by itself; the
    # others check a manifest only once it is there (it is written atomically).
    check_output_folder(args.output)
    if process == 0 or (args.output / MANIFEST).exists():
        check_run_dir(args.output, settings, files)
    args.output.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path(args.output, process), 'batch_predict run'):
        model = load_model(args)
        predictor = Predictor(model, args.checkpoint, topk=args.topk, embeddings=args.embeddings, mesh=mesh)
        config = resolve_model_data_config(model, use_test_size=args.test_size)
        settings |= {'architecture': model.pretrained_cfg.architecture, 'num_classes': model.num_classes}
        settings |= {'input_size': list(config['input_size']), 'class_names': predictor.own_class_names}
        open_run_dir(args.output, settings, files)
        transform = create_transform(**config)

        num_chunks = -(-len(files) // args.chunk_size)
        mine = [c for c in range(process, num_chunks, processes)]
        pending = [c for c in mine if not chunk_path(args.output, c).exists()]
        # Every process makes the same number of sharded calls: those with less work left pad with empty batches.
        my_steps = sum(-(-len(chunk_range(c, args.chunk_size, len(files))) // process_batch) for c in pending)
        steps = _max_over_processes(my_steps)
        log(
            f'process {process}/{processes}: {len(mine) - len(pending)} of {len(mine)} chunks done, '
            f'{len(pending)} to do; {mesh.devices.size} devices (mesh {dict(mesh.shape)}), batches of {batch_size} '
            f'({process_batch} per process)'
        )

        todo = sum(len(chunk_range(c, args.chunk_size, len(files))) for c in pending)
        bar = progress(total=todo, unit='img', desc=f'process {process}' if processes > 1 else None)
        failures = 0
        for chunk in pending:
            indices = chunk_range(chunk, args.chunk_size, len(files))
            done, outputs, failed = predict_chunk(files, indices, transform, predictor, process_batch, bar)
            steps -= len(outputs)
            write_chunk(args.output, chunk, done, outputs, failed, args.embeddings, process)
            failures += len(failed)
        no_images = np.zeros((0, *config['input_size'][1:], config['input_size'][0]), np.float32)
        for _ in range(steps):
            predictor(no_images, process_batch)
        bar.close()
    log(f'process {process}: {todo} files of {len(pending)} chunks written to {args.output / CHUNKS}')
    return 1 if failures else 0


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


def _max_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int64))))


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


# ---------------------------------------------------------------------------------------- merge


def _merge(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.run_dir)
    if hashlib.sha256((args.run_dir / FILE_LIST).read_bytes()).hexdigest() != manifest['files_sha256']:
        raise ValueError(f'{args.run_dir / FILE_LIST} does not match its manifest: the run directory was altered')
    files = [str(path) for path in read_list_file(args.run_dir / FILE_LIST)]
    embeddings = manifest['output'] == 'embeddings'
    suffix = '.npy' if embeddings else '.jsonl'
    if args.out.suffix != suffix:
        raise ValueError(f'{args.out}: this run holds {manifest["output"]}, merged into a {suffix} file')
    row_files = args.out.with_suffix('.files.txt')
    for out in (args.out, row_files) if embeddings else (args.out,):
        check_output(out, args.force)
    num_chunks = -(-len(files) // manifest['chunk_size'])
    missing = [c for c in range(num_chunks) if not chunk_path(args.run_dir, c).exists()]
    if missing:
        raise FileNotFoundError(
            f'{len(missing)} of {num_chunks} chunks are not finished (first: {missing[0]}); '
            'run the same `run` command again to finish them, then merge'
        )
    chunks = [np.load(chunk_path(args.run_dir, c)) for c in range(num_chunks)]
    failed = {int(i): str(e) for chunk in chunks for i, e in zip(chunk['failed'], chunk['errors'], strict=True)}
    if embeddings:
        rows = _merge_embeddings(chunks, files, args.out, row_files, args.force)
    else:
        # The labels of the run's Predictor: its checkpoint's own class names, as the run recorded them.
        class_names = ClassNames.of(manifest['num_classes'], manifest.get('class_names'))
        rows = _merge_predictions(chunks, files, failed, class_names, args.out, args.force)
    log(f'wrote {args.out}: {rows} of {len(files)} files' + (f'; {len(failed)} unreadable' if failed else ''))
    return 0


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


if __name__ == '__main__':
    sys.exit(main())
