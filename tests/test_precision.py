"""The conv/matmul precision setting (`create_model(..., precision=)`) reaches every conv and dot of the program.

Checked on the StableHLO that `jax.export` lowers for cpu, cuda and tpu (no GPU or TPU was
available: the programs are lowered, not run there), and by running on CPU, where XLA computes
float32 convs and matmuls in full float32 whatever the setting.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import random_params

import nfnet_jax
from nfnet_jax import inference
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.weights.params import flat_params

CONV_OR_DOT = re.compile(r'stablehlo\.(convolution|dot_general)')


def lowered_precisions(model: NormFreeNet, platform: str) -> list[tuple[str, ...]]:
    """The operand precisions of every conv and dot_general in the model's lowering for `platform` (() if unset).

    StableHLO prints a conv's as `precision_config = [#stablehlo<precision HIGH>, ...]` and a
    dot_general's as `precision = [HIGH, HIGH]`.
    """
    text = inference.classifier(model).export((1, 32, 32, 3), platforms=[platform]).mlir_module()
    found = []
    for line in text.splitlines():
        if CONV_OR_DOT.search(line):
            config = re.search(r'precision(?:_config)? = \[([^\]]*)\]', line)
            found.append(tuple(re.findall(r'\b(DEFAULT|HIGHEST|HIGH)\b', config.group(1))) if config else ())
    return found


@pytest.mark.parametrize(
    'precision,attn,expected',
    [
        ('highest', 'se', 'HIGHEST'),
        ('high', 'se', 'HIGH'),
        ('high', 'eca', 'HIGH'),
        # conftest pins jax_default_matmul_precision='highest': None follows it.
        (None, 'se', 'HIGHEST'),
        # An explicit 'default' is the platform's fastest mode, whatever jax_default_matmul_precision says.
        ('default', 'se', None),
    ],
)
def test_precision_reaches_every_conv_and_matmul_on_every_platform(precision, attn, expected):
    """Stem, block and final convs (grouped, 1x1 as matmuls on CPU), squeeze-excite or ECA, and the classifier."""
    overrides = {} if attn == 'se' else dict(attn_layer='eca', attn_kwargs={})
    model = nfnet_jax.create_model('test_nfnet', precision=precision, **overrides)
    for platform in ('cpu', 'cuda', 'tpu'):
        found = lowered_precisions(model, platform)
        assert len(found) >= 20, platform
        if expected is None:
            assert set(found) <= {(), ('DEFAULT', 'DEFAULT')}, platform
        else:
            assert set(found) == {(expected, expected)}, platform


def test_precision_is_checked_and_changes_nothing_on_cpu():
    """XLA:CPU computes float32 convs and matmuls in full float32 whatever the precision: the same logits."""
    with pytest.raises(ValueError, match='unknown precision'):
        nfnet_jax.create_model('test_nfnet', precision='fastest')
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    params = random_params(flat_params(nfnet_jax.create_model('test_nfnet')))
    # conftest pins jax_default_matmul_precision='highest', so None is 'highest' here.
    default, highest = (
        inference.classifier(nfnet_jax.create_model('test_nfnet', params=params, precision=p))(x)
        for p in ('default', 'highest')
    )
    np.testing.assert_array_equal(default, highest)
