"""The device half of the transforms: uint8 batches normalised (and, for training, randomly erased) inside jit.

Host workers then only decode, crop and augment in 8 bits (`transform.host_part()`), and a batch
crosses to the device as uint8, a quarter of the float32 bytes. `device_stage(transform)` is the
`DeviceStage` that finishes the transform on the device:

- normalisation: torchvision's `to_tensor` then `Normalize`. A uint8 channel has 256 values, so
  the stage looks each up in the table `nfnet_jax.data.transforms.normalize` computes for them:
  the host's float transform and the two parts give the same numbers bit for bit, on any backend
  (XLA may turn a division by a constant into a multiplication by its reciprocal);
- random erasing: timm's `RandomErasing` as timm's prefetcher applies it on the device, to every
  image of the normalised batch: the same probability, box count, area and aspect-ratio draws
  (up to ten tries a box), the same fills ('const' zeros, 'rand' one normal colour per box,
  'pixel' normal noise per pixel). Boxes of varying size become masks, so the program has one
  shape. The draws come from a JAX key; `erase` applies given boxes, so any draws (the host's,
  timm's) can be replayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax.data.augment import RandomErasing, TrainTransform
from nfnet_jax.data.transforms import EvalTransform, normalize

MAX_TRIES = 10  # timm's tries to fit one erased box


class Erasures(NamedTuple):
    """Erased boxes of a batch: `boxes` (N, K, 4) int32 (top, left, height, width; height 0: no box) and their
    `fill`, broadcastable to (N, K, H, W, C): box k of image n takes `fill[n, k]` where it lies."""

    boxes: jax.Array
    fill: jax.Array


@dataclass(frozen=True)
class DeviceStage:
    """uint8 NHWC images -> float32 normalised images, with timm's random erasing when `erasing` is set."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    erasing: RandomErasing | None = None

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The batch normalised, then erased with draws from `key` (which a stage with erasing needs)."""
        pixels = self.normalize(images)
        if self.erasing is None:
            return pixels
        if key is None:
            raise ValueError('this stage erases at random (a training stage): pass a key, e.g. fold_in(key, step)')
        return erase(pixels, self.sample_erasures(key, pixels.shape))

    def normalize(self, images: jax.Array) -> jax.Array:
        """torchvision's `to_tensor` and `Normalize` of uint8 images (float32), each value looked up in `table()`."""
        if images.dtype != jnp.uint8:
            raise TypeError(f'the device stage takes uint8 images (a host_part() transform), got {images.dtype}')
        if images.shape[-1] != len(self.mean):
            raise ValueError(f'images have {images.shape[-1]} channels, the mean {len(self.mean)}')
        return jnp.asarray(self.table())[images, jnp.arange(len(self.mean))]

    def table(self) -> np.ndarray:
        """(256, C) float32: what the host's `normalize` makes of each 8-bit value in each channel."""
        levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], len(self.mean), axis=1)
        return normalize(levels, self.mean, self.std)

    def sample_erasures(self, key: jax.Array, shape: tuple[int, ...]) -> Erasures:
        """timm's erasing draws for a batch of `shape` (N, H, W, C), one independent key per image."""
        if self.erasing is None:
            raise ValueError('this stage does not erase (its transform has no random erasing)')
        count, height, width, channels = shape
        keys = jax.random.split(key, count)
        return jax.vmap(lambda k: _sample_one(self.erasing, k, height, width, channels))(keys)


def device_stage(transform: EvalTransform | TrainTransform) -> DeviceStage:
    """What `transform.host_part()` leaves to the device: its normalisation, and a training transform's erasing."""
    return DeviceStage(transform.mean, transform.std, getattr(transform, 'erasing', None))


def _sample_one(settings: RandomErasing, key: jax.Array, height: int, width: int, channels: int) -> Erasures:
    """One image's boxes as timm's `RandomErasing._erase` draws them, every try drawn at once."""
    slots = settings.max_count
    keys = jax.random.split(key, 7)
    erased = jax.random.uniform(keys[0]) <= settings.probability  # timm skips when random() > probability
    if settings.min_count == settings.max_count:
        count = jnp.int32(settings.min_count)
    else:
        count = jax.random.randint(keys[1], (), settings.min_count, settings.max_count + 1)
    target_area = jax.random.uniform(keys[2], (slots, MAX_TRIES), minval=settings.min_area, maxval=settings.max_area)
    target_area = target_area * (height * width) / count
    log_aspect = (math.log(settings.min_aspect), math.log(1 / settings.min_aspect))
    aspect = jnp.exp(jax.random.uniform(keys[3], (slots, MAX_TRIES), minval=log_aspect[0], maxval=log_aspect[1]))
    # Python's round() halves to even, as jnp.round does.
    h = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (w < width) & (h < height)
    first = jnp.argmax(fits, axis=1)  # the first try that fits, as timm's loop stops there
    slot = jnp.arange(slots)
    used = erased & (slot < count) & fits.any(axis=1)
    h, w = jnp.where(used, h[slot, first], 0), jnp.where(used, w[slot, first], 0)
    # timm's randint(0, size - box) over the box's size, a uniform integer that depends on it
    top = jnp.floor(jax.random.uniform(keys[4], (slots,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(keys[5], (slots,)) * (width - w + 1)).astype(jnp.int32)
    boxes = jnp.stack([jnp.minimum(top, height - h), jnp.minimum(left, width - w), h, w], axis=-1)
    if settings.mode == 'pixel':
        fill = jax.random.normal(keys[6], (slots, height, width, channels), jnp.float32)
    elif settings.mode == 'rand':
        fill = jax.random.normal(keys[6], (slots, 1, 1, channels), jnp.float32)
    else:
        fill = jnp.zeros((slots, 1, 1, 1), jnp.float32)
    return Erasures(boxes, fill)


def erase(images: jax.Array, erasures: Erasures) -> jax.Array:
    """`images` (N, H, W, C) with each box filled, box by box in order (a later box covers an earlier one)."""
    rows = jnp.arange(images.shape[1])[:, None]
    cols = jnp.arange(images.shape[2])[None, :]
    for k in range(erasures.boxes.shape[1]):
        top, left, h, w = (erasures.boxes[:, k, i, None, None] for i in range(4))
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        images = jnp.where(inside[..., None], erasures.fill[:, k], images)
    return images
