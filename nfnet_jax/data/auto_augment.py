"""timm's RandAugment, AutoAugment and AugMix, with every random draw taken from a numpy Generator.

A policy is parsed from timm's config strings (`rand-m9-mstd0.5-inc1`, `original`, `augmix-m5-w4-d2`).
Its `sample(rng)` draws everything at once (which ops, their magnitudes, signs and interpolations),
in the order timm draws them, and `apply(image, draws)` runs the very PIL calls of timm's
`timm/data/auto_augment.py`: given the same draws the images are equal to the bit. The magnitude
arithmetic (level / 10 scaled per op) is timm's, written the same way so the floats round alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from nfnet_jax.data.transforms import INTERPOLATIONS

LEVEL_DENOM = 10.0  # magnitude M maps to the fraction M / 10 of each op's range
RANDOM_INTERPOLATION = ('bilinear', 'bicubic')


@dataclass(frozen=True)
class Hparams:
    """The image-dependent settings timm passes to every op (`aa_params` in its transforms factory)."""

    translate_const: int = 250
    img_mean: tuple[int, ...] = (128, 128, 128)  # fill of the geometric ops
    interpolation: str | None = None  # None: bilinear or bicubic at random, per op
    translate_pct: float = 0.45
    magnitude_std: float = 0.0  # > 0: magnitude ~ N(M, std); inf: ~ U(0, M)
    magnitude_max: float | None = None  # clip of the magnitude, 10 when None


def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


def _enhance_increasing(level: float, rng: np.random.Generator) -> tuple[float]:
    # the 'no change' factor is 1; larger levels move away from it, towards 0.1 or 1.9
    return (max(0.1, 1.0 + _negate((level / LEVEL_DENOM) * 0.9, rng)),)


def _minmax(level: float, min_val: float, max_val: float) -> tuple[float]:
    level = min_val + (max_val - min_val) * (level / LEVEL_DENOM)
    return (max(min_val, min(max_val, level)),)


def _posterize(level: float) -> int:
    return int((level / LEVEL_DENOM) * 4)


def _solarize(level: float) -> int:
    return min(256, int((level / LEVEL_DENOM) * 256))


LevelFn = Callable[[float, Hparams, np.random.Generator], tuple]
# timm's LEVEL_TO_ARG: magnitude -> op arguments, drawing the sign where the op has one.
LEVEL_TO_ARG: dict[str, LevelFn | None] = {
    'AutoContrast': None,
    'Equalize': None,
    'Invert': None,
    'Rotate': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * 30.0, rng),),
    'Posterize': lambda m, hp, rng: (_posterize(m),),
    'PosterizeIncreasing': lambda m, hp, rng: (4 - _posterize(m),),
    'PosterizeOriginal': lambda m, hp, rng: (_posterize(m) + 4,),
    'Solarize': lambda m, hp, rng: (_solarize(m),),
    'SolarizeIncreasing': lambda m, hp, rng: (256 - _solarize(m),),
    'SolarizeAdd': lambda m, hp, rng: (min(128, int((m / LEVEL_DENOM) * 110)),),
    'Color': lambda m, hp, rng: ((m / LEVEL_DENOM) * 1.8 + 0.1,),
    'ColorIncreasing': lambda m, hp, rng: _enhance_increasing(m, rng),
    'Contrast': lambda m, hp, rng: ((m / LEVEL_DENOM) * 1.8 + 0.1,),
    'ContrastIncreasing': lambda m, hp, rng: _enhance_increasing(m, rng),
    'Brightness': lambda m, hp, rng: ((m / LEVEL_DENOM) * 1.8 + 0.1,),
    'BrightnessIncreasing': lambda m, hp, rng: _enhance_increasing(m, rng),
    'Sharpness': lambda m, hp, rng: ((m / LEVEL_DENOM) * 1.8 + 0.1,),
    'SharpnessIncreasing': lambda m, hp, rng: _enhance_increasing(m, rng),
    'ShearX': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * 0.3, rng),),
    'ShearY': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * 0.3, rng),),
    'TranslateX': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * float(hp.translate_const), rng),),
    'TranslateY': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * float(hp.translate_const), rng),),
    'TranslateXRel': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * hp.translate_pct, rng),),
    'TranslateYRel': lambda m, hp, rng: (_negate((m / LEVEL_DENOM) * hp.translate_pct, rng),),
    'Desaturate': lambda m, hp, rng: _minmax(m, 0.5, 1.0),
    'GaussianBlur': lambda m, hp, rng: _minmax(m, 0.1, 2.0),
    'GaussianBlurRand': lambda m, hp, rng: _minmax(m, 0.0, 1.0),
}


def _affine(image: Image.Image, matrix: tuple[float, ...], fill: tuple[int, ...], resample: str) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=INTERPOLATIONS[resample], fillcolor=fill)


def _posterize_op(image: Image.Image, bits: int) -> Image.Image:
    if bits >= 8:
        return image
    if bits <= 0:
        # Keeping no bit leaves a black image, as older Pillow did; Pillow 13 refuses 0 bits and timm
        # 1.0.31 then raises (non-increasing Posterize below magnitude 2.5, AutoAugment 'v0').
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


def _solarize_add(image: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return image.point(lut * 3)  # one table per RGB channel


# timm's NAME_TO_OP as (image, *args, fill, resample) -> image, with timm's PIL calls. Geometric ops
# take the fill and the resampling filter; the rest ignore them.
OPS: dict[str, Callable[..., Image.Image]] = {
    'AutoContrast': lambda im, **_: ImageOps.autocontrast(im),
    'Equalize': lambda im, **_: ImageOps.equalize(im),
    'Invert': lambda im, **_: ImageOps.invert(im),
    'Rotate': lambda im, deg, fill, resample: im.rotate(deg, resample=INTERPOLATIONS[resample], fillcolor=fill),
    'Posterize': lambda im, bits, **_: _posterize_op(im, bits),
    'Solarize': lambda im, thresh, **_: ImageOps.solarize(im, thresh),
    'SolarizeAdd': lambda im, add, **_: _solarize_add(im, add),
    'Color': lambda im, f, **_: ImageEnhance.Color(im).enhance(f),
    'Contrast': lambda im, f, **_: ImageEnhance.Contrast(im).enhance(f),
    'Brightness': lambda im, f, **_: ImageEnhance.Brightness(im).enhance(f),
    'Sharpness': lambda im, f, **_: ImageEnhance.Sharpness(im).enhance(f),
    'ShearX': lambda im, f, fill, resample: _affine(im, (1, f, 0, 0, 1, 0), fill, resample),
    'ShearY': lambda im, f, fill, resample: _affine(im, (1, 0, 0, f, 1, 0), fill, resample),
    'TranslateX': lambda im, px, fill, resample: _affine(im, (1, 0, px, 0, 1, 0), fill, resample),
    'TranslateY': lambda im, px, fill, resample: _affine(im, (1, 0, 0, 0, 1, px), fill, resample),
    'TranslateXRel': lambda im, pct, fill, resample: _affine(im, (1, 0, pct * im.size[0], 0, 1, 0), fill, resample),
    'TranslateYRel': lambda im, pct, fill, resample: _affine(im, (1, 0, 0, 0, 1, pct * im.size[1]), fill, resample),
    # enhance factor 0 is grayscale, 1 the image unchanged
    'Desaturate': lambda im, f, **_: ImageEnhance.Color(im).enhance(min(1.0, max(0.0, 1.0 - f))),
    'GaussianBlur': lambda im, radius, **_: im.filter(ImageFilter.GaussianBlur(radius=radius)),
}
# The variants differ from their base op only in how the magnitude maps to the argument.
OPS.update(
    {
        name: OPS[name.removesuffix(s)]
        for name in LEVEL_TO_ARG
        for s in ('Increasing', 'Original', 'Rand')
        if name.endswith(s)
    }
)
GEOMETRIC = frozenset(name for name in OPS if name.startswith(('Rotate', 'Shear', 'Translate')))

OpDraw = tuple[str, tuple, str | None]  # (op name, its arguments, its interpolation)


@dataclass(frozen=True)
class AugmentOp:
    """timm's AugmentOp: apply `name` with probability `prob` at `magnitude` (0 to 10)."""

    name: str
    prob: float = 0.5
    magnitude: float = 10
    hparams: Hparams = Hparams()

    def sample(self, rng: np.random.Generator) -> OpDraw | None:
        """The op's arguments, or None when it is skipped; the draws in timm's order."""
        hp = self.hparams
        if self.prob < 1.0 and rng.random() > self.prob:
            return None
        magnitude = self.magnitude
        if hp.magnitude_std == float('inf'):
            magnitude = rng.uniform(0, magnitude)
        elif hp.magnitude_std > 0:
            magnitude = rng.normal(magnitude, hp.magnitude_std)
        magnitude = max(0.0, min(magnitude, hp.magnitude_max or LEVEL_DENOM))
        level_fn = LEVEL_TO_ARG[self.name]
        args = level_fn(magnitude, hp, rng) if level_fn is not None else ()
        resample = None
        if self.name in GEOMETRIC:
            resample = hp.interpolation or RANDOM_INTERPOLATION[rng.integers(len(RANDOM_INTERPOLATION))]
        elif self.name == 'GaussianBlurRand':  # timm draws the radius inside the op
            # Python's random.uniform(a, b), which (unlike numpy's) takes b < a: at magnitude < 0.5
            args = (0.1 + (2.0 * args[0] - 0.1) * rng.random(),)
        return self.name, args, resample


