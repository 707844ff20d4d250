"""Every architecture against timm 1.0.31 with every tensor randomised, fp32.

Metric: max|ours - timm| / max|timm| over the whole tensor, at most 1e-5 (FP32_RTOL), for
the logits, the pooled pre-logits, forward_features and the five feature taps, at an odd
non-square size, batch 2; and at a square size (timm's 'same' padding differs on even sizes) for
one architecture of each config helper and stem: the larger ones of a family run the same layers
at the same spatial sizes, only deeper and wider.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import timm
import torch
from helpers import FP32_RTOL, ONE_PER_CONFIG, nchw, nhwc, randomize_, relative_error

import nfnet_jax
from nfnet_jax.factory import from_timm

ARCHITECTURES = nfnet_jax.list_models()
ODD_SIZE, SQUARE_SIZE = (67, 53), (64, 64)
CASES = [  # each architecture's cases in a row: its timm model is built once for them
    (name, size)
    for name in ARCHITECTURES
    for size in (ODD_SIZE, SQUARE_SIZE)
    if size == ODD_SIZE or name in ONE_PER_CONFIG
]
# The fast tier (-m "not slow") keeps the square size of one architecture per config helper and stem.
PARAMS = [
    pytest.param(name, size, id=f'{name}-{size[0]}x{size[1]}', marks=[pytest.mark.slow] if size == ODD_SIZE else [])
    for name, size in CASES
]


def test_the_family_is_timms():
    assert len(ARCHITECTURES) == 36
    assert set(ARCHITECTURES) == set(timm.list_models('*nf*')) - {'convnext_tiny_hnf'}


@pytest.fixture(scope='module')
def pair(request):
    """(timm model with random weights, the nfnet_jax model converted from it)."""
    torch.manual_seed(0)
    theirs = timm.create_model(request.param).eval()
    randomize_(theirs, seed=len(request.param))
    ours = from_timm(theirs)
    yield theirs, ours
    del theirs, ours
    gc.collect()


def tap_name(index: int, info: dict) -> str:
    return f'tap {index} ({info["module"]})'


@pytest.mark.parametrize(('pair', 'size'), PARAMS, indirect=['pair'])
def test_matches_timm(pair, size, record_property):
    theirs, ours = pair
    x = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    with torch.no_grad():
        final, taps = theirs.forward_intermediates(nchw(x))
        expected = {
            'logits': theirs.forward_head(final).numpy(),
            'pre_logits': theirs.forward_head(final, pre_logits=True).numpy(),
            'forward_features': nhwc(final),
        }
        expected |= {
            f'tap {i} ({info["module"]})': nhwc(t)
            for i, (info, t) in enumerate(zip(theirs.feature_info, taps, strict=True))
        }

    our_final, our_taps = ours.forward_intermediates(x)
    got = {
        'logits': ours(x),
        'pre_logits': ours.forward_head(our_final, pre_logits=True),
        'forward_features': our_final,
    }
    got |= {
        f'tap {i} ({info["module"]})': t for i, (info, t) in enumerate(zip(ours.feature_info, our_taps, strict=True))
    }

    assert got.keys() == expected.keys()
    errors = {name: relative_error(got[name], expected[name]) for name in expected}
    record_property('parity', (theirs.pretrained_cfg['architecture'], size, max(errors.values())))
    assert max(errors.values()) <= FP32_RTOL, errors
