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

import random
import types

import numpy as np
import PIL.ImageOps
import pytest
import scipy.stats
import skimage.data
import timm.data
import timm.data.auto_augment as timm_aa
import timm.data.random_erasing
import timm.data.transforms
import torch
import torchvision.transforms
from PIL import Image

from nfnet_jax import data
from nfnet_jax.data import augment
from nfnet_jax.data import auto_augment as aa

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
    dict(hflip=0.0, color_jitter=0.2, color_jitter_prob=0.5, grayscale_prob=0.3, re_prob=0.7, re_count=2),
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


def ks(ours, theirs) -> float:
    return float(scipy.stats.ks_2samp(np.asarray(ours, np.float64), np.asarray(theirs, np.float64)).statistic)


@pytest.mark.parametrize('height,width', [(300, 200), (40, 300)], ids=['tall', 'wide'])
def test_crop_box_distribution_equals_timms(height, width):
    """Area fraction, log aspect ratio and position of the box; the wide image falls back to the center often."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    rng, image = np.random.default_rng(0), Image.new('RGB', (width, height))
    random.seed(0)
    ours = np.array([augment.random_resized_crop_box(rng, height, width, scale, ratio) for _ in range(N_DRAWS)])
    theirs = np.array(
        [timm.data.transforms.RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(N_DRAWS)]
    )
    for stats in (
        lambda b: b[:, 2] * b[:, 3] / (height * width),  # area fraction
        lambda b: np.log(b[:, 3] / b[:, 2]),  # log aspect ratio
        lambda b: (b[:, 0] + b[:, 2] / 2) / height,  # box center, vertical
        lambda b: (b[:, 1] + b[:, 3] / 2) / width,  # box center, horizontal
    ):
        assert ks(stats(ours), stats(theirs)) < KS_MAX
    assert np.all(ours[:, 0] + ours[:, 2] <= height) and np.all(ours[:, 1] + ours[:, 3] <= width)


def test_flip_jitter_and_erasing_draws_match_timms_distributions():
    transform = data.create_transform(
        32, is_training=True, hflip=0.5, vflip=0.3, color_jitter=(0.4, 0.3, 0.2, 0.1), re_prob=0.5
    )
    rng = np.random.default_rng(0)
    ours = [transform.sample_params(rng, 32, 32) for _ in range(N_DRAWS)]
    torch.manual_seed(0)
    random.seed(0)
    pixel = Image.fromarray(np.array([[[0] * 3, [255] * 3]], np.uint8))  # 1x2: flipping moves the white pixel
    hflip, vflip = torchvision.transforms.RandomHorizontalFlip(0.5), torchvision.transforms.RandomVerticalFlip(0.3)
    their_hflips = [np.asarray(hflip(pixel))[0, 0, 0] == 255 for _ in range(N_DRAWS)]
    their_vflips = [
        np.asarray(vflip(pixel.transpose(Image.Transpose.TRANSPOSE)))[0, 0, 0] == 255 for _ in range(N_DRAWS)
    ]
    # binomial rates of 2000 draws: the difference of two has sd <= 0.016; 0.05 is > 3 sd
    assert abs(np.mean([p['hflip'] for p in ours]) - np.mean(their_hflips)) < 0.05
    assert abs(np.mean([p['vflip'] for p in ours]) - np.mean(their_vflips)) < 0.05
    jitter = torchvision.transforms.ColorJitter(0.4, 0.3, 0.2, 0.1)
    theirs = [
        jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(N_DRAWS)
    ]
    for i in range(4):
        assert ks([p['color_jitter'][1][i] for p in ours], [t[i + 1] for t in theirs]) < KS_MAX
    first_ours = np.bincount([p['color_jitter'][0][0] for p in ours], minlength=4)
    first_theirs = np.bincount([int(t[0][0]) for t in theirs], minlength=4)
    assert scipy.stats.chi2_contingency([first_ours, first_theirs]).pvalue > 1e-3
    # timm's erasing on a tensor of ones: the zeros are the box ('const' mode)
    erasing = timm.data.random_erasing.RandomErasing(0.5, mode='const', device='cpu')
    their_boxes = []
    for _ in range(N_DRAWS):
        erased = erasing(torch.ones(3, 32, 32))[0].numpy() == 0
        rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        their_boxes.append((rows[0], cols[0], len(rows), len(cols)) if len(rows) else None)
    our_boxes = [p['erasing'][0][:4] if p['erasing'] else None for p in ours]
    assert abs(np.mean([b is None for b in our_boxes]) - np.mean([b is None for b in their_boxes])) < 0.05
    our_boxes, their_boxes = (np.array([b for b in boxes if b]) for boxes in (our_boxes, their_boxes))
    for stats in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 2] / b[:, 3], lambda b: b[:, 0], lambda b: b[:, 1]):
        assert ks(stats(our_boxes), stats(their_boxes)) < 2 * KS_MAX  # ~1000 boxes each: the critical value doubles


def timm_op_log(policy) -> list:
    """Make timm's ops record (name, args) instead of changing the image; returns the log they append to."""
    log = []
    ops = [op for sub in policy.policy for op in sub] if hasattr(policy, 'policy') else policy.ops
    for op in ops:
        op.aug_fn = lambda img, *args, _name=op.name, **_: log.append((_name, args)) or img
    return log


