"""Classify images or embed them from the command line: `python -m nfnet_jax.predict IMAGE_OR_FOLDER...`.

Images go through the model's own eval transform (timm's), in batches of one fixed shape so
the model compiles once. A file that cannot be read as an image is reported by name and
skipped; the exit status is 1 if any was, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nfnet_jax.checkpoint import atomic_write
from nfnet_jax.cli import log, run_command
from nfnet_jax.data import create_transform, imagenet_labels, imagenet_synsets, load_image, resolve_model_data_config
from nfnet_jax.factory import create_model, load_checkpoint
from nfnet_jax.inference import InferenceFn, compile_forward
from nfnet_jax.model import NormFreeNet

Batch = tuple[list[Path], np.ndarray]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m nfnet_jax.predict',
        description='Top-k ImageNet classes, or embeddings, of images with an NFNet.',
    )
    parser.add_argument('inputs', nargs='+', type=Path, help='image files, or folders (searched recursively)')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--model', help='pretrained arch.tag from the Hugging Face hub, e.g. dm_nfnet_f0.dm_in1k')
    source.add_argument('--checkpoint', type=Path, help='a checkpoint written by python -m convert.from_timm')
    parser.add_argument('--topk', type=int, default=5, help='classes to print per image (default 5)')
    parser.add_argument('--json', action='store_true', help='one JSON object per image instead of text')
    parser.add_argument('--embeddings', type=Path, help='write the pooled embeddings (N, D) to this .npy instead')
    parser.add_argument('--force', action='store_true', help='overwrite the --embeddings file if it exists')
    parser.add_argument('--batch-size', type=int, default=16, help='images per batch (default 16)')
    parser.add_argument('--test-size', action='store_true', help="use the tag's larger test resolution and crop")
    return parser.parse_args(argv)


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """The files named, and every non-hidden file under the folders named, in sorted order."""
    files = []
    for path in inputs:
        if path.is_dir():
            found = (p for p in path.rglob('*') if p.is_file())
            files += sorted(p for p in found if not any(part.startswith('.') for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f'{path}: no such file or folder')
    return files


def batches(
    files: Sequence[Path], transform: Callable, batch_size: int, on_error: Callable[[Path, str], None]
) -> Iterator[Batch]:
    """The readable images in batches of `batch_size`; unreadable files go to `on_error` and are skipped.

    Images are decoded and transformed on threads (PIL releases the GIL) while the device runs,
    at most a few batches ahead, so memory stays bounded however many files there are.
    """

    def prepare(path: Path) -> np.ndarray | str:
        try:
            return transform(load_image(path))
        except OSError as err:
            return str(err)

    read_ahead = 4 * batch_size
    paths, arrays = [], []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(files), read_ahead):
            window = files[start : start + read_ahead]
            for path, result in zip(window, pool.map(prepare, window), strict=True):
                if isinstance(result, str):
                    on_error(path, result)
                    continue
                paths.append(path)
                arrays.append(result)
                if len(arrays) == batch_size:
                    yield paths, np.stack(arrays)
                    paths, arrays = [], []
    if arrays:
        yield paths, np.stack(arrays)


def prediction_fn(model: NormFreeNet, embeddings: bool, topk: int) -> InferenceFn:
    """The jitted outputs of an image batch: (top-k probabilities, indices), or (pooled embeddings,)."""

    def predict(model: NormFreeNet, images: jax.Array) -> tuple:
        if embeddings:
            return (model.forward_head(model.forward_features(images), pre_logits=True),)
        return top_k_probabilities(model(images), topk)

    return compile_forward(model, predict)  # the weight standardisation folded in once


def compile_predict(model: NormFreeNet, embeddings: bool, topk: int, batch_size: int) -> Callable[[np.ndarray], tuple]:
    """`prediction_fn` as a function of a numpy batch, compiled once for `batch_size` images.

    A shorter last batch is padded to that size.
    """
    compiled = prediction_fn(model, embeddings, topk)

    def run(images: np.ndarray) -> tuple:
        n = len(images)
        padded = np.concatenate([images, np.zeros((batch_size - n, *images.shape[1:]), images.dtype)])
        return tuple(np.asarray(out)[:n] for out in compiled(padded))

    return run


def top_k_probabilities(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` highest softmax probabilities (float32) of each row and their class indices."""
    return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)


