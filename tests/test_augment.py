"""Training transforms against timm's `create_transform(..., is_training=True)` on real photographs.

Parity: timm's random sources (Python's `random` in its crop, auto-augment and erasing code, numpy's
legacy `np.random` in RandAugment and AugMix, torch's RNG in the flips, ColorJitter and the erasing
noise) are replaced by adapters over one seeded `numpy.random.Generator`, drawing as our code draws
(`random.uniform(a, b)` is `rng.uniform(a, b)`, `random.randint(a, b)` is `rng.integers(a, b + 1)`,
...). Then timm's transform and ours, fed generators with the same seed, must make the same draws in
the same order and give the same image: metric max|ours - timm|, required 0 (the same PIL calls,
the same float32 arithmetic). Distributions: our draws against timm's own, unpatched RNGs, 2000
draws each, compared with a two-sample Kolmogorov-Smirnov statistic below 0.062 (its 0.1% critical
value for 2000 + 2000 samples) or a chi-square test of frequencies with p > 0.001.
"""

from __future__ import annotations

import types

import numpy as np
import PIL.ImageOps
import pytest
import skimage.data
import timm.data
import timm.data.auto_augment as timm_aa
import timm.data.random_erasing
import timm.data.transforms
import torch
import torchvision.transforms
from PIL import Image

from nfnet_jax import auto_augment as aa
from nfnet_jax import data

KS_MAX = 0.062  # two-sample KS critical value at p = 0.001 for n = m = 2000: 1.95 * sqrt(2 / 2000)
N_DRAWS = 2000


def photos() -> list[Image.Image]:
    """Real photos, scaled down to keep the tests fast, one of them tall and one very wide (crop fallback)."""
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((160, 160))
    coffee = Image.fromarray(skimage.data.coffee()).resize((150, 100))
    chelsea = Image.fromarray(skimage.data.chelsea()).crop((100, 0, 190, 300))
    rocket = Image.fromarray(skimage.data.rocket()).resize((300, 40))
    return [astronaut, coffee, chelsea, rocket]


class PythonRandom:
    """Python's `random` API over a Generator, drawing as nfnet_jax.augment draws."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def random(self) -> float:
        return self.rng.random()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.rng.random()  # Python's formula; numpy's rng.uniform is the same but refuses b < a

    def randint(self, a: int, b: int) -> int:
        return self.rng.integers(a, b + 1)

    def gauss(self, mu: float, sigma: float) -> float:
        return self.rng.normal(mu, sigma)

    def choice(self, seq):
        return seq[self.rng.integers(len(seq))]


class NumpyRandom:
    """numpy's legacy `np.random` calls of timm's auto_augment, over a Generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def choice(self, a, size=None, replace=True, p=None):
        return self.rng.choice(a, size, replace=replace, p=p)

    def randint(self, low: int, high: int):
        return self.rng.integers(low, high)

    def dirichlet(self, alpha):
        return self.rng.dirichlet(alpha)

    def beta(self, a: float, b: float):
        return self.rng.beta(a, b)


def replay_draws(rng: np.random.Generator, monkeypatch) -> None:
    """Route every draw of timm's training transform through `rng`, and let its Posterize keep 0 bits."""
    posterize = PIL.ImageOps.posterize
    monkeypatch.setattr(
        PIL.ImageOps, 'posterize', lambda im, bits: Image.new(im.mode, im.size) if bits == 0 else posterize(im, bits)
    )
    for module in (timm.data.transforms, timm_aa, timm.data.random_erasing):
        monkeypatch.setattr(module, 'random', PythonRandom(rng))
    monkeypatch.setattr(timm_aa, 'np', types.SimpleNamespace(**{**vars(np), 'random': NumpyRandom(rng)}))
    # torchvision's flips draw `torch.rand(1) < p`; ColorJitter its order and then its factors.
    monkeypatch.setattr(torch, 'rand', lambda *_, **__: torch.tensor([rng.random()]))

    def jitter_params(*ranges):
        order = torch.as_tensor(rng.permutation(4))
        return (order, *(None if r is None else float(rng.uniform(*r)) for r in ranges))

    monkeypatch.setattr(torchvision.transforms.ColorJitter, 'get_params', staticmethod(jitter_params))

    def erase_pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device='cpu'):
        if per_pixel:
            return torch.from_numpy(rng.standard_normal(patch_size, dtype=np.float32))
        if rand_color:
            return torch.from_numpy(rng.standard_normal((patch_size[0], 1, 1), dtype=np.float32))
        return torch.zeros((patch_size[0], 1, 1), dtype=dtype)

    monkeypatch.setattr(timm.data.random_erasing, '_get_pixels', erase_pixels)


