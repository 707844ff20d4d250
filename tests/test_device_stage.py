"""The transforms split in two: the host part (uint8) then the device part (normalisation, random erasing in jit).

Parity: for every eval and training transform, `device_stage(transform)(transform.host_part()(img)[None])` equals the
float transform's output bit for bit, its erasing given the same boxes and fills the float
transform drew; the device's erasing equals timm 1.0.31's `RandomErasing` (as its prefetcher runs it
on a normalised batch) given the same draws; and the device's own draws follow timm's distributions
(2000 draws, two-sample Kolmogorov-Smirnov statistic below 0.062, its 0.1% critical value).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import skimage.data
import timm.data.random_erasing
import torch
from PIL import Image

from nfnet_jax import data
from nfnet_jax.data import augment, device
from nfnet_jax.data.device import device_stage

KS_MAX = 0.062
N_DRAWS = 2000


def photos() -> list[Image.Image]:
    astronaut = Image.fromarray(skimage.data.astronaut())
    chelsea = Image.fromarray(skimage.data.chelsea()).crop((100, 0, 190, 300))  # tall
    rocket = Image.fromarray(skimage.data.rocket()).resize((300, 40))  # very wide
    return [astronaut, chelsea, rocket, astronaut.convert('L')]


def erasures_of(boxes: list[list[tuple]], shape: tuple[int, ...], max_count: int) -> device.Erasures:
    """The host's erasing draws (`RandomErasing.sample` per image) as the device's `Erasures`, fills in place."""
    count, height, width, channels = shape
    table = np.zeros((count, max_count, 4), np.int32)
    fill = np.zeros((count, max_count, height, width, channels), np.float32)
    for n, image_boxes in enumerate(boxes):
        for k, (top, left, h, w, value) in enumerate(image_boxes):
            table[n, k] = top, left, h, w
            fill[n, k, top : top + h, left : left + w] = value
    return device.Erasures(jnp.asarray(table), jnp.asarray(fill))


EVAL_CONFIGS = [
    dict(input_size=224),
    dict(input_size=(3, 192, 192), crop_pct=0.9, interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3),
    dict(input_size=(3, 64, 80), crop_pct=0.9, crop_mode='border', interpolation='bicubic'),
    dict(input_size=(70, 50), crop_mode='squash', crop_pct=1.0),
    dict(input_size=(3, 96, 96), is_training=True, no_aug=True),
]


@pytest.mark.parametrize('config', EVAL_CONFIGS, ids=str)
def test_eval_host_then_device_part_equals_the_float_transform(config):
    transform = data.create_transform(**config)
    host, stage = transform.host_part(), jax.jit(device_stage(transform))
    for photo in photos():
        pixels = host(photo)
        assert pixels.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(stage(pixels[None]))[0], transform(photo))


TRAIN_CONFIGS = [
    dict(),
    dict(auto_augment='rand-m9-mstd0.5-inc1', re_prob=1.0, re_mode='pixel'),
    dict(interpolation='random', vflip=0.5, color_jitter=(0.4, 0.3, 0.2, 0.1), re_prob=1.0, re_count=3),
    dict(grayscale_prob=0.3, re_prob=0.7, re_count=2, re_mode='rand', mean=(0.5,) * 3, std=(0.5,) * 3),
]


@pytest.mark.parametrize('config', TRAIN_CONFIGS, ids=str)
def test_train_host_then_device_part_equals_the_float_transform_given_the_same_draws(config):
    size = (64, 48)
    transform = data.create_transform(size, is_training=True, **config)
    host, stage = transform.host_part(), device_stage(transform)
    images, boxes, expected = [], [], []
    for seed, photo in enumerate(photos() * 3):
        images.append(host(photo, np.random.default_rng(seed)))
        params = transform.sample_params(np.random.default_rng(seed), photo.height, photo.width)
        boxes.append(params['erasing'])
        expected.append(transform(photo, np.random.default_rng(seed)))
    batch = np.stack(images)
    assert batch.dtype == np.uint8
    max_count = transform.erasing.max_count if transform.erasing else 1
    erasures = erasures_of(boxes, (len(images), *size, 3), max_count)
    got = jax.jit(lambda x, e: device.erase(stage.normalize(x), e))(batch, erasures)
    np.testing.assert_array_equal(np.asarray(got), np.stack(expected))
    if transform.erasing:
        assert any(boxes), 'the configs erase: some image must have a box'
        drawn = jax.jit(stage)(batch, jax.random.key(0))  # the stage's own draws: the same shape, some erased
        assert drawn.shape == got.shape and drawn.dtype == jnp.float32


class GeneratorRandom:
    """Python's `random` calls of timm's RandomErasing over a numpy Generator, drawing as our host sampler does."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def random(self) -> float:
        return self.rng.random()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.rng.random()

    def randint(self, a: int, b: int) -> int:
        return self.rng.integers(a, b + 1)