def apply_op(image: Image.Image, draw: OpDraw | None, fill: tuple[int, ...]) -> Image.Image:
    """One op with its drawn arguments (None: skipped)."""
    if draw is None:
        return image
    name, args, resample = draw
    return OPS[name](image, *args, fill=fill, resample=resample)


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: `num_layers` ops chosen at random (weighted ones without replacement)."""

    ops: tuple[AugmentOp, ...]
    num_layers: int = 2
    choice_weights: tuple[float, ...] | None = None

    def sample(self, rng: np.random.Generator) -> list[OpDraw | None]:
        weights = None if self.choice_weights is None else np.asarray(self.choice_weights)
        chosen = rng.choice(len(self.ops), self.num_layers, replace=weights is None, p=weights)
        return [self.ops[i].sample(rng) for i in chosen]

    def apply(self, image: Image.Image, draws: list[OpDraw | None]) -> Image.Image:
        for draw in draws:
            image = apply_op(image, draw, self.ops[0].hparams.img_mean)
        return image


@dataclass(frozen=True)
class AutoAugment:
    """timm's AutoAugment: one sub-policy chosen uniformly, its ops applied each with its own probability."""

    policy: tuple[tuple[AugmentOp, ...], ...]

    def sample(self, rng: np.random.Generator) -> list[OpDraw | None]:
        return [op.sample(rng) for op in self.policy[rng.integers(len(self.policy))]]

    def apply(self, image: Image.Image, draws: list[OpDraw | None]) -> Image.Image:
        for draw in draws:
            image = apply_op(image, draw, self.policy[0][0].hparams.img_mean)
        return image


