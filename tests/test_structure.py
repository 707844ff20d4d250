"""Structure against timm for all 36 architectures: names, shapes, parameter counts, feature info.

timm builds its models on the meta device here: shapes without memory or init time.
"""

from __future__ import annotations

import pytest
import timm
from helpers import ONE_PER_CONFIG

import nfnet_jax
from nfnet_jax.models.nfnet import abstract_model
from nfnet_jax.weights import expected_timm_shapes, param_shapes
from nfnet_jax.weights.table import flax_rule, timm_rule

ARCHITECTURES = nfnet_jax.list_models()


@pytest.mark.parametrize(
    'name', [pytest.param(n, marks=[] if n in ONE_PER_CONFIG else [pytest.mark.slow]) for n in ARCHITECTURES]
)
def test_state_dict_keys_shapes_and_param_count_equal_timms(name):
    theirs = timm.create_model(name, device='meta')
    timm_shapes = {key: tuple(value.shape) for key, value in theirs.state_dict().items()}
    assert expected_timm_shapes(name) == timm_shapes
    ours = abstract_model(nfnet_jax.model_cfgs[name])
    assert nfnet_jax.count_params(ours) == sum(p.numel() for p in theirs.parameters())
    assert ours.feature_info == theirs.feature_info
    assert ours.num_features == theirs.num_features
    # Every key goes through exactly one rule, both ways (a second match raises).
    for key in timm_shapes:
        path, _ = timm_rule(key)
        assert flax_rule(path)[0] == key
    assert len(param_shapes(ours)) == len(timm_shapes)


def test_dm_nfnet_f0_param_count():
    assert nfnet_jax.count_params(abstract_model(nfnet_jax.model_cfgs['dm_nfnet_f0'])) == 71_489_284


@pytest.mark.parametrize('global_pool,num_classes', [('catavgmax', 10), ('max', 0), ('', 0), ('avgmax', 5)])
def test_head_variants_equal_timms(global_pool, num_classes):
    theirs = timm.create_model('test_nfnet', device='meta', global_pool=global_pool, num_classes=num_classes)
    timm_shapes = {key: tuple(value.shape) for key, value in theirs.state_dict().items()}
    assert expected_timm_shapes('test_nfnet', global_pool=global_pool, num_classes=num_classes) == timm_shapes
    ours = abstract_model(nfnet_jax.model_cfgs['test_nfnet'], global_pool=global_pool, num_classes=num_classes)
    assert ours.head_hidden_size == theirs.head_hidden_size
