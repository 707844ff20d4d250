"""Input pipeline throughput: nfnet_jax.data.loaders (grain) against timm's create_loader, training and evaluation.

    python -m benchmarks.input_pipeline [--images 1280] [--size 224] [--workers 2] [--batch 32] [--runs 3]

One folder of ImageNet-sized JPEGs (shorter side 300 to 600 px, quality 90) is written from
scikit-image's bundled photos: a random crop of one, resized, with a little sensor-like noise,
so decoding costs what a photo's does. On it, in one run:

- training: timm's training transform at `--size` (random resized crop, flip, RandAugment
  rand-m9-mstd0.5-inc1, normalisation, random erasing 0.25 in pixel mode). Ours reads with the
  transform's `host_part()` (uint8 batches; normalisation and erasing run on the device inside
  the step, as timm's CUDA prefetcher does them); timm runs `create_loader(..., is_training=True,
  use_prefetcher=False)`, its workers normalising and erasing (without CUDA it has no device);
- evaluation: timm's eval transform (resize, center crop 0.875), ours `EvalLoader` with the
  host part, timm's `create_loader(..., is_training=False, use_prefetcher=False)`;
- the decode-only bound: PIL's decode and convert('RGB') of the same files in `--workers`
  processes (started before the pass is timed), the most any of them can do here (both decode
  with the same libjpeg-turbo).

Every loader uses `--workers` worker processes and batches of `--batch`. A pass is timed from
its `--workers`-th batch on (worker start-up excluded: a training run starts its workers once),
and the start-up, to the first batch, is reported beside it. Runs alternate between the
loaders; medians of `--runs` are reported, and images/s per worker process (per core used).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'immunohistochemistry', 'retina', 'hubble_deep_field')
AUTO_AUGMENT, RE_PROB = 'rand-m9-mstd0.5-inc1', 0.25
SHORT_SIDE = (300, 600)  # ImageNet's photos are mostly about this size
DECODE = ('decode', 'PIL decode + convert RGB (bound)')


def write_folder(root: Path, images: int, classes: int = 4, short_side: tuple[int, int] = SHORT_SIDE) -> Path:
    """`images` JPEGs in `classes` class folders: each a random crop of one of the photos, its shorter side
    resized to a random length in `short_side`, with faint noise."""
    import skimage.data
    from PIL import Image

    photos = [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]
    rng = np.random.default_rng(0)
    for i in range(images):
        photo = photos[i % len(photos)]
        width, height = int(photo.width * rng.uniform(0.6, 1)), int(photo.height * rng.uniform(0.6, 1))
        left, top = rng.integers(0, photo.width - width + 1), rng.integers(0, photo.height - height + 1)
        scale = rng.integers(short_side[0], short_side[1] + 1) / min(width, height)
        image = photo.crop((left, top, left + width, top + height))
        image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 2.0, (image.height, image.width, 1))
        folder = root / f'class{i % classes}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f'{i}.jpg', quality=90)
    return root


def ours(root: Path, size: int, workers: int, batch: int, training: bool) -> Callable[[], Iterator]:
    from nfnet_jax.data import create_transform, loaders

    samples = loaders.image_folder(root)
    if training:
        transform = create_transform(
            size, is_training=True, auto_augment=AUTO_AUGMENT, re_prob=RE_PROB, re_mode='pixel'
        ).host_part()
        loader = loaders.TrainLoader(samples, transform, batch, workers=workers, process_index=0, process_count=1)
    else:
        transform = create_transform(size).host_part()
        loader = loaders.EvalLoader(samples, transform, batch, workers=workers, process_index=0, process_count=1)
    return lambda: (b.images for b in loader)


def timms(root: Path, size: int, workers: int, batch: int, training: bool) -> Callable[[], Iterator]:
    from timm.data import auto_augment, create_dataset, create_loader

    # timm 1.0.31 raises on 0-bit Posterize with Pillow >= 11 (ours keeps old Pillow's black image): do the same here.
    def posterize(img, bits_to_keep, **kwargs):
        return auto_augment.posterize(img, bits_to_keep, **kwargs) if bits_to_keep > 0 else img.point(lambda _: 0)

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize

    dataset = create_dataset('', root=str(root), split='train', is_training=training)
    options = dict(auto_augment=AUTO_AUGMENT, re_prob=RE_PROB, re_mode='pixel') if training else {}
    loader = create_loader(
        dataset,
        input_size=(3, size, size),
        batch_size=batch,
        is_training=training,
        use_prefetcher=False,
        num_workers=workers,
        device='cpu',
        persistent_workers=False,
        **options,
    )
    return lambda: (images for images, _ in loader)


def decode(path: str) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert('RGB').width


def decode_only(root: Path, workers: int) -> Callable[[], float]:
    """Images per second of one pass decoding the files in `workers` processes (started once, before it)."""
    files = sorted(str(p) for p in root.rglob('*.jpg'))
    pool = multiprocessing.get_context('spawn').Pool(workers)
    pool.map(decode, files[: 2 * workers])

    def time_decoding() -> float:
        start = time.perf_counter()
        pool.map(decode, files, chunksize=4)
        return len(files) / (time.perf_counter() - start)

    return time_decoding


def time_pass(make_iterator: Callable[[], Iterator], skip: int) -> tuple[float, float]:
    """(images per second from batch `skip` on, seconds to the first batch) of one pass."""
    started = time.perf_counter()
    iterator = make_iterator()
    first = len(next(iterator))
    startup = time.perf_counter() - started
    for _ in range(skip - 1):
        next(iterator)
    count, start = 0, time.perf_counter()
    for images in iterator:
        count += len(images)
    del first
    return count / (time.perf_counter() - start), startup


def main(argv: list[str] | None = None) -> dict[tuple[str, str], float]:
    """Runs the benchmark, prints its table, and returns the median images/s of each (pipeline, loader)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=1280)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--runs', type=int, default=3)
    args = parser.parse_args(argv)
    if args.images < (args.workers + 1) * args.batch:
        parser.error(f'--images must leave batches to time after the first {args.workers} (one per worker)')
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), args.images)
        rows = {
            ('train', 'nfnet_jax TrainLoader (grain, uint8)'): ours(root, args.size, args.workers, args.batch, True),
            ('train', 'timm create_loader'): timms(root, args.size, args.workers, args.batch, True),
            ('eval', 'nfnet_jax EvalLoader (grain, uint8)'): ours(root, args.size, args.workers, args.batch, False),
            ('eval', 'timm create_loader'): timms(root, args.size, args.workers, args.batch, False),
        }
        decoding = decode_only(root, args.workers)
        rates: dict[tuple, list[float]] = {key: [] for key in (*rows, DECODE)}
        startups: dict[tuple, list[float]] = {key: [] for key in (*rows, DECODE)}
        for run in range(args.runs):
            for key, make in rows.items():
                rate, startup = time_pass(make, args.workers)
                rates[key].append(rate)
                startups[key].append(startup)
                print(f'run {run}: {key[0]}: {key[1]}: {rate:.1f} images/s (start-up {startup:.2f} s)', flush=True)
            rates[DECODE].append(decoding())
            startups[DECODE].append(0.0)
            print(f'run {run}: decode only: {rates[DECODE][-1]:.1f} images/s', flush=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    bound = median[DECODE]
    timm_rate = {kind: median[(kind, 'timm create_loader')] for kind in ('train', 'eval')}
    print(f'\n{args.images} JPEGs (shorter side {SHORT_SIDE[0]}-{SHORT_SIDE[1]} px), {args.size} px, ', end='')
    print(f'{args.workers} workers, batches of {args.batch}, {os.cpu_count()} cores; median of {args.runs} passes')
    print(f'training: {AUTO_AUGMENT}, random erasing {RE_PROB} (pixel); evaluation: resize, center crop 0.875\n')
    print('| pipeline | loader | images/s | per worker | vs timm | of decode bound | start-up s | runs |')
    print('|---|---|---|---|---|---|---|---|')
    for (kind, name), rate in median.items():
        versus = f'{rate / timm_rate[kind]:.2f}x' if kind in timm_rate else ''
        runs = ', '.join(f'{v:.0f}' for v in rates[(kind, name)])
        print(
            f'| {kind} | {name} | {rate:.0f} | {rate / args.workers:.0f} | {versus} | {rate / bound:.0%} '
            f'| {statistics.median(startups[(kind, name)]):.2f} | {runs} |'
        )
    return median


if __name__ == '__main__':
    main()
