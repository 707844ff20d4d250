"""Training input pipeline throughput: nfnet_jax.data.loaders (grain) against timm's create_loader, on one folder.

    python -m benchmarks.input_pipeline [--images 256] [--size 224] [--workers 2] [--batch 32] [--runs 3]

Both decode JPEGs from the same class folders and apply timm's training transform at `--size`:
random resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, normalisation and random erasing
(probability 0.25, pixel mode), in `--workers` worker processes, into batches of `--batch`.
timm runs `create_loader(..., is_training=True, use_prefetcher=False)` on CPU (its prefetcher
normalises and erases on a CUDA device; without one the workers do it, as ours do). The folder
is written from scikit-image's bundled photos (sizes 300x451 to 1411x1411), cropped and
re-encoded differently per file. Each run times one pass over the folder after the first batch
(worker start-up excluded); runs alternate between the two loaders and the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'cat', 'immunohistochemistry', 'retina', 'hubble_deep_field')
AUTO_AUGMENT, RE_PROB = 'rand-m9-mstd0.5-inc1', 0.25


def write_folder(root: Path, images: int, classes: int = 4) -> Path:
    """`images` JPEGs in `classes` class folders, each a different random crop of one of the photos."""
    import skimage.data
    from PIL import Image

    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(images):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
        folder = root / f'class{i % classes}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top:, left:]).save(folder / f'{i}.jpg', quality=90)
    return root


def ours(root: Path, size: int, workers: int, batch: int):
    from nfnet_jax.data import create_transform, loaders

    samples = loaders.image_folder(root)
    transform = create_transform(size, is_training=True, auto_augment=AUTO_AUGMENT, re_prob=RE_PROB, re_mode='pixel')
    loader = loaders.TrainLoader(samples, transform, batch, workers=workers, process_index=0, process_count=1)
    return lambda: ((b.images, b.labels) for b in loader)


def timms(root: Path, size: int, workers: int, batch: int):
    from timm.data import auto_augment, create_dataset, create_loader

    # timm 1.0.31 raises on 0-bit Posterize with Pillow >= 11 (ours keeps old Pillow's black image): do the same here.
    def posterize(img, bits_to_keep, **kwargs):
        return auto_augment.posterize(img, bits_to_keep, **kwargs) if bits_to_keep > 0 else img.point(lambda _: 0)

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize

    dataset = create_dataset('', root=str(root), split='train', is_training=True)
    loader = create_loader(
        dataset,
        input_size=(3, size, size),
        batch_size=batch,
        is_training=True,
        use_prefetcher=False,
        auto_augment=AUTO_AUGMENT,
        re_prob=RE_PROB,
        re_mode='pixel',
        num_workers=workers,
        device='cpu',
        persistent_workers=False,
    )
    return lambda: iter(loader)


def time_pass(make_iterator) -> float:
    """Images per second over one pass, from the first batch on (worker start-up left out)."""
    iterator = make_iterator()
    first = next(iterator)
    count, start = 0, time.perf_counter()
    for images, _ in iterator:
        count += len(images)
    seconds = time.perf_counter() - start
    del first
    return count / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=256)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--runs', type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), args.images)
        loaders = {
            'nfnet_jax.data.loaders (grain)': ours(root, args.size, args.workers, args.batch),
            'timm create_loader': timms(root, args.size, args.workers, args.batch),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for run in range(args.runs):
            for name, make in loaders.items():
                rates[name].append(time_pass(make))
                print(f'run {run}: {name}: {rates[name][-1]:.1f} images/s', flush=True)
    print(f'\n{args.images} JPEGs, {args.size} px, {AUTO_AUGMENT}, random erasing {RE_PROB}, ', end='')
    print(f'{args.workers} workers, batches of {args.batch}; median of {args.runs} passes\n')
    print('| loader | images/s (median) | runs |\n|---|---|---|')
    for name, values in rates.items():
        print(f'| {name} | {statistics.median(values):.1f} | {", ".join(f"{v:.1f}" for v in values)} |')


if __name__ == '__main__':
    main()
