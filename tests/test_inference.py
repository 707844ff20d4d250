"""The jitted inference path: folded standardisation, per-backend grouped convs, bfloat16, compilation cache.

Metric: relative error max|a - b| / max|b| against the plain model call (float32, at most
FP32_RTOL = 1e-5), on timm models whose every tensor is randomised first.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from helpers import FP32_RTOL, randomize_, relative_error

import nfnet_jax
from nfnet_jax import inference
from nfnet_jax.factory import from_timm
from nfnet_jax.weights import flat_params

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module', params=['test_nfnet', pytest.param('dm_nfnet_f0', marks=pytest.mark.slow)])
def model(request):
    """A converted timm model with random weights: dm_ (SAME padding, gamma in GELU, SE, groups)."""
    torch.manual_seed(0)
    theirs = timm.create_model(request.param).eval()
    randomize_(theirs, seed=3)
    yield from_timm(theirs)
    gc.collect()


def test_folded_classifier_matches_the_model(model):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 40, 3)), jnp.float32)
    assert relative_error(inference.classifier(model)(x), model(x)) <= FP32_RTOL


def test_embedder_and_feature_extractor_match_the_model():
    torch.manual_seed(0)
    theirs = timm.create_model('test_nfnet').eval()
    randomize_(theirs, seed=4)
    model = from_timm(theirs)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 45, 38, 3)), jnp.float32)
    final, taps = model.forward_intermediates(x)
    pre_logits = model.forward_head(final, pre_logits=True)
    assert relative_error(inference.embedder(model)(x), pre_logits) <= FP32_RTOL
    got = inference.feature_extractor(model, indices=[1, -1])(x)
    assert len(got) == 2
    for ours, expected in zip(got, [taps[1], taps[-1]], strict=True):
        assert relative_error(ours, expected) <= FP32_RTOL


def test_inference_does_not_standardise_per_call_and_leaves_the_model_alone():
    model = nfnet_jax.create_model('test_nfnet')
    classify = inference.classifier(model)
    x = jnp.zeros((1, 32, 32, 3))
    per_call = str(jax.make_jaxpr(classify.apply)(classify.state, x))
    plain = str(jax.make_jaxpr(lambda x: model(x))(x))
    assert 'rsqrt' in plain and 'rsqrt' not in per_call
    conv = model.stages[0][0].conv2
    assert not conv.folded and hasattr(conv, 'gain')  # the training model still standardises per call
    folded = inference.inference_model(model).stages[0][0].conv2
    assert folded.folded and not hasattr(folded, 'gain')
    np.testing.assert_array_equal(folded.kernel[...], conv.standardized_kernel())


def test_bfloat16_compute_from_float32_params():
    """bfloat16 activations from float32 params: the inference state holds them cast once (the program converts
    no weight); logits close to float32 on random weights, and bit-equal to casting on every call."""
    torch.manual_seed(0)
    theirs = timm.create_model('test_nfnet').eval()
    randomize_(theirs, seed=5)
    fp32 = from_timm(theirs)
    bf16 = nfnet_jax.create_model('test_nfnet', params=flat_params(fp32), dtype=jnp.bfloat16)
    classify = inference.classifier(bf16)
    assert {leaf.dtype for leaf in jax.tree.leaves(classify.state)} == {jnp.dtype(jnp.bfloat16)}
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.float32)}  # untouched
    x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 64, 64, 3)), jnp.float32)
    lowered = jax.jit(classify.apply).lower(classify.state, x).as_text()
    assert len(re.findall(r'stablehlo.convert %arg', lowered)) == 1  # the images only
    # Casting on every call gives the same numbers once XLA may not skip a float32 -> bfloat16 -> float32 round trip.
    graphdef, per_call = nnx.split(inference.inference_model(bf16))
    exact = {'xla_allow_excess_precision': False}
    expected = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x), compiler_options=exact)(per_call, x)
    np.testing.assert_array_equal(jax.jit(classify.apply, compiler_options=exact)(classify.state, x), expected)
    features = inference.compile_forward(bf16, lambda m, x: m.forward_features(x))(x)
    assert features.dtype == jnp.bfloat16
    logits, reference = classify(x), inference.classifier(fp32)(x)
    assert relative_error(logits, reference) < 0.05  # bfloat16 has an 8-bit mantissa: ~0.4% per rounding
    assert np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)) >= 0.75


@pytest.mark.slow
def test_compilation_cache_is_written_then_reused_by_a_second_process(tmp_path):
    """Two fresh processes on one cache folder: the first writes entries, the second loads them."""
    command = [sys.executable, '-m', 'benchmarks.cold_start', '--child', '--model', 'test_nfnet']
    command += ['--batch', '1', '--size', '32', '--cache', str(tmp_path)]
    first = json.loads(subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries and first['cache_hits'] == 0
    second = json.loads(subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert second['cache_hits'] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # read, nothing recompiled and written
