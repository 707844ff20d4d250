"""Training augmentation equal to timm's `create_transform(..., is_training=True)`, from a PIL image to float32 HWC.

The pipeline is timm's `transforms_imagenet_train`: random resized crop (bilinear, bicubic or
either at random), horizontal and vertical flips, then RandAugment / AutoAugment / AugMix or
torchvision's ColorJitter (optionally applied with a probability), random grayscale, then to
float, normalisation and random erasing on the normalised image. Every random draw comes from an
explicit `numpy.random.Generator`, all drawn before any pixel is touched (`sample_params`), in the
order timm draws them; `apply` then makes the very PIL calls torchvision and timm make, so given
the same draws the output equals timm's exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from nfnet_jax.data import auto_augment as aa
from nfnet_jax.data.transforms import INTERPOLATIONS, EvalTransform, ImageLike, Size, image_size, normalize, to_rgb
from nfnet_jax.models.pretrained import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

RE_MODES = ('const', 'rand', 'pixel')
Box = tuple[int, int, int, int]  # (top, left, height, width)


def random_resized_crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """timm's `RandomResizedCropAndInterpolation.get_params`: up to 10 tries of a random area and log-uniform
    aspect ratio, else the whole image center-cropped to the nearest allowed aspect ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter_range(value: float | Sequence[float], center: float, clip_at_zero: bool) -> tuple[float, float] | None:
    """torchvision's ColorJitter range of one factor: `v` means [center - v, center + v]; None when it is a no-op."""
    if isinstance(value, (int, float)):
        low, high = center - float(value), center + float(value)
        low = max(low, 0.0) if clip_at_zero else low
    else:
        low, high = float(value[0]), float(value[1])
    return None if low == high == center else (low, high)


@dataclass(frozen=True)
class ColorJitter:
    """torchvision's ColorJitter: brightness, contrast, saturation and hue factors, applied in a random order."""

    brightness: tuple[float, float] | None
    contrast: tuple[float, float] | None
    saturation: tuple[float, float] | None
    hue: tuple[float, float] | None

    @classmethod
    def create(cls, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0) -> ColorJitter:
        """From torchvision's arguments: a number `v` or a (min, max) pair per factor."""
        return cls(
            _jitter_range(brightness, 1.0, True),
            _jitter_range(contrast, 1.0, True),
            _jitter_range(saturation, 1.0, True),
            _jitter_range(hue, 0.0, False),
        )

    def sample(self, rng: np.random.Generator) -> tuple[list[int], list[float | None]]:
        """The order of the four adjustments and their factors (None: that one is off), drawn as torchvision does."""
        order = [int(i) for i in rng.permutation(4)]
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        return order, [None if r is None else float(rng.uniform(*r)) for r in ranges]

    @staticmethod
    def apply(image: Image.Image, draws: tuple[list[int], list[float | None]]) -> Image.Image:
        order, factors = draws
        for i in order:
            factor = factors[i]
            if factor is None:
                continue
            if i == 3:
                image = adjust_hue(image, factor)
            else:
                enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i]
                image = enhancer(image).enhance(factor)
        return image


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's adjust_hue for PIL images: shift the 8-bit HSV hue channel, wrapping around."""
    h, s, v = image.convert('HSV').split()
    shift = np.int32(hue_factor * 255).astype(np.uint8)  # negative shifts wrap, as in torchvision
    h = Image.fromarray(np.asarray(h, dtype=np.uint8) + shift, 'L')
    return Image.merge('HSV', (h, s, v)).convert(image.mode)


