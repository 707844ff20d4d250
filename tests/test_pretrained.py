"""Pretrained weights through a staged hub cache, feature maps, embeddings and head swaps, against timm.

The hub cache holds timm's test_nfnet.r160_in1k with every tensor randomised; both timm and
nfnet_jax load it through the real huggingface_hub client, offline. Metric: relative error
max|ours - timm| / max|timm| <= FP32_RTOL (1e-5), float32, 2 images of 64x64 (and 67x53).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from flax import nnx
from helpers import FP32_RTOL, nchw, nhwc, relative_error

import nfnet_jax
from convert.from_timm import main as convert_main
from nfnet_jax.models.features import FeatureListNet
from nfnet_jax.models.nfnet import abstract_model
from nfnet_jax.weights import CheckpointError, flat_params, param_shapes

TAG = 'test_nfnet.r160_in1k'


@pytest.fixture(scope='module')
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)


def timm_model(**kwargs) -> torch.nn.Module:
    return timm.create_model(TAG, pretrained=True, **kwargs).eval()


def run_timm(model: torch.nn.Module, x: np.ndarray, method: str = 'forward', **kwargs):
    with torch.no_grad():
        return getattr(model, method)(nchw(x), **kwargs)


def test_pretrained_logits_match_timm_loading_the_same_hub_cache(offline_hub, images):
    ours = nfnet_jax.create_model(TAG, pretrained=True)
    assert ours.pretrained_cfg == nfnet_jax.pretrained_cfgs[TAG]
    assert relative_error(ours(images), run_timm(timm_model(), images)) <= FP32_RTOL


def test_bare_architecture_name_loads_the_default_tag(offline_hub, images):
    ours = nfnet_jax.create_model('test_nfnet', pretrained=True)
    assert ours.pretrained_cfg.name == TAG
    assert relative_error(ours(images), run_timm(timm_model(), images)) <= FP32_RTOL


def load(source: str, path, **kwargs) -> nfnet_jax.NormFreeNet:
    """The tag's weights through each way of loading them: the hub, a converted file by name, or by path alone."""
    if source == 'pretrained':
        return nfnet_jax.create_model(TAG, pretrained=True, **kwargs)
    if not path.exists():
        model = nfnet_jax.create_model(TAG, pretrained=True)
        nfnet_jax.save_checkpoint(
            path, flat_params(model), architecture='test_nfnet', num_classes=1000, global_pool='avg'
        )
    if source == 'checkpoint_path':
        return nfnet_jax.create_model('test_nfnet', checkpoint_path=path, **kwargs)
    return nfnet_jax.load_checkpoint(path, **kwargs)


@pytest.mark.parametrize('source', ['pretrained', 'checkpoint_path', 'load_checkpoint'])
@pytest.mark.parametrize('num_classes,global_pool,in_chans', [(10, 'avg', 3), (1000, 'catavgmax', 3), (0, 'avg', 1)])
def test_new_head_or_input_channels_keep_the_backbone(
    offline_hub, tmp_path, source, num_classes, global_pool, in_chans
):
    """As timm: a head that does not fit the checkpoint is fresh; in_chans != 3 adapts the first conv.

    The same from the hub and from a converted file (timm's `pretrained_cfg_overlay=dict(file=...)`).
    """
    x = np.random.default_rng(1).standard_normal((2, 67, 53, in_chans)).astype(np.float32)
    # timm cannot load a 1000-class checkpoint under catavgmax: its reference here has no classifier.
    theirs = timm_model(num_classes=0, global_pool=global_pool, in_chans=in_chans)
    ours = load(source, tmp_path / 'f.safetensors', num_classes=num_classes, global_pool=global_pool, in_chans=in_chans)
    features = ours.forward_features(x)
    assert relative_error(features, nhwc(run_timm(theirs, x, 'forward_features'))) <= FP32_RTOL
    assert relative_error(ours.forward_head(features, pre_logits=True), run_timm(theirs, x)) <= FP32_RTOL
    assert ours(x).shape == (2, num_classes or ours.head_hidden_size)
    if num_classes:
        assert ours.head.fc.kernel.shape == (ours.head_hidden_size, num_classes)


def test_same_classes_other_pool_keeps_the_checkpoint_classifier(offline_hub, images):
    ours = nfnet_jax.create_model(TAG, pretrained=True, global_pool='max')
    assert relative_error(ours(images), run_timm(timm_model(global_pool='max'), images)) <= FP32_RTOL


