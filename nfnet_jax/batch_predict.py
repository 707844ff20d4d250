"""Classify or embed a whole image collection on every device of every host, resumably.

    python -m nfnet_jax.batch_predict run IMAGES_OR_FOLDERS... --model dm_nfnet_f0.dm_in1k --output RUN_DIR
    python -m nfnet_jax.batch_predict merge RUN_DIR predictions.jsonl

The files (folders searched recursively, or `--list FILE`: one path per line, or NUL-separated) are split
into chunks of `--chunk-size` consecutive files; chunk c belongs to process c % num_processes,
which reads only its own chunks' images and writes each finished chunk atomically into RUN_DIR
(its layout: `nfnet_jax.inference.batch_run`).

Running the same command again resumes: finished chunks are skipped, so an interruption costs
at most the chunks in progress. `merge` writes one file in input order once every chunk is
there: JSON lines (the `predict --json` format, plus `{"file", "error"}` for unreadable files),
or an (N, D) .npy of embeddings with a `.files.txt` naming each row. Unreadable files are
reported by name and skipped; `run` exits with status 1 if it met one, 2 for bad arguments.

Multi-host: run `run` once per host with `--distributed` (TPU pods, SLURM: found automatically)
or `--coordinator HOST:PORT --num-processes N --process-id I`. Every host must name the same
files in the same order, with the same options: compared at start, a host that differs, or whose
RUN_DIR holds another computation, refuses the run on every host, in one line naming it. RUN_DIR
may be on a filesystem the hosts share, or each host's own: each process decides from its own
RUN_DIR which of its chunks are done, and the processes agree on how many sharded calls are left.
Without a shared filesystem each host keeps its own chunks, resumes with the same process count,
and the chunk folders are copied together to merge.
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
from nfnet_jax.data import create_transform, find_images, resolve_model_data_config
from nfnet_jax.data.device import device_stage
from nfnet_jax.files import (
    check_output_folder,
    hold_lock,
    list_file_bytes,
    read_list_file,
    split_list,
)
from nfnet_jax.inference.batch_run import (
    CHUNKS,
    MANIFEST,
    check_run_dir,
    chunk_path,
    chunk_range,
    lock_path,
    merge,
    open_run_dir,
    predict_chunk,
    write_chunk,
)
from nfnet_jax.inference.predictor import Predictor
from nfnet_jax.progress import log, progress


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m nfnet_jax.batch_predict',
        description='Top-k classes or embeddings of many images, on all devices of all hosts, resumable.',
    )
    commands = parser.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', help='compute (or resume computing) the outputs into a run directory')
    run.add_argument('inputs', nargs='*', type=Path, help='image files, or folders (searched recursively)')
    run.add_argument(
        '--list', type=Path, help='a file naming one image per line, or NUL-separated (instead of inputs); - for stdin'
    )
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
    if args.list == Path('-'):
        if sys.stdin.isatty():
            raise ValueError(
                '--list - reads the list from standard input, which is a terminal: pipe it in '
                '(find DIR -name "*.jpg" -print0 | ... --list -) or name a list file'
            )
        files = split_list(sys.stdin.buffer.read())
    elif args.list and not args.list.is_file():
        raise FileNotFoundError(f'{args.list}: no such list file')
    else:
        files = read_list_file(args.list) if args.list else find_images(args.inputs)
    if not files:
        raise FileNotFoundError('no image files to process')
    seen: set[Path] = set()
    repeated = [path for path in files if path in seen or seen.add(path)]
    if repeated:
        raise ValueError(f'{len(repeated)} files are listed more than once (e.g. {repeated[0]}); list each once')
    return files


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

    def check_output() -> None:
        """Refused before the model loads. Only process 0 may find the folder half-made by itself; the
        others check a manifest only once it is there (it is written atomically)."""
        check_output_folder(args.output)
        if process == 0 or (args.output / MANIFEST).exists():
            check_run_dir(args.output, settings, files)

    _on_every_process(check_output, settings)
    args.output.mkdir(parents=True, exist_ok=True)
    with hold_lock(lock_path(args.output, process), 'batch_predict run'):
        model = load_model(args)
        config = resolve_model_data_config(model, use_test_size=args.test_size)
        transform = create_transform(**config)  # its uint8 host part read by grain, its device stage in the predictor
        predictor = Predictor(
            model, args.checkpoint, topk=args.topk, embeddings=args.embeddings, mesh=mesh, stage=device_stage(transform)
        )
        settings |= {'architecture': model.pretrained_cfg.architecture, 'num_classes': model.num_classes}
        settings |= {'input_size': list(config['input_size']), 'class_names': predictor.own_class_names}
        open_run_dir(args.output, settings, files)

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
            done, outputs, failed = predict_chunk(files, indices, transform.host_part(), predictor, process_batch, bar)
            steps -= len(outputs)
            write_chunk(args.output, chunk, done, outputs, failed, args.embeddings, process)
            failures += len(failed)
        # The padding calls run the program every other process runs: uint8 batches, as the host part reads them.
        no_images = np.zeros((0, *config['input_size'][1:], config['input_size'][0]), np.uint8)
        for _ in range(steps):
            predictor(no_images, process_batch)
        bar.close()
    log(f'process {process}: {todo} files of {len(pending)} chunks written to {args.output / CHUNKS}')
    return 1 if failures else 0


def _on_every_process(check: Callable[[], None], settings: dict[str, Any]) -> None:
    """`check()` on every process, and the same computation asked of every process as of process 0: a refusal
    on any process refuses the run on all of them, in one line naming the process, instead of leaving the
    others waiting for it in a collective."""
    if jax.process_count() == 1:
        check()
        return
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    problem = None
    try:
        if digest != parallel.leader_decides(lambda: digest):
            raise ValueError(
                f'asked for another computation than process 0 (files: {settings["files"]}, their sha256 '
                f'{settings["files_sha256"][:12]}..., options): give every host the same inputs and options'
            )
        check()
    except (ValueError, OSError) as err:
        problem = f'process {jax.process_index()}: {err}'
    parallel.refuse_unless_all_agree(problem)


def _max_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int64))))


# ---------------------------------------------------------------------------------------- merge


def _merge(args: argparse.Namespace) -> int:
    rows, files, failed = merge(args.run_dir, args.out, args.force)
    log(f'wrote {args.out}: {rows} of {files} files' + (f'; {failed} unreadable' if failed else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