def flat(draws) -> list:
    if isinstance(draws, dict):  # AugMix: its chains
        return [d for chain in draws['chains'] for d in chain if d is not None]
    return [d for d in draws if d is not None]


@pytest.mark.parametrize('config', ['rand-m9-mstd0.5-inc1', 'rand-m7-n3-tweights', 'original', 'augmix-m5'])
def test_policy_op_frequencies_and_magnitudes_match_timms(config):
    """Which ops run (chi-square of the counts) and their arguments (KS per op with >= 100 runs each), p > 0.001."""
    ours_policy = data.create_transform(224, is_training=True, auto_augment=config).policy
    theirs_policy = timm.data.create_transform(224, is_training=True, auto_augment=config).transforms[2]
    assert type(theirs_policy).__name__ == type(ours_policy).__name__.replace('AugMix', 'AugMixAugment')
    log, image = timm_op_log(theirs_policy), Image.new('RGB', (4, 4))
    random.seed(0)
    np.random.seed(0)
    for _ in range(N_DRAWS):
        theirs_policy(image)
    rng = np.random.default_rng(0)
    ours = [(name, args) for _ in range(N_DRAWS) for name, args, _ in flat(ours_policy.sample(rng))]
    names = sorted({name for name, _ in ours + log})
    counts = [[sum(n == name for n, _ in runs) for name in names] for runs in (ours, log)]
    assert abs(len(ours) - len(log)) / len(log) < 0.05
    assert scipy.stats.chi2_contingency(counts).pvalue > 1e-3
    for name in names:
        our_args = [args[0] for n, args in ours if n == name and args]
        their_args = [args[0] for n, args in log if n == name and args]
        if min(len(our_args), len(their_args)) >= 100:
            assert scipy.stats.ks_2samp(our_args, their_args, method='asymp').pvalue > 1e-3, name


@pytest.mark.parametrize('input_size,interpolation', [(40, 'random'), ((3, 40, 40), 'bicubic'), ((32, 56), 'bilinear')])
def test_no_aug_train_transform_equals_timms(input_size, interpolation):
    """timm's no_aug training transform: an int resizes the short side, a (C, )H, W size squashes."""
    options = dict(is_training=True, no_aug=True, interpolation=interpolation)
    ours, theirs = data.create_transform(input_size, **options), timm.data.create_transform(input_size, **options)
    for photo in photos():
        expected = theirs(photo).numpy().transpose(1, 2, 0)
        got = ours(photo)
        assert got.shape == expected.shape and np.max(np.abs(got - expected)) == 0, photo.size