@pytest.mark.parametrize('mode', augment.RE_MODES)
def test_device_erasing_equals_timms_random_erasing_given_the_same_draws(mode, monkeypatch):
    """timm's RandomErasing (device cpu, as its PrefetchLoader builds it) on a normalised NCHW batch, its draws
    replayed from per-image Generators; ours: the same Generators through the host sampler, erased on the device."""
    settings = augment.RandomErasing(probability=0.8, mode=mode, max_count=3)
    shape = (6, 40, 56, 3)
    rng = np.random.default_rng(7)
    normalised = rng.standard_normal(shape, dtype=np.float32)
    ours_boxes = [settings.sample(np.random.default_rng(n), *shape[1:]) for n in range(shape[0])]
    ours = device.erase(jnp.asarray(normalised), erasures_of(ours_boxes, shape, settings.max_count))

    theirs = torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())
    erasing = timm.data.random_erasing.RandomErasing(0.8, mode=mode, max_count=3, device='cpu')
    for n in range(shape[0]):
        image_rng = np.random.default_rng(n)
        monkeypatch.setattr(timm.data.random_erasing, 'random', GeneratorRandom(image_rng))

        def pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device='cpu', image_rng=image_rng):
            if per_pixel:
                return torch.from_numpy(image_rng.standard_normal(patch_size, dtype=np.float32))
            if rand_color:
                return torch.from_numpy(image_rng.standard_normal((patch_size[0], 1, 1), dtype=np.float32))
            return torch.zeros((patch_size[0], 1, 1), dtype=dtype)

        monkeypatch.setattr(timm.data.random_erasing, '_get_pixels', pixels)
        erasing(theirs[n])
    assert sum(len(b) for b in ours_boxes) > 3
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy().transpose(0, 2, 3, 1))


def ks(a, b) -> float:
    return scipy.stats.ks_2samp(a, b).statistic


def test_device_erasing_draws_match_timms_distributions():
    """Boxes of the device's draws against timm's own RandomErasing on images of ones (the box is the zeros)."""
    height, width = 32, 40
    stage = device.DeviceStage((0.0,) * 3, (1.0,) * 3, augment.RandomErasing(probability=0.5))
    erased = np.asarray(jax.jit(stage)(jnp.full((N_DRAWS, height, width, 3), 255, jnp.uint8), jax.random.key(0)))
    ours = [box_of(image[..., 0] != 1.0) for image in erased]
    torch.manual_seed(0)
    erasing = timm.data.random_erasing.RandomErasing(0.5, mode='const', device='cpu')
    theirs = [box_of(erasing(torch.ones(3, height, width))[0].numpy() == 0) for _ in range(N_DRAWS)]
    assert abs(np.mean([b is None for b in ours]) - np.mean([b is None for b in theirs])) < 0.05
    ours, theirs = (np.array([b for b in boxes if b]) for boxes in (ours, theirs))
    for stats in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 2] / b[:, 3], lambda b: b[:, 0], lambda b: b[:, 1]):
        assert ks(stats(ours), stats(theirs)) < 2 * KS_MAX  # ~1000 boxes each: the critical value doubles


def box_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (rows[0], cols[0], len(rows), len(cols)) if len(rows) else None


def test_device_erasing_count_and_fills():
    """Up to `max_count` boxes, each area shrunk by the count; 'rand' fills a box with one colour, 'pixel' varies."""
    shape = (512, 24, 24, 3)
    images = jnp.zeros(shape, jnp.uint8)
    for mode in ('rand', 'pixel'):
        stage = device.DeviceStage((0.0,) * 3, (1.0,) * 3, augment.RandomErasing(1.0, mode, max_count=3))
        erasures = stage.sample_erasures(jax.random.key(1), shape)
        boxes = np.asarray(erasures.boxes)
        counts = (boxes[..., 2] > 0).sum(1)
        assert set(counts) == {1, 2, 3}
        assert np.all(boxes[..., 0] + boxes[..., 2] <= shape[1]) and np.all(boxes[..., 1] + boxes[..., 3] <= shape[2])
        areas = boxes[..., 2] * boxes[..., 3]
        mean_area = [areas[counts == c][areas[counts == c] > 0].mean() for c in (1, 3)]
        area = shape[1] * shape[2] * (0.02 + 1 / 3) / 2
        assert math.isclose(mean_area[0], area, rel_tol=0.25) and mean_area[1] < mean_area[0] / 2
        erased = np.asarray(device.erase(stage.normalize(images), erasures))
        one = erased[counts == 1][0]
        top, left, h, w = boxes[counts == 1][0, 0]
        patch = one[top : top + h, left : left + w]
        assert np.all(patch != 0) and np.all(np.delete(one.reshape(-1, 3), box_pixels(top, left, h, w), 0) == 0)
        assert (np.ptp(patch.reshape(-1, 3), axis=0).max() == 0) == (mode == 'rand')


def box_pixels(top: int, left: int, h: int, w: int, width: int = 24) -> np.ndarray:
    return np.array([r * width + c for r in range(top, top + h) for c in range(left, left + w)])


def test_the_device_stage_says_what_it_needs():
    stage = device_stage(data.create_transform(32, is_training=True, re_prob=0.5))
    with pytest.raises(TypeError, match='uint8'):
        stage(jnp.zeros((1, 32, 32, 3), jnp.float32), jax.random.key(0))
    with pytest.raises(ValueError, match='key'):
        stage(jnp.zeros((1, 32, 32, 3), jnp.uint8))
    assert device_stage(data.create_transform(32)).erasing is None
