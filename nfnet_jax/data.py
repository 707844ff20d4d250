"""Inference preprocessing equal to timm's eval transform, image files and batches, and the ImageNet-1k class names.

`create_transform(**resolve_model_data_config(model))` gives the same float32 numbers as
`timm.data.create_transform(**timm.data.resolve_model_data_config(model))`, in HWC instead of
CHW: the resizing and cropping are the very PIL calls torchvision makes on a PIL image, and
the normalisation is the same float32 arithmetic. Images of any PIL mode become RGB through
PIL's `convert('RGB')`, as timm's datasets do (alpha is dropped, not composited; 16-bit
grayscale is clipped at 255 by PIL, not rescaled).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from nfnet_jax.files import display_name
from nfnet_jax.pretrained import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PretrainedCfg

if TYPE_CHECKING:
    from nfnet_jax.augment import TrainTransform

DEFAULT_CROP_PCT = 0.875
CROP_MODES = ('center', 'squash', 'border')
INTERPOLATIONS: dict[str, Image.Resampling] = {
    'nearest': Image.Resampling.NEAREST,
    'bilinear': Image.Resampling.BILINEAR,
    'bicubic': Image.Resampling.BICUBIC,
    'box': Image.Resampling.BOX,
    'hamming': Image.Resampling.HAMMING,
    'lanczos': Image.Resampling.LANCZOS,
}
ImageLike = Image.Image | np.ndarray
Size = tuple[int, int]  # (height, width)


def resolve_model_data_config(model: Any, use_test_size: bool = False) -> dict[str, Any]:
    """The model's eval data settings, as timm's `resolve_model_data_config` returns them.

    `model` is a model (its `pretrained_cfg`; a features model's is its backbone's; a model of
    your own without one gets timm's defaults) or a PretrainedCfg. `use_test_size` takes the
    tag's larger test resolution and crop.
    Without a pretrained config, timm's defaults apply (224, bicubic, crop 0.875, ImageNet mean/std).
    """
    cfg = model if isinstance(model, PretrainedCfg) else getattr(model, 'pretrained_cfg', None)  # any model
    if cfg is None:
        return dict(
            input_size=(3, 224, 224),
            interpolation='bicubic',
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            crop_pct=DEFAULT_CROP_PCT,
            crop_mode='center',
        )
    use_test = use_test_size and cfg.test_input_size is not None
    return dict(
        input_size=cfg.test_input_size if use_test else cfg.input_size,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=(cfg.test_crop_pct if use_test_size and cfg.test_crop_pct else cfg.crop_pct),
        crop_mode=cfg.crop_mode,
    )


def to_rgb(image: ImageLike) -> Image.Image:
    """A PIL image (any mode) or a uint8 HWC/HW array as an RGB PIL image, as timm's datasets convert."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f'arrays must be uint8 HWC or HW images, got dtype {image.dtype}; pass a PIL image instead')
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f'expected a PIL image or a uint8 numpy array, got {type(image).__name__}')
    return image if image.mode == 'RGB' else image.convert('RGB')


@dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform (resize, center crop, to float, normalise) from a PIL image to float32 HWC."""

    img_size: Size
    scale_size: Size
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def resized_size(self, height: int, width: int) -> Size:
        """The size the image is resized to before the crop, computed exactly as torchvision and timm do."""
        if self.crop_mode == 'squash':
            return self.scale_size
        if self.crop_mode == 'center' and self.scale_size[0] == self.scale_size[1]:
            # torchvision's Resize(int): the short edge to the size, the long edge truncated.
            target = self.scale_size[0]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(target * long / short)
            return (new_long, target) if width <= height else (target, new_long)
        # timm's ResizeKeepRatio: scale by the short edge's ratio (center) or the long edge's (border).
        ratio_h, ratio_w = height / self.scale_size[0], width / self.scale_size[1]
        ratio = max(ratio_h, ratio_w) if self.crop_mode == 'border' else min(ratio_h, ratio_w)
        return round(height / ratio), round(width / ratio)

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The resized and cropped (or padded) image, still 8-bit: the geometric part of the transform."""
        size = self.resized_size(image.height, image.width)
        if size != (image.height, image.width):
            image = image.resize(size[::-1], INTERPOLATIONS[self.interpolation])
        return center_crop_or_pad(image, self.img_size, self.fill if self.crop_mode == 'border' else (0, 0, 0))

    @property
    def fill(self) -> tuple[int, ...]:
        """timm's padding colour for the border mode: the mean as 8-bit values."""
        return tuple(round(255 * v) for v in self.mean)

    def __call__(self, image: ImageLike) -> np.ndarray:
        image = to_rgb(image)
        if image.width * image.height == 0:
            raise ValueError(f'an empty image ({image.width}x{image.height} pixels) has nothing to classify')
        pixels = np.asarray(self.resize_and_crop(image), dtype=np.float32) / np.float32(255)
        return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def center_crop_or_pad(image: Image.Image, size: Size, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """torchvision's center_crop (padding with `fill` where the image is smaller), with its rounding."""
    height, width = size
    if (image.height, image.width) == (height, width):
        return image
    # Where the image is smaller it is padded, the extra pixel going right/bottom; where larger,
    # it is cropped at round((in - out) / 2), Python's round-half-to-even as in torchvision.
    left = (width - image.width) // 2 if width > image.width else -int(round((image.width - width) / 2.0))
    top = (height - image.height) // 2 if height > image.height else -int(round((image.height - height) / 2.0))
    if width <= image.width and height <= image.height:
        return image.crop((-left, -top, -left + width, -top + height))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image, (left, top))
    return canvas