TRAIN_CONFIGS = [
    dict(),  # timm's create_transform defaults: bilinear, hflip 0.5, jitter 0.4
    dict(
        interpolation='random', vflip=0.5, color_jitter=(0.4, 0.3, 0.2, 0.1), re_prob=1.0, re_count=3, re_mode='pixel'
    ),
    dict(interpolation='bicubic', auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.5, re_mode='rand'),
    dict(interpolation='random', auto_augment='rand-m7-n3-p0.9-mstd101-mmax12', scale=(0.5, 1.0), ratio=(0.5, 2.0)),
    dict(interpolation='random', auto_augment='rand-tweights'),
    dict(auto_augment='rand-t3aw-m9-mstd0.5'),
    dict(interpolation='random', auto_augment='original-mstd0.5'),
    dict(interpolation='bicubic', auto_augment='v0r'),
    dict(interpolation='random', auto_augment='augmix-m5-w4-d2'),
    dict(interpolation='bilinear', auto_augment='augmix-m3-mstd0.5-b1'),
    dict(interpolation='random', auto_augment='3a', color_jitter=0.3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
]


@pytest.mark.parametrize('config', TRAIN_CONFIGS, ids=str)
def test_train_transform_equals_timms_given_the_same_draws(config, monkeypatch):
    size = (64, 48)
    ours = data.create_transform(size, is_training=True, **config)
    theirs = timm.data.create_transform(size, is_training=True, **config)
    for seed, photo in enumerate(photos() * 3):
        their_rng, our_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        with monkeypatch.context() as patch:
            replay_draws(their_rng, patch)
            expected = theirs(photo).numpy().transpose(1, 2, 0)
        got = ours(photo, our_rng)
        assert got.dtype == np.float32 and got.shape == expected.shape == (*size, 3)
        assert np.max(np.abs(got - expected)) == 0, (seed, photo.size)
        assert their_rng.random() == our_rng.random(), 'the two made a different number of draws'


@pytest.mark.parametrize('magnitude', [0, 3, 7.5, 10])
def test_every_auto_augment_op_equals_timms(magnitude, monkeypatch, record_property):
    """Each of timm's 27 ops at one magnitude, its random sign and interpolation replayed, on every photo."""
    hparams = dict(translate_const=70, img_mean=(124, 116, 104))
    worst = 0.0
    for name in aa.LEVEL_TO_ARG:
        op = aa.AugmentOp(name, 1.0, magnitude, aa.Hparams(**hparams))
        timm_op = timm_aa.AugmentOp(name, 1.0, magnitude, hparams=hparams)
        for seed, photo in enumerate(photos()):
            draw = op.sample(np.random.default_rng(seed))
            with monkeypatch.context() as patch:
                replay_draws(np.random.default_rng(seed), patch)
                expected = np.asarray(timm_op(photo), np.float32)
            got = np.asarray(aa.apply_op(photo, draw, op.hparams.img_mean), np.float32)
            worst = max(worst, float(np.max(np.abs(got - expected))))
            assert np.array_equal(got, expected), (name, seed)
    record_property('figure', (f'auto-augment ops at magnitude {magnitude}, max abs diff (0-255)', worst))


def test_posterize_to_zero_bits_is_black_where_timm_raises():
    """At 0 bits timm 1.0.31 on Pillow 13 raises (AutoAugment v0's ('Posterize', 0.8, 2)); we give a black image."""
    photo = photos()[0]
    draw = aa.AugmentOp('Posterize', 1.0, 2).sample(np.random.default_rng(0))
    assert draw == ('Posterize', (0,), None)
    assert not np.any(np.asarray(aa.apply_op(photo, draw, (0, 0, 0))))
    with pytest.raises(ValueError, match='bits'):
        timm_aa.AugmentOp('Posterize', 1.0, 2)(photo)
