"""Mixup / CutMix and the soft-target loss against timm's `Mixup` and `SoftTargetCrossEntropy`.

Parity: our draws (uniforms, Betas, box integers, from a JAX key) are replayed through timm's
`np.random` calls, in the order timm makes them, so timm mixes with the same lambdas and boxes.
Metric: max|ours - timm| over images and targets, required <= 1e-6 (float32 lambdas against
timm's float64 ones: a few ulps). Distributions: 2000 lambdas, two-sample KS statistic < 0.062.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import timm.data.mixup
import timm.loss
import torch

from nfnet_jax.train import Mixup, soft_target_cross_entropy

ATOL = 1e-6
KS_MAX = 0.062  # two-sample KS critical value at p = 0.001 for 2000 + 2000 samples


class Replay:
    """numpy's legacy rand / beta / randint, returning queued values in call order (one queue per call)."""

    def __init__(self, rand: list, beta: list, randint: list):
        self.queues = dict(rand=list(rand), beta=list(beta), randint=list(randint))

    def rand(self, *_):
        return self.queues['rand'].pop(0)

    def beta(self, *_, **__):
        return self.queues['beta'].pop(0)

    def randint(self, *_, **__):
        return self.queues['randint'].pop(0)


def timm_replay(mixup: Mixup, draws: dict) -> Replay:
    """Our draws in the order timm's Mixup asks for them, per batch or per element."""
    d = {k: np.asarray(v).astype(np.float64 if v.dtype.kind == 'f' else np.int64) for k, v in draws.items()}
    both = mixup.mixup_alpha > 0 and mixup.cutmix_alpha > 0
    use_cutmix = np.asarray(mixup.use_cutmix(draws))
    lam = np.where(d['u_prob'] < mixup.prob, np.where(use_cutmix, d['lam_cutmix'], d['lam_mixup']), 1.0)
    box_keys = ('cy', 'cx') if mixup.cutmix_minmax is None else ('cut_h', 'cut_w', 'yl', 'xl')
    boxes = [int(d[k][i]) for i in range(len(lam)) if lam[i] != 1 and use_cutmix[i] for k in box_keys]
    if mixup.mode == 'batch':
        rand = [d['u_prob'][0]] + ([d['u_switch'][0]] if both else [])
        beta = [d['lam_cutmix'][0] if use_cutmix[0] else d['lam_mixup'][0]]
        return Replay(rand, beta, boxes)
    rand = ([d['u_switch']] if both else []) + [d['u_prob']]
    beta = ([d['lam_cutmix']] if mixup.cutmix_alpha > 0 else []) + ([d['lam_mixup']] if mixup.mixup_alpha > 0 else [])
    return Replay(rand, beta, boxes)


CONFIGS = [
    dict(mixup_alpha=0.8),  # timm's defaults otherwise: per batch, label smoothing 0.1
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3, mode='elem'),
    dict(mixup_alpha=0.2, cutmix_alpha=1.0, mode='pair', correct_lam=False),
    dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8), mode='elem'),  # CutMix only
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, mode='elem', multi_label=True),  # dense 0/1 targets
]


@pytest.mark.parametrize('config', CONFIGS, ids=str)
def test_mixup_equals_timms_for_the_same_draws(config, monkeypatch, record_property):
    config = dict(num_classes=7, **config)
    mixup, theirs = Mixup(**config), timm.data.mixup.Mixup(**config)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 24, 20, 3)).astype(np.float32)  # H != W: a swapped axis shows
    labels = rng.integers(0, 7, 6)
    if mixup.multi_label:
        labels = (rng.random((6, 7)) < 0.3).astype(np.int64)
    mixed_ever = cut_ever = False
    worst = [0.0, 0.0]
    sample, apply = jax.jit(mixup.sample, static_argnums=(1, 2, 3)), jax.jit(mixup.apply)
    for seed in range(12):
        draws = sample(jax.random.key(seed), *images.shape[:3])
        got_images, got_targets = apply(draws, images, labels)
        monkeypatch.setattr(
            timm.data.mixup, 'np', types.SimpleNamespace(**{**vars(np), 'random': timm_replay(mixup, draws)})
        )
        x, target = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
        errors = (
            float(np.max(np.abs(np.asarray(got_images) - x.numpy().transpose(0, 2, 3, 1)))),
            float(np.max(np.abs(np.asarray(got_targets) - target.numpy()))),
        )
        assert max(errors) <= ATOL, (seed, errors)
        worst = [max(w, e) for w, e in zip(worst, errors, strict=True)]
        changed = np.any(np.asarray(got_images) != images, axis=(1, 2, 3))
        mixed_ever |= bool(changed.any())
        cut_ever |= bool(np.any(np.asarray(got_images) == images[::-1]) and changed.any())
    assert mixed_ever and cut_ever == (mixup.cutmix_alpha > 0)  # the draws exercised the configured branches
    record_property('figure', (f'Mixup {config}: images, max abs diff', worst[0]))
    record_property('figure', (f'Mixup {config}: targets, max abs diff', worst[1]))


def test_mixup_is_jittable_and_targets_are_distributions():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode='elem', num_classes=5)
    images, labels = jnp.ones((4, 8, 8, 3)) * jnp.arange(4.0)[:, None, None, None], jnp.array([0, 1, 2, 3])
    key = jax.random.key(3)
    got_images, targets = jax.jit(mixup)(key, images, labels)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    assert targets.dtype == jnp.float32 and got_images.shape == images.shape
    with pytest.raises(ValueError, match='even'):
        mixup.sample(key, 3, 8, 8)
    with pytest.raises(ValueError, match='elem'):
        Mixup(mode='row')


def test_lambda_and_box_distributions_match_timms():
    """Per-image lambdas (mixup and cutmix) and the CutMix box area at lambda 0.6 over 2000 draws."""
    config = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, mode='elem')
    mixup, theirs = Mixup(**config), timm.data.mixup.Mixup(**config)
    draws = jax.jit(mixup.sample, static_argnums=(1, 2, 3))(jax.random.key(0), 2000, 32, 32)
    use_cutmix = np.asarray(mixup.use_cutmix(draws))
    lam = np.where(draws['u_prob'] < 0.7, np.where(use_cutmix, draws['lam_cutmix'], draws['lam_mixup']), 1.0)
    np.random.seed(0)
    their_lam, their_cutmix = theirs._params_per_elem(2000)
    assert scipy.stats.ks_2samp(lam, their_lam).statistic < KS_MAX
    assert abs(use_cutmix.mean() - their_cutmix.mean()) < 0.05  # binomial sd of the difference 0.016
    fixed = jnp.full(2000, 0.6)
    yl, yh, xl, xh = (np.asarray(v) for v in jax.jit(mixup.box, static_argnums=(2, 3))(draws, fixed, 32, 32))
    their_box = timm.data.mixup.rand_bbox((32, 32), 0.6, count=2000)
    their_area = (their_box[1] - their_box[0]) * (their_box[3] - their_box[2])
    assert scipy.stats.ks_2samp((yh - yl) * (xh - xl), their_area).statistic < KS_MAX


def test_soft_target_cross_entropy_equals_timms():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((8, 10)).astype(np.float32) * 4
    targets = rng.dirichlet(np.ones(10), 8).astype(np.float32)
    expected = timm.loss.SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    got = float(soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    assert abs(got - expected) <= 1e-6 * abs(expected)
    got_bf16 = float(soft_target_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets)))
    assert abs(got_bf16 - expected) < 0.05 * abs(expected)  # the logits rounded to bf16, the loss in float32