def test_pretrained_errors_list_what_exists(offline_hub):
    with pytest.raises(CheckpointError, match=r'no pretrained weights for nfnet_f0; .*dm_nfnet_f0\.dm_in1k'):
        nfnet_jax.create_model('nfnet_f0', pretrained=True)
    with pytest.raises(ValueError, match=r"unknown tag 'in22k' for dm_nfnet_f0; it has: dm_nfnet_f0\.dm_in1k"):
        nfnet_jax.create_model('dm_nfnet_f0.in22k', pretrained=True)
    with pytest.raises(CheckpointError, match='could not fetch timm/nf_resnet50.ra2_in1k/model.safetensors'):
        nfnet_jax.create_model('nf_resnet50', pretrained=True)  # not in the offline cache
    with pytest.raises(ValueError, match='at most one of pretrained=True, checkpoint_path and params'):
        nfnet_jax.create_model(TAG, pretrained=True, params={})


def test_every_pretrained_tag_has_timms_hub_id_and_data_settings():
    names = nfnet_jax.list_models(pretrained=True)
    assert len(names) == 14
    for name in names:
        theirs = timm.models.get_pretrained_cfg(name).to_dict()
        ours = nfnet_jax.pretrained_cfgs[name]
        assert ours.hf_hub_id == theirs['hf_hub_id'].rstrip('/'), name
        for field in ('num_classes', 'input_size', 'test_input_size', 'crop_pct', 'crop_mode', 'interpolation'):
            assert getattr(ours, field) == theirs.get(field, getattr(ours, field)), (name, field)
        assert ours.mean == tuple(theirs['mean']) and ours.std == tuple(theirs['std']), name


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3, 4), 2, (-1,), (1, 3), (0,)])
def test_features_only_matches_timm(offline_hub, images, out_indices):
    theirs = timm_model(features_only=True, out_indices=out_indices)
    ours = nfnet_jax.create_model(TAG, pretrained=True, features_only=True, out_indices=out_indices)
    assert ours.feature_info.out_indices == theirs.feature_info.out_indices
    assert ours.feature_info.channels() == theirs.feature_info.channels()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction()
    assert ours.feature_info.module_name() == theirs.feature_info.module_name()
    assert ours.feature_info.get_dicts() == theirs.feature_info.get_dicts()
    assert ours.feature_info.channels(0) == theirs.feature_info.channels(0)
    maps = nnx.jit(lambda model, x: model(x))(ours, images)
    reference = run_timm(theirs, images)
    assert len(maps) == len(reference)
    for ours_map, timm_map in zip(maps, reference, strict=True):
        assert relative_error(ours_map, nhwc(timm_map)) <= FP32_RTOL


def test_features_only_drops_what_its_taps_do_not_need():
    def kept(out_indices) -> set[str]:
        model = FeatureListNet(abstract_model(nfnet_jax.model_cfgs['test_nfnet']), out_indices)
        return {'.'.join(path.split('.')[1:3]) for path in param_shapes(model)}

    assert kept((0,)) == {'stem.conv1', 'stem.conv2', 'stem.conv3'}
    assert kept((1, 2)) == {'stem.conv1', 'stem.conv2', 'stem.conv3', 'stem.conv4', 'stages.0', 'stages.1'}
    everything = kept(2)
    assert 'final_conv.kernel' in everything and 'stages.3' in everything
    assert not any(name.startswith('head') for name in everything)


def test_embeddings_and_reset_classifier_match_timm(offline_hub, images):
    ours, theirs = nfnet_jax.create_model(TAG, pretrained=True), timm_model()
    embedded = nfnet_jax.create_model(TAG, pretrained=True, num_classes=0)(images)
    reference = run_timm(timm_model(num_classes=0), images)
    assert embedded.shape == (2, ours.head_hidden_size)
    assert relative_error(embedded, reference) <= FP32_RTOL
    pre_logits = ours.forward_head(ours.forward_features(images), pre_logits=True)
    assert relative_error(pre_logits, reference) <= FP32_RTOL

    ours.reset_classifier(0, 'max')
    theirs.reset_classifier(0, 'max')
    assert relative_error(ours(images), run_timm(theirs, images)) <= FP32_RTOL
    ours.reset_classifier(7)  # global_pool=None keeps the pool
    assert ours.global_pool == 'max' and ours(images).shape == (2, 7)


def test_convert_command_fetches_a_tag_from_the_hub_cache(offline_hub, tmp_path, images, capsys):
    out = tmp_path / 'converted.safetensors'
    assert convert_main([TAG, '-o', str(out)]) == 0
    model = nfnet_jax.load_checkpoint(out)
    assert model.pretrained_cfg.name == TAG
    assert relative_error(model(images), run_timm(timm_model(), images)) <= FP32_RTOL
    assert convert_main([TAG, '-o', str(out)]) == 2  # exists, no --force
    assert 'already exists' in capsys.readouterr().err