@dataclass(frozen=True)
class RandomErasing:
    """timm's RandomErasing on a normalised image: up to `max_count` boxes filled with 0 ('const'),
    one normal colour per box ('rand') or normal noise per pixel ('pixel')."""

    probability: float = 0.5
    mode: str = 'const'
    max_count: int = 1
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    min_count: int = 1

    def sample(self, rng: np.random.Generator, height: int, width: int, channels: int) -> list[tuple]:
        """The erased boxes as (top, left, height, width, fill): fill is (h, w, C), (C,) or 0."""
        if rng.random() > self.probability:
            return []
        count = (
            self.min_count
            if self.min_count == self.max_count
            else int(rng.integers(self.min_count, self.max_count + 1))
        )
        area, log_aspect = height * width, (math.log(self.min_aspect), math.log(1 / self.min_aspect))
        boxes = []
        for _ in range(count):
            for _ in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect_ratio = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < width and h < height:
                    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                    boxes.append((top, left, h, w, self._fill(rng, channels, h, w)))
                    break
        return boxes

    def _fill(self, rng: np.random.Generator, channels: int, h: int, w: int) -> np.ndarray | float:
        # drawn channel-first as timm draws its (C, h, w) tensor, so the same normals land on the same pixels
        if self.mode == 'pixel':
            return rng.standard_normal((channels, h, w), dtype=np.float32).transpose(1, 2, 0)
        if self.mode == 'rand':
            return rng.standard_normal(channels, dtype=np.float32)
        return 0.0

    @staticmethod
    def apply(image: np.ndarray, boxes: list[tuple]) -> np.ndarray:
        """Erase the boxes of an HWC image, in place."""
        for top, left, h, w, fill in boxes:
            image[top : top + h, left : left + w] = fill
        return image


@dataclass(frozen=True)
class TrainTransform:
    """timm's training transform from a PIL image (any mode) or uint8 array to a float32 HWC array.

    `transform(image, rng)` draws from `rng`; `sample_params` and `apply` split the draws from the
    pixels, so the draws can be inspected, replayed or handed to timm. `host_part()` stops before
    the float conversion (uint8 HWC, the same draws but erasing's); `data.device.device_stage` normalises and
    erases a batch of those inside jit, as timm's prefetcher does on its device.
    """

    img_size: Size
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: str  # a PIL filter name, or 'random': bilinear or bicubic per image
    hflip: float
    vflip: float
    policy: aa.Policy | None
    color_jitter: ColorJitter | None
    color_jitter_prob: float | None  # None: always jitter
    grayscale_prob: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    erasing: RandomErasing | None
    host_only: bool = False  # the host part: uint8 pixels, normalised and erased on the device

    @property
    def dtype(self) -> type[np.generic]:
        """What an image becomes: uint8 for the host part, float32 for the whole transform."""
        return np.uint8 if self.host_only else np.float32

    def host_part(self) -> TrainTransform:
        """This transform up to the float conversion: uint8 HWC pixels, finished on the device (`device_stage`)."""
        return dataclasses.replace(self, host_only=True)

    def sample_params(self, rng: np.random.Generator, height: int, width: int) -> dict[str, Any]:
        """Every random choice for an image of this size, drawn in timm's order."""
        params: dict[str, Any] = dict(crop=random_resized_crop_box(rng, height, width, self.scale, self.ratio))
        params['interpolation'] = (
            aa.RANDOM_INTERPOLATION[rng.integers(2)] if self.interpolation == 'random' else self.interpolation
        )
        params['hflip'] = self.hflip > 0 and bool(rng.random() < self.hflip)
        params['vflip'] = self.vflip > 0 and bool(rng.random() < self.vflip)
        params['policy'] = self.policy.sample(rng) if self.policy else None
        # torchvision's RandomApply draws first and skips when p < its draw
        jitter = self.color_jitter and (self.color_jitter_prob is None or rng.random() <= self.color_jitter_prob)
        params['color_jitter'] = self.color_jitter.sample(rng) if jitter else None
        params['grayscale'] = self.grayscale_prob > 0 and bool(rng.random() < self.grayscale_prob)
        # drawn last, so the host part (which leaves erasing to the device) makes every other draw alike
        erasing = self.erasing and not self.host_only
        params['erasing'] = self.erasing.sample(rng, *self.img_size, len(self.mean)) if erasing else []
        return params

    def augment(self, image: Image.Image, params: dict[str, Any]) -> Image.Image:
        """The 8-bit part: crop and resize, flips, the policy and/or colour jitter, grayscale."""
        top, left, h, w = params['crop']
        image = image.crop((left, top, left + w, top + h))
        if (h, w) != self.img_size:
            image = image.resize(self.img_size[::-1], INTERPOLATIONS[params['interpolation']])
        if params['hflip']:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if params['vflip']:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if params['policy'] is not None:
            image = self.policy.apply(image, params['policy'])
        if params['color_jitter'] is not None:
            image = self.color_jitter.apply(image, params['color_jitter'])
        if params['grayscale']:
            image = image.convert('L').convert('RGB')  # torchvision's rgb_to_grayscale with 3 channels
        return image

    def apply(self, image: ImageLike, params: dict[str, Any]) -> np.ndarray:
        augmented = self.augment(to_rgb(image), params)
        if self.host_only:
            return np.asarray(augmented, np.uint8)
        return RandomErasing.apply(normalize(augmented, self.mean, self.std), params['erasing'])

    def __call__(self, image: ImageLike, rng: np.random.Generator | None = None) -> np.ndarray:
        """One augmented image; without `rng`, a fresh unseeded Generator (not reproducible).

        For reproducible training seed one Generator per sample, e.g. `default_rng((seed, epoch, index))`:
        the result then depends neither on the loading order nor on the number of workers.
        """
        image = to_rgb(image)
        rng = np.random.default_rng() if rng is None else rng
        return self.apply(image, self.sample_params(rng, image.height, image.width))


