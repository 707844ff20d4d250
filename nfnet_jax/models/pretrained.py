"""Pretrained settings keyed `arch.tag`, copied from timm 1.0.31's `default_cfgs` for nfnet.py.

They live apart from the architectures (as in timm): one architecture can have several tags,
and an entry with no hub id has no weights, only its data settings.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from nfnet_jax.models.configs import model_cfgs

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedCfg:
    """timm's PretrainedCfg fields that NF models use. Sizes are (C, H, W) as in timm."""

    architecture: str
    tag: str = ''
    hf_hub_id: str | None = None  # weights at `{hf_hub_id}/model.safetensors`, None if there are none
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    test_input_size: tuple[int, int, int] | None = None
    pool_size: tuple[int, int] = (7, 7)
    crop_pct: float = 0.9
    test_crop_pct: float | None = None
    crop_mode: str = 'center'
    interpolation: str = 'bicubic'
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    first_conv: str = 'stem.conv1'
    classifier: str = 'head.fc'

    @property
    def name(self) -> str:
        return f'{self.architecture}.{self.tag}' if self.tag else self.architecture

    @property
    def has_weights(self) -> bool:
        return self.hf_hub_id is not None


def _cfg(name: str, hub: bool = False, **kwargs) -> PretrainedCfg:
    architecture, _, tag = name.partition('.')
    return PretrainedCfg(architecture, tag, hf_hub_id=f'timm/{name}' if hub else None, **kwargs)


def _sized(name: str, size: int, test_size: int, pool: int, hub: bool = False, **kwargs) -> PretrainedCfg:
    return _cfg(
        name,
        hub=hub,
        input_size=(3, size, size),
        test_input_size=(3, test_size, test_size),
        pool_size=(pool, pool),
        **kwargs,
    )


def _dm(name: str, size: int, test_size: int, crop_pct: float) -> PretrainedCfg:
    return _sized(name, size, test_size, size // 32, hub=True, crop_pct=crop_pct, crop_mode='squash')


_RESNET = dict(first_conv='stem.conv')

_CFGS: tuple[PretrainedCfg, ...] = (
    _dm('dm_nfnet_f0.dm_in1k', 192, 256, 0.9),
    _dm('dm_nfnet_f1.dm_in1k', 224, 320, 0.91),
    _dm('dm_nfnet_f2.dm_in1k', 256, 352, 0.92),
    _dm('dm_nfnet_f3.dm_in1k', 320, 416, 0.94),
    _dm('dm_nfnet_f4.dm_in1k', 384, 512, 0.951),
    _dm('dm_nfnet_f5.dm_in1k', 416, 544, 0.954),
    _dm('dm_nfnet_f6.dm_in1k', 448, 576, 0.956),
    _sized('nfnet_f0', 192, 256, 6),
    _sized('nfnet_f1', 224, 320, 7),
    _sized('nfnet_f2', 256, 352, 8),
    _sized('nfnet_f3', 320, 416, 10),
    _sized('nfnet_f4', 384, 512, 12),
    _sized('nfnet_f5', 416, 544, 13),
    _sized('nfnet_f6', 448, 576, 14),
    _sized('nfnet_f7', 480, 608, 15),
    _sized('nfnet_l0.ra2_in1k', 224, 288, 7, hub=True, test_crop_pct=1.0),
    _sized('eca_nfnet_l0.ra2_in1k', 224, 288, 7, hub=True, test_crop_pct=1.0),
    _sized('eca_nfnet_l1.ra2_in1k', 256, 320, 8, hub=True, test_crop_pct=1.0),
    _sized('eca_nfnet_l2.ra3_in1k', 320, 384, 10, hub=True, test_crop_pct=1.0),
    _sized('eca_nfnet_l3', 352, 448, 11, test_crop_pct=1.0),
    _sized('nf_regnet_b0', 192, 256, 6, **_RESNET),
    _sized('nf_regnet_b1.ra2_in1k', 256, 288, 8, hub=True, **_RESNET),
    _sized('nf_regnet_b2', 240, 272, 8, **_RESNET),
    _sized('nf_regnet_b3', 288, 320, 9, **_RESNET),
    _sized('nf_regnet_b4', 320, 384, 10, **_RESNET),
    _sized('nf_regnet_b5', 384, 456, 12, **_RESNET),
    _cfg('nf_resnet26', **_RESNET),
    _sized('nf_resnet50.ra2_in1k', 256, 288, 8, hub=True, crop_pct=0.94, **_RESNET),
    _cfg('nf_resnet101', **_RESNET),
    _cfg('nf_seresnet26', **_RESNET),
    _cfg('nf_seresnet50', **_RESNET),
    _cfg('nf_seresnet101', **_RESNET),
    _cfg('nf_ecaresnet26', **_RESNET),
    _cfg('nf_ecaresnet50', **_RESNET),
    _cfg('nf_ecaresnet101', **_RESNET),
    replace(
        _cfg('test_nfnet.r160_in1k', hub=True, input_size=(3, 160, 160), pool_size=(5, 5), crop_pct=0.95),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
)

pretrained_cfgs: dict[str, PretrainedCfg] = {cfg.name: cfg for cfg in _CFGS}


def tags_of(architecture: str) -> list[str]:
    """The `arch.tag` names timm has for an architecture, default first."""
    return [cfg.name for cfg in _CFGS if cfg.architecture == architecture]


def default_cfg(architecture: str) -> PretrainedCfg:
    """The settings a bare architecture name gets: its first tag, as in timm."""
    return next(cfg for cfg in _CFGS if cfg.architecture == architecture)


def resolve_name(name: str) -> tuple[str, PretrainedCfg]:
    """Split `arch[.tag]` and check both, with errors that say what exists."""
    architecture, _, tag = name.partition('.')
    if architecture not in model_cfgs:
        close = difflib.get_close_matches(architecture, model_cfgs, n=5, cutoff=0.5)
        suggestion = f'; did you mean {", ".join(close)}?' if close else '; see nfnet_jax.list_models()'
        raise ValueError(f'unknown model {architecture!r}{suggestion}')
    if not tag:
        return architecture, default_cfg(architecture)
    if name not in pretrained_cfgs:
        raise ValueError(f'unknown tag {tag!r} for {architecture}; it has: {", ".join(tags_of(architecture))}')
    return architecture, pretrained_cfgs[name]
