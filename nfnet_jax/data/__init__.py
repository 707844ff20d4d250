"""timm's data pipeline for NFNets: a model's data config, its eval and training transforms, image files and
batches, and the ImageNet-1k class names.

`create_transform(**resolve_model_data_config(model))` gives the same float32 numbers as
`timm.data.create_transform(**timm.data.resolve_model_data_config(model))`, in HWC instead of
CHW. These two, timm's entry points, live here because they join the modules below; the modules
import one another in one direction only and never this package:

- `transforms`: the eval transform and the image conversions both transforms share,
- `auto_augment`: RandAugment, AutoAugment and AugMix (builds on `transforms`),
- `augment`: the training transform (builds on `transforms` and `auto_augment`),
- `images`: finding (one rule for the commands and the training folders) and reading image files,
- `device`: the device half of a transform (normalising and erasing uint8 batches inside jit),
- `loaders` (grain, imported on its own): training and evaluation batches, and the commands' batches of files,
- `labels`: the ImageNet-1k class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nfnet_jax.data.augment import TrainTransform, create_no_aug_transform, create_train_transform
from nfnet_jax.data.images import (
    IMAGE_EXTENSIONS,
    find_images,
    list_images,
    load_batch,
    load_image,
    natural_key,
    set_max_image_pixels,
)
from nfnet_jax.data.labels import imagenet_labels, imagenet_synsets
from nfnet_jax.data.transforms import (
    CROP_MODES,
    DEFAULT_CROP_PCT,
    INTERPOLATIONS,
    EvalTransform,
    ImageLike,
    Size,
    center_crop_or_pad,
    create_eval_transform,
    image_size,
    normalize,
    to_rgb,
)
from nfnet_jax.models.pretrained import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PretrainedCfg

__all__ = [
    'CROP_MODES',
    'DEFAULT_CROP_PCT',
    'IMAGE_EXTENSIONS',
    'INTERPOLATIONS',
    'EvalTransform',
    'ImageLike',
    'Size',
    'TrainTransform',
    'center_crop_or_pad',
    'create_eval_transform',
    'create_no_aug_transform',
    'create_train_transform',
    'create_transform',
    'find_images',
    'image_size',
    'imagenet_labels',
    'imagenet_synsets',
    'list_images',
    'load_batch',
    'load_image',
    'natural_key',
    'normalize',
    'resolve_model_data_config',
    'set_max_image_pixels',
    'to_rgb',
]


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
    `nfnet_jax.data.augment.TrainTransform` (timm's training transform; `train_options` are
    `create_train_transform`'s: scale, ratio, hflip, vflip, color_jitter, color_jitter_prob,
    grayscale_prob, auto_augment, re_prob, re_mode, re_count, with timm's defaults), or with
    `no_aug` timm's resize and center crop; otherwise an EvalTransform (training options are
    ignored, as in timm).
    """
    if not is_training:
        return create_eval_transform(input_size, interpolation, mean, std, crop_pct, crop_mode)
    img_size = input_size if isinstance(input_size, int) else input_size[-2:]
    if no_aug:
        return create_no_aug_transform(img_size, interpolation, mean, std)
    return create_train_transform(img_size, interpolation=interpolation, mean=mean, std=std, **train_options)