@dataclass(frozen=True)
class AugMix:
    """timm's AugMixAugment: `width` chains of 1 to 3 random ops, mixed by Dirichlet weights, blended by a Beta draw."""

    ops: tuple[AugmentOp, ...]
    alpha: float = 1.0
    width: int = 3
    depth: int = -1  # -1: each chain 1 to 3 ops long at random
    blended: bool = False  # timm's faster, approximate mode: one PIL blend per chain

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        weights = np.float32(rng.dirichlet([self.alpha] * self.width))
        m = np.float32(rng.beta(self.alpha, self.alpha))
        chains = []
        for _ in range(self.width):
            depth = self.depth if self.depth > 0 else rng.integers(1, 4)
            chains.append([self.ops[i].sample(rng) for i in rng.choice(len(self.ops), depth, replace=True)])
        return dict(weights=weights, m=m, chains=chains)

    def _chain(self, image: Image.Image, chain: list[OpDraw | None]) -> Image.Image:
        for draw in chain:
            image = apply_op(image, draw, self.ops[0].hparams.img_mean)
        return image

    def apply(self, image: Image.Image, draws: dict[str, Any]) -> Image.Image:
        weights, m, chains = draws['weights'], draws['m'], draws['chains']
        if self.blended:
            # each chain blended into the running image with the weight that gives it its share at the end
            cump, blend_weights = 1.0, []
            for w in (weights * m)[::-1]:
                alpha = w / cump
                cump *= 1 - alpha
                blend_weights.append(alpha)
            original = image
            for w, chain in zip(np.array(blend_weights[::-1], dtype=np.float32), chains, strict=True):
                image = Image.blend(image, self._chain(original, chain), w)
            return image
        mixed = np.zeros_like(image, dtype=np.float32)
        for w, chain in zip(weights, chains, strict=True):
            mixed += w * np.asarray(self._chain(image, chain), dtype=np.float32)
        np.clip(mixed, 0, 255.0, out=mixed)
        return Image.blend(image, Image.fromarray(mixed.astype(np.uint8)), m)


Policy = RandAugment | AutoAugment | AugMix

