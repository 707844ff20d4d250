"""Classify images or embed them from the command line: `python -m nfnet_jax.predict IMAGE_OR_FOLDER...`.

Images go through the model's own eval transform (timm's): read, resized and cropped by grain
(worker processes for many files), normalised on the device; in batches of one fixed shape so
the model compiles once. A file that cannot be read as an image is reported by name and
skipped; the exit status is 1 if any was, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nfnet_jax.cli import (
    add_cpu_arguments,
    add_image_arguments,
    add_model_arguments,
    apply_cpu_arguments,
    apply_image_arguments,
    check_model_arguments,
    load_model,
    run_command,
)
from nfnet_jax.data import create_transform, find_images, resolve_model_data_config
from nfnet_jax.data.device import device_stage
from nfnet_jax.data.loaders import batches
from nfnet_jax.files import atomic_write, check_output, display_name
from nfnet_jax.inference.predictor import Predictor
from nfnet_jax.progress import log, progress


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m nfnet_jax.predict',
        description='Top-k ImageNet classes, or embeddings, of images with an NFNet.',
    )
    parser.add_argument('inputs', nargs='+', type=Path, help='image files, or folders (searched recursively)')
    add_model_arguments(parser)
    parser.add_argument('--topk', type=int, default=5, help='classes to print per image (default 5)')
    parser.add_argument('--json', action='store_true', help='one JSON object per image instead of text')
    parser.add_argument('--embeddings', type=Path, help='write the pooled embeddings (N, D) to this .npy instead')
    parser.add_argument('--force', action='store_true', help='overwrite the --embeddings file if it exists')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch (default 16)')
    parser.add_argument('--test-size', action='store_true', help="use the tag's larger test resolution and crop")
    add_cpu_arguments(parser)
    add_image_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, _parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    apply_cpu_arguments(args, is_process=__name__ == '__main__')  # before any JAX computation
    # Everything that can be checked is checked before the model is loaded.
    if args.batch_size < 1 or args.topk < 1:
        raise ValueError('--batch-size and --topk must be at least 1')
    apply_image_arguments(args)
    check_model_arguments(args)
    if args.embeddings is not None:
        check_output(args.embeddings, args.force, suffix='.npy')
    files = find_images(args.inputs)
    if not files:
        raise FileNotFoundError('no files found in ' + ', '.join(str(p) for p in args.inputs))

    model = load_model(args)
    config = resolve_model_data_config(model, use_test_size=args.test_size)
    transform = create_transform(**config)
    predictor = Predictor(
        model, args.checkpoint, topk=args.topk, embeddings=args.embeddings is not None, stage=device_stage(transform)
    )
    size = 'x'.join(str(v) for v in config['input_size'][1:])
    log(f'{model.pretrained_cfg.name}: {len(files)} files at {size}, batches of {args.batch_size}')

    failed: list[Path] = []
    bar = progress(total=len(files), unit='img', disable=len(files) <= args.batch_size)

    def on_error(path: Path, message: str) -> None:
        failed.append(path)
        bar.write(f'error: {message}', file=sys.stderr)
        bar.update()

    embedded: list[np.ndarray] = []
    row = 0
    for paths, images in batches(files, transform.host_part(), args.batch_size, on_error):
        for path, output in zip(paths, zip(*predictor(images, args.batch_size), strict=True), strict=True):
            if args.embeddings is not None:
                embedded.append(output[0])
            bar.write(predictor.format_row(path, output, row, args.json), file=sys.stdout)
            row += 1
        bar.update(len(paths))
    bar.close()

    if args.embeddings is not None and embedded:
        array = np.stack(embedded).astype(np.float32)

        def write(tmp: str) -> None:
            with open(tmp, 'wb') as f:
                np.save(f, array)

        atomic_write(args.embeddings, write, force=args.force)
        log(f'wrote {args.embeddings}: {array.shape[0]} embeddings of {array.shape[1]} floats (rows as listed)')
    if failed:
        log(f'{len(failed)} of {len(files)} files could not be read: {", ".join(display_name(p) for p in failed)}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