def class_names(num_classes: int) -> tuple[list[str], list[str]]:
    """Names and WordNet ids: ImageNet-1k's for a 1000-class head, otherwise 'class N' and ''."""
    if num_classes == 1000:
        return imagenet_labels(), imagenet_synsets()
    names = [f'class {i}' for i in range(num_classes)]
    return names, ['' for _ in names]


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, _parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before the model is loaded.
    if args.batch_size < 1 or args.topk < 1:
        raise ValueError('--batch-size and --topk must be at least 1')
    if args.embeddings is not None:
        if args.embeddings.suffix != '.npy':
            raise ValueError(f'{args.embeddings}: the embeddings file must end in .npy')
        if args.embeddings.exists() and not args.force:
            raise FileExistsError(f'{args.embeddings} already exists; pass --force to overwrite it')
    files = find_images(args.inputs)
    if not files:
        raise FileNotFoundError('no files found in ' + ', '.join(str(p) for p in args.inputs))

    if args.checkpoint is not None:
        model = load_checkpoint(args.checkpoint)
    else:
        model = create_model(args.model, pretrained=True)
    if args.embeddings is None and model.num_classes == 0:
        raise ValueError('this model has no classifier (num_classes=0): use --embeddings OUT.npy')
    config = resolve_model_data_config(model, use_test_size=args.test_size)
    transform = create_transform(**config)
    topk = min(args.topk, max(model.num_classes, 1))
    predict = compile_predict(model, args.embeddings is not None, topk, args.batch_size)
    labels, synsets = class_names(model.num_classes)
    size = 'x'.join(str(v) for v in config['input_size'][1:])
    log(f'{model.pretrained_cfg.name}: {len(files)} files at {size}, batches of {args.batch_size}')

    failed: list[Path] = []
    progress = tqdm(total=len(files), unit='img', disable=len(files) <= args.batch_size, file=sys.stderr)

    def on_error(path: Path, message: str) -> None:
        failed.append(path)
        progress.write(f'error: {message}', file=sys.stderr)
        progress.update()

    embedded: list[np.ndarray] = []
    row = 0
    for paths, images in batches(files, transform, args.batch_size, on_error):
        outputs = predict(images)
        for i, path in enumerate(paths):
            if args.embeddings is not None:
                embedded.append(outputs[0][i])
                line = json.dumps({'file': str(path), 'row': row}) if args.json else f'{row}\t{path}'
                row += 1
            else:
                top = [(float(p), int(c)) for p, c in zip(outputs[0][i], outputs[1][i], strict=True)]
                line = format_topk(path, top, labels, synsets, args.json)
            progress.write(line, file=sys.stdout)
        progress.update(len(paths))
    progress.close()

    if args.embeddings is not None and embedded:
        array = np.stack(embedded).astype(np.float32)

        def write(tmp: str) -> None:
            with open(tmp, 'wb') as f:
                np.save(f, array)

        atomic_write(args.embeddings, write, force=args.force)
        log(f'wrote {args.embeddings}: {array.shape[0]} embeddings of {array.shape[1]} floats (rows as listed)')
    if failed:
        log(f'{len(failed)} of {len(files)} files could not be read: {", ".join(str(p) for p in failed)}')
        return 1
    return 0


def format_topk(path: Path, top: list[tuple[float, int]], labels: list[str], synsets: list[str], as_json: bool) -> str:
    if as_json:
        entries = [{'index': c, 'label': labels[c], 'synset': synsets[c], 'probability': round(p, 6)} for p, c in top]
        return json.dumps({'file': str(path), 'topk': entries})
    lines = [str(path)]
    lines += [f'  {100 * p:6.2f}%  {labels[c]}' + (f' ({synsets[c]})' if synsets[c] else '') for p, c in top]
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