def create_train_transform(
    img_size: int | Sequence[int] = 224,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] | None = None,
    hflip: float = 0.5,
    vflip: float = 0.0,
    color_jitter: float | Sequence[float] | None = 0.4,
    color_jitter_prob: float | None = None,
    grayscale_prob: float = 0.0,
    auto_augment: str | None = None,
    interpolation: str = 'random',
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    re_prob: float = 0.0,
    re_mode: str = 'const',
    re_count: int = 1,
) -> TrainTransform:
    """timm's `transforms_imagenet_train` with its defaults; `img_size` is an int or (H, W).

    As in timm, an `auto_augment` policy turns colour jitter off (unless it names '3a'), and a
    scalar `color_jitter` jitters brightness, contrast and saturation, not hue.
    """
    if interpolation != 'random' and interpolation not in INTERPOLATIONS:
        raise ValueError(
            f'unknown interpolation {interpolation!r}; choose random or one of {", ".join(INTERPOLATIONS)}'
        )
    if re_mode not in RE_MODES:
        raise ValueError(f'unknown re_mode {re_mode!r}; choose one of {", ".join(RE_MODES)}')
    size = image_size(img_size)
    policy = None
    if auto_augment:
        hparams = aa.Hparams(
            translate_const=int(min(size) * 0.45),
            img_mean=tuple(min(255, round(255 * x)) for x in mean),
            interpolation=None if interpolation == 'random' else interpolation,
        )
        policy = aa.create_policy(auto_augment, hparams)
    jitter = None
    if color_jitter is not None and not (auto_augment and '3a' not in auto_augment):
        factors = (float(color_jitter),) * 3 if isinstance(color_jitter, (int, float)) else tuple(color_jitter)
        if len(factors) not in (3, 4):
            raise ValueError(
                f'color_jitter takes 3 or 4 factors (brightness, contrast, saturation[, hue]), got {factors}'
            )
        jitter = ColorJitter.create(*factors)
    return TrainTransform(
        img_size=size,
        scale=tuple(scale or (0.08, 1.0)),
        ratio=tuple(ratio or (3 / 4, 4 / 3)),
        interpolation=interpolation,
        hflip=hflip,
        vflip=vflip,
        policy=policy,
        color_jitter=jitter,
        color_jitter_prob=color_jitter_prob,
        grayscale_prob=grayscale_prob,
        mean=tuple(mean),
        std=tuple(std),
        erasing=RandomErasing(re_prob, re_mode, re_count) if re_prob > 0 else None,
    )


def create_no_aug_transform(
    img_size: int | Sequence[int] = 224,
    interpolation: str = 'bilinear',
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> EvalTransform:
    """timm's `transforms_noaug_train` (`create_transform(is_training=True, no_aug=True)`): resize, center crop.

    torchvision's Resize takes an int as the short side (then the crop) and a pair as the exact
    size, so an int is the eval transform's 'center' mode at crop 1 and a pair its 'squash' mode.
    """
    interpolation = 'bilinear' if interpolation == 'random' else interpolation
    size = image_size(img_size)
    mode = 'center' if isinstance(img_size, int) else 'squash'
    return EvalTransform(size, size, mode, interpolation, tuple(mean), tuple(std))
