"""timm's eval transform, and the image conversions its training transform shares.

`create_eval_transform(...)` (what `nfnet_jax.data.create_transform` gives outside training) gives the
same float32 numbers as timm's eval `create_transform`, in HWC instead of CHW: the resizing and
cropping are the very PIL calls torchvision makes on a PIL image, and the normalisation is the same
float32 arithmetic. Images of any PIL mode become RGB through PIL's `convert('RGB')`, as timm's
datasets do (alpha is dropped, not composited; 16-bit grayscale is clipped at 255 by PIL, not
rescaled). `augment` and `auto_augment` build on this module, so it imports neither.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nfnet_jax.models.pretrained import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

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
# Past this many times the output's pixels, the eval resize keeps only the cropped region (`resize_and_crop`).
MAX_RESIZE_FACTOR = 64
ImageLike = Image.Image | np.ndarray
Size = tuple[int, int]  # (height, width)


def image_size(size: int | Sequence[int]) -> Size:
    """An output size as (height, width): an int is a square, a sequence's last two entries are (H, W)."""
    return (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))


def to_rgb(image: ImageLike) -> Image.Image:
    """A PIL image (any mode) or a uint8 HWC/HW array as an RGB PIL image, as timm's datasets convert."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f'arrays must be uint8 HWC or HW images, got dtype {image.dtype}; pass a PIL image instead')
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f'expected a PIL image or a uint8 numpy array, got {type(image).__name__}')
    return image if image.mode == 'RGB' else image.convert('RGB')


def normalize(image: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """torchvision's to_tensor then Normalize, in HWC: the same float32 arithmetic, so the same numbers."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform (resize, center crop, to float, normalise) from a PIL image to float32 HWC.

    `host_part()` is the same transform up to the float conversion (uint8 HWC), for the device to
    normalise (`nfnet_jax.data.device.device_stage`).
    """

    img_size: Size
    scale_size: Size
    crop_mode: str
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    host_only: bool = False  # the host part: uint8 pixels, normalised on the device

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
        return max(1, round(height / ratio)), max(1, round(width / ratio))  # a sliver keeps one pixel

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """The resized and cropped (or padded) image, still 8-bit: the geometric part of the transform.

        An extreme aspect ratio asks for a resized image far larger than the output (a 20000x1 image
        resized to a short edge of 256 is 5 million pixels long): past `MAX_RESIZE_FACTOR` times the
        output's pixels, only the region the crop keeps is resized (PIL's `box`), so memory stays
        bounded by the output size. The numbers may then differ from torchvision's by one 8-bit step.
        """
        size = self.resized_size(image.height, image.width)
        fill = self.fill if self.crop_mode == 'border' else (0, 0, 0)
        if size == (image.height, image.width):
            return center_crop_or_pad(image, self.img_size, fill)
        resample = INTERPOLATIONS[self.interpolation]
        if size[0] * size[1] <= MAX_RESIZE_FACTOR * self.img_size[0] * self.img_size[1]:
            return center_crop_or_pad(image.resize(size[::-1], resample), self.img_size, fill)
        # The crop's rows and columns of the resized image (all of them where it is padded instead), in
        # source coordinates: center_crop_or_pad's offsets, so the kept part is the same region.
        (top, height), (left, width) = (crop_span(n, out) for n, out in zip(size, self.img_size, strict=True))
        scale_y, scale_x = image.height / size[0], image.width / size[1]
        box = (left * scale_x, top * scale_y, (left + width) * scale_x, (top + height) * scale_y)
        return center_crop_or_pad(image.resize((width, height), resample, box=box), self.img_size, fill)

    @property
    def fill(self) -> tuple[int, ...]:
        """timm's padding colour for the border mode: the mean as 8-bit values."""
        return tuple(round(255 * v) for v in self.mean)

    @property
    def dtype(self) -> type[np.generic]:
        """What an image becomes: uint8 for the host part, float32 for the whole transform."""
        return np.uint8 if self.host_only else np.float32

    def host_part(self) -> EvalTransform:
        """This transform without the normalisation: uint8 HWC pixels, finished on the device (`device_stage`)."""
        return dataclasses.replace(self, host_only=True)

    def __call__(self, image: ImageLike) -> np.ndarray:
        image = to_rgb(image)
        if image.width * image.height == 0:
            raise ValueError(f'an empty image ({image.width}x{image.height} pixels) has nothing to classify')
        pixels = self.resize_and_crop(image)
        return np.asarray(pixels, np.uint8) if self.host_only else normalize(pixels, self.mean, self.std)


def crop_span(size: int, out: int) -> tuple[int, int]:
    """The (start, length) that `center_crop_or_pad` keeps of `size` pixels for an output of `out` pixels."""
    return (int(round((size - out) / 2.0)), out) if size > out else (0, size)


def center_crop_or_pad(image: Image.Image, size: Size, fill: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """torchvision's center_crop (padding with `fill` where the image is smaller), with its rounding."""
    height, width = size
    if (image.height, image.width) == (height, width):
        return image
    # Where the image is smaller it is padded, the extra pixel going right/bottom; where larger,
    # it is cropped at round((in - out) / 2), Python's round-half-to-even as in torchvision.
    left = (width - image.width) // 2 if width > image.width else -crop_span(image.width, width)[0]
    top = (height - image.height) // 2 if height > image.height else -crop_span(image.height, height)[0]
    if width <= image.width and height <= image.height:
        return image.crop((-left, -top, -left + width, -top + height))
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(image, (left, top))
    return canvas


def create_eval_transform(
    input_size: int | Sequence[int] = 224,
    interpolation: str = 'bilinear',
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> EvalTransform:
    """timm's `transforms_imagenet_eval`: `input_size` is an int, (H, W) or (C, H, W).

    Defaults are timm's: bilinear, crop_pct 0.875, center crop.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f'unknown interpolation {interpolation!r}; choose one of {", ".join(INTERPOLATIONS)}')
    crop_mode = crop_mode or 'center'
    if crop_mode not in CROP_MODES:
        raise ValueError(f'unknown crop_mode {crop_mode!r}; choose one of {", ".join(CROP_MODES)}')
    crop_pct = crop_pct or DEFAULT_CROP_PCT
    img_size = image_size(input_size)
    scale_size = tuple(math.floor(v / crop_pct) for v in img_size)
    return EvalTransform(img_size, scale_size, crop_mode, interpolation, tuple(mean), tuple(std))