RAND_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
    'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
)  # fmt: skip
# The same ops with the magnitude increasing the severity throughout ('inc1').
RAND_INCREASING_TRANSFORMS = tuple(
    name + 'Increasing' if name + 'Increasing' in LEVEL_TO_ARG else name for name in RAND_TRANSFORMS
)
RAND_CHOICES: dict[str, Sequence[str] | dict[str, float]] = {
    '3a': ('SolarizeIncreasing', 'Desaturate', 'GaussianBlur'),
    '3aw': {
        'SolarizeIncreasing': 6, 'Desaturate': 6, 'GaussianBlur': 6, 'Rotate': 3, 'ShearX': 2, 'ShearY': 2,
        'PosterizeIncreasing': 1, 'AutoContrast': 1, 'ColorIncreasing': 1, 'SharpnessIncreasing': 1,
        'ContrastIncreasing': 1, 'BrightnessIncreasing': 1, 'Equalize': 1, 'Invert': 1,
    },
    'weights': {
        'Rotate': 3, 'ShearX': 2, 'ShearY': 2, 'TranslateXRel': 1, 'TranslateYRel': 1, 'ColorIncreasing': 0.25,
        'SharpnessIncreasing': 0.25, 'AutoContrast': 0.25, 'SolarizeIncreasing': 0.05, 'SolarizeAdd': 0.05,
        'ContrastIncreasing': 0.05, 'BrightnessIncreasing': 0.05, 'Equalize': 0.05, 'PosterizeIncreasing': 0.05,
        'Invert': 0.05,
    },
}  # fmt: skip
AUGMIX_TRANSFORMS = (
    'AutoContrast', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing',
    'Equalize', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
)  # fmt: skip

# AutoAugment's ImageNet policies as (op, probability, magnitude): 'v0' from the TPU EfficientNet
# code, 'original' from the AutoAugment paper; the 'r' variants use the increasing Posterize.
_V0 = (
    (('Equalize', 0.8, 1), ('ShearY', 0.8, 4)), (('Color', 0.4, 9), ('Equalize', 0.6, 3)),
    (('Color', 0.4, 1), ('Rotate', 0.6, 8)), (('Solarize', 0.8, 3), ('Equalize', 0.4, 7)),
    (('Solarize', 0.4, 2), ('Solarize', 0.6, 2)), (('Color', 0.2, 0), ('Equalize', 0.8, 8)),
    (('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)), (('ShearX', 0.2, 9), ('Rotate', 0.6, 8)),
    (('Color', 0.6, 1), ('Equalize', 1.0, 2)), (('Invert', 0.4, 9), ('Rotate', 0.6, 0)),
    (('Equalize', 1.0, 9), ('ShearY', 0.6, 3)), (('Color', 0.4, 7), ('Equalize', 0.6, 0)),
    (('Posterize', 0.4, 6), ('AutoContrast', 0.4, 7)), (('Solarize', 0.6, 8), ('Color', 0.6, 9)),
    (('Solarize', 0.2, 4), ('Rotate', 0.8, 9)), (('Rotate', 1.0, 7), ('TranslateYRel', 0.8, 9)),
    (('ShearX', 0.0, 0), ('Solarize', 0.8, 4)), (('ShearY', 0.8, 0), ('Color', 0.6, 4)),
    (('Color', 1.0, 0), ('Rotate', 0.6, 2)), (('Equalize', 0.8, 4), ('Equalize', 0.0, 8)),
    (('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)), (('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)),
    (('Posterize', 0.8, 2), ('Solarize', 0.6, 10)), (('Solarize', 0.6, 8), ('Equalize', 0.6, 1)),
    (('Color', 0.8, 6), ('Rotate', 0.4, 5)),
)  # fmt: skip
_ORIGINAL = (
    (('PosterizeOriginal', 0.4, 8), ('Rotate', 0.6, 9)), (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)), (('PosterizeOriginal', 0.6, 7), ('PosterizeOriginal', 0.6, 6)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)), (('Equalize', 0.4, 4), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, 7)), (('PosterizeOriginal', 0.8, 5), ('Equalize', 1.0, 2)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)), (('Equalize', 0.6, 8), ('PosterizeOriginal', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)), (('Rotate', 0.4, 9), ('Equalize', 0.6, 2)),
    (('Equalize', 0.0, 7), ('Equalize', 0.8, 8)), (('Invert', 0.6, 4), ('Equalize', 1.0, 8)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)), (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)), (('Sharpness', 0.4, 7), ('Invert', 0.6, 8)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, 9)), (('Color', 0.4, 0), ('Equalize', 0.6, 3)),
    (('Equalize', 0.4, 7), ('Solarize', 0.2, 4)), (('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)),
    (('Invert', 0.6, 4), ('Equalize', 1.0, 8)), (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, 8), ('Equalize', 0.6, 3)),
)  # fmt: skip


def _renamed(policy: tuple, old: str, new: str) -> tuple:
    return tuple(tuple((new if name == old else name, p, m) for name, p, m in sub) for sub in policy)