def create_transform(
    input_size: int | Sequence[int] = 224,
    is_training: bool = False,
    interpolation: str = 'bilinear',
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    no_aug: bool = False,
    **train_options: Any,
) -> EvalTransform | TrainTransform:
    """timm's `create_transform`: `input_size` is an int, (H, W) or (C, H, W).

    Defaults are timm's: bilinear, crop_pct 0.875, center crop. `is_training=True` gives
    `nfnet_jax.augment.TrainTransform` (timm's training transform; `train_options` are
    `create_train_transform`'s: scale, ratio, hflip, vflip, color_jitter, color_jitter_prob,
    grayscale_prob, auto_augment, re_prob, re_mode, re_count, with timm's defaults), or with
    `no_aug` timm's resize and center crop; otherwise an EvalTransform (training options are
    ignored, as in timm).
    """
    if is_training:
        from nfnet_jax.augment import create_no_aug_transform, create_train_transform  # they build on this module

        img_size = input_size if isinstance(input_size, int) else input_size[-2:]
        if no_aug:
            return create_no_aug_transform(img_size, interpolation, mean, std)
        return create_train_transform(img_size, interpolation=interpolation, mean=mean, std=std, **train_options)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f'unknown interpolation {interpolation!r}; choose one of {", ".join(INTERPOLATIONS)}')
    crop_mode = crop_mode or 'center'
    if crop_mode not in CROP_MODES:
        raise ValueError(f'unknown crop_mode {crop_mode!r}; choose one of {", ".join(CROP_MODES)}')
    crop_pct = crop_pct or DEFAULT_CROP_PCT
    if isinstance(input_size, int):
        img_size = (input_size, input_size)
    else:
        img_size = tuple(int(v) for v in input_size[-2:])
    scale_size = tuple(math.floor(v / crop_pct) for v in img_size)
    return EvalTransform(img_size, scale_size, crop_mode, interpolation, tuple(mean), tuple(std))


def set_max_image_pixels(pixels: int | None) -> None:
    """PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, a process-wide setting) for every image read
    after this: larger images are refused by `load_image`, by name. None or 0 lifts the limit."""
    if pixels is not None and pixels < 0:
        raise ValueError(f'the image pixel limit must be positive (0: none), not {pixels}')
    Image.MAX_IMAGE_PIXELS = pixels or None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB; any failure is an OSError naming the file.

    A truncated or non-image file, an empty (0-pixel) image, and one larger than PIL's
    decompression-bomb limit (`set_max_image_pixels`; PIL itself only warns up to twice it) fail
    here, so a caller can report the file and go on.
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(f'Image size ({image.width * image.height} pixels)')
            if image.width * image.height == 0:
                raise ValueError(f'an empty image ({image.width}x{image.height} pixels)')
            image.load()
            return to_rgb(image)
    except Image.DecompressionBombError as err:  # PIL's own, at twice the limit, or ours above
        found = re.search(r'\((\d+) pixels\)', str(err))
        size = f'{int(found[1]):,} pixels' if found else 'too many pixels'
        raise OSError(
            f'{display_name(path)}: refused: {size}, over the limit of {limit:,} (a decompression bomb?); '
            'raise the limit with --max-image-pixels (set_max_image_pixels) if it is a real image'
        ) from None
    except Exception as err:  # PIL reports bad files with OSError, SyntaxError, ValueError, struct.error, ...
        raise OSError(f'{display_name(path)}: not a readable image ({type(err).__name__}: {err})') from None


def load_batch(images: Sequence[ImageLike | str | os.PathLike], transform: EvalTransform | Any) -> np.ndarray:
    """Images or image paths through `transform`, stacked into one float32 NHWC batch.

    Every file is tried; if any cannot be read, one OSError names each of them.
    """
    arrays, errors = [], []
    for image in images:
        try:
            arrays.append(transform(load_image(image) if isinstance(image, (str, os.PathLike)) else image))
        except OSError as err:
            errors.append(str(err))
    if errors:
        raise OSError(f'{len(errors)} of {len(images)} images could not be read:\n' + '\n'.join(errors))
    return np.stack(arrays)


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """The files named, and every non-hidden file (or broken link) under the folders named, in sorted order."""
    files = []
    for path in inputs:
        if path.is_dir():
            # Links that lead nowhere (dangling, loops) are listed too, to be reported by name when read.
            found = (p for p in path.rglob('*') if p.is_file() or (p.is_symlink() and not p.is_dir()))
            files += sorted(p for p in found if not any(part.startswith('.') for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f'{path}: no such file or folder')
    return files


def batches(
    files: Sequence[Path], transform: Callable, batch_size: int, on_error: Callable[[Path, str], None]
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """The readable images in batches of `batch_size`; unreadable files go to `on_error` and are skipped.

    Images are decoded and transformed on threads (PIL releases the GIL) while the device runs,
    at most a few batches ahead, so memory stays bounded however many files there are.
    """

    def prepare(path: Path) -> np.ndarray | str:
        try:
            return transform(load_image(path))
        except OSError as err:
            return str(err)
        except Exception as err:  # the transform failing on one image stops nothing but that image
            return f'{display_name(path)}: {type(err).__name__}: {err}'

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


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    text = resources.files('nfnet_jax').joinpath('_info', 'imagenet_1k_classes.tsv').read_text(encoding='utf-8')
    return tuple(tuple(line.split('\t', 1)) for line in text.splitlines())


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (WordNet lemmas, e.g. 'tench, Tinca tinca').

    The same descriptions as timm's `ImageNetInfo().index_to_description(i)`, shipped with the package.
    """
    return [lemma for _, lemma in _imagenet_classes()]


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (e.g. 'n01440764')."""
    return [synset for synset, _ in _imagenet_classes()]