AUTO_AUGMENT_POLICIES = {
    'v0': _V0,
    'v0r': _renamed(_V0, 'Posterize', 'PosterizeIncreasing'),
    'original': _ORIGINAL,
    'originalr': _renamed(_ORIGINAL, 'PosterizeOriginal', 'PosterizeIncreasing'),
    '3a': ((('Solarize', 1.0, 5),), (('Desaturate', 1.0, 10),), (('GaussianBlurRand', 1.0, 10),)),
}


def _sections(config: str, kind: str) -> list[tuple[str, str]]:
    """The `key<number>` sections after the policy name, as timm splits them (sections without a number skipped)."""
    pairs = []
    for section in config.split('-')[1:]:
        parts = re.split(r'(\d.*)', section)
        if kind == 'rand' and section.startswith('t'):  # the transform set, by name
            pairs.append(('t', section[1:]))
        elif len(parts) >= 2:
            pairs.append((parts[0], parts[1]))
    return pairs


def _unknown(kind: str, key: str, known: str) -> ValueError:
    return ValueError(f'unknown {kind} config section {key!r}; known: {known}')


def rand_augment(config: str, hparams: Hparams) -> RandAugment:
    """timm's `rand_augment_transform`: `rand-m9-n2-p0.5-mstd0.5-mmax10-inc1-tweights`."""
    magnitude, num_layers, increasing, prob, transforms = LEVEL_DENOM, 2, False, 0.5, None
    for key, val in _sections(config, 'rand'):
        if key == 't':
            transforms = transforms or val
        elif key == 'mstd':
            mstd = float(val)
            hparams = replace(hparams, magnitude_std=float('inf') if mstd > 100 else mstd)
        elif key == 'mmax':
            hparams = replace(hparams, magnitude_max=int(val))
        elif key == 'inc':
            increasing = bool(int(val))
        elif key == 'm':
            magnitude = int(val)
        elif key == 'n':
            num_layers = int(val)
        elif key == 'p':
            prob = float(val)
        else:
            raise _unknown('RandAugment', key, 'm, n, p, mstd, mmax, inc, t')
    names = RAND_CHOICES.get(transforms) if transforms else None
    if names is None:
        names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    weights = None
    if isinstance(names, dict):
        total = np.sum(np.array(list(names.values())))
        weights = tuple(float(w) for w in np.array(list(names.values())) / total)
    ops = tuple(AugmentOp(name, prob, magnitude, hparams) for name in names)
    return RandAugment(ops, num_layers, weights)


def augmix(config: str, hparams: Hparams) -> AugMix:
    """timm's `augment_and_mix_transform`: `augmix-m3-w3-d-1-a1-b0-mstd0` (magnitudes uniform unless mstd)."""
    magnitude, width, depth, alpha, blended, mstd = 3, 3, -1, 1.0, False, float('inf')
    for key, val in _sections(config, 'augmix'):
        if key == 'mstd':
            mstd = float(val)
        elif key == 'm':
            magnitude = int(val)
        elif key == 'w':
            width = int(val)
        elif key == 'd':
            depth = int(val)
        elif key == 'a':
            alpha = float(val)
        elif key == 'b':
            blended = bool(int(val))
        else:
            raise _unknown('AugMix', key, 'm, w, d, a, b, mstd')
    hparams = replace(hparams, magnitude_std=mstd)
    return AugMix(
        tuple(AugmentOp(name, 1.0, magnitude, hparams) for name in AUGMIX_TRANSFORMS), alpha, width, depth, blended
    )


def auto_augment(config: str, hparams: Hparams) -> AutoAugment:
    """timm's `auto_augment_transform`: a policy name (`original`, `originalr`, `v0`, `v0r`, `3a`), `-mstd0.5`."""
    name = config.split('-')[0]
    if name not in AUTO_AUGMENT_POLICIES:
        raise ValueError(f'unknown AutoAugment policy {name!r}; choose one of {", ".join(AUTO_AUGMENT_POLICIES)}')
    for key, val in _sections(config, 'aa'):
        if key != 'mstd':
            raise _unknown('AutoAugment', key, 'mstd')
        hparams = replace(hparams, magnitude_std=float(val))
    policy = AUTO_AUGMENT_POLICIES[name]
    return AutoAugment(tuple(tuple(AugmentOp(op, p, m, hparams) for op, p, m in sub) for sub in policy))


def create_policy(config: str, hparams: Hparams) -> Policy:
    """The policy a timm `auto_augment` string names: `rand-...`, `augmix-...`, else an AutoAugment policy."""
    if config.startswith('rand'):
        return rand_augment(config, hparams)
    if config.startswith('augmix'):
        return augmix(config, replace(hparams, translate_pct=0.3))
    return auto_augment(config, hparams)
