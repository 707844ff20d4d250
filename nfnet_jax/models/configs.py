"""Architecture configs: timm's `NfCfg`, its family helpers and its `model_cfgs` table.

Field names, defaults and every table entry are copied from timm 1.0.31
`timm/models/nfnet.py`, so a name here builds exactly the network timm builds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class NfCfg:
    """One normalizer-free architecture (timm's NfCfg)."""

    depths: tuple[int, int, int, int]
    channels: tuple[int, int, int, int]
    alpha: float = 0.2
    stem_type: str = '3x3'
    stem_chs: int | None = None
    group_size: int | None = None
    attn_layer: str | None = None
    attn_kwargs: Mapping[str, Any] = field(default_factory=dict)
    attn_gain: float = 2.0  # corrects the variance halved by the attention gate
    width_factor: float = 1.0
    bottle_ratio: float = 0.5
    num_features: int = 0  # channels of the final 1x1 conv; no final conv if 0
    ch_div: int = 8  # channel counts are rounded to multiples of this
    reg: bool = False  # RegNet style: bottleneck from in_chs, attention between conv2 and conv3
    extra_conv: bool = False  # NFNet-F/L: a second 3x3 conv in the bottleneck
    gamma_in_act: bool = False  # dm_ models: gamma scales activations, not conv weights
    same_padding: bool = False  # dm_ models: TF SAME padding
    std_conv_eps: float = 1e-5
    skipinit: bool = False  # a learnable 0-d gain on every residual branch
    act_layer: str = 'silu'

    def __hash__(self) -> int:
        # The cfg is static structure of a model's graphdef: it must hash (attn_kwargs is a dict) so
        # that jitted functions are reused across model instances instead of recompiled for each.
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, Mapping) else v for v in vars(self).values()))


def _nfres_cfg(
    depths: tuple[int, ...],
    channels: tuple[int, ...] = (256, 512, 1024, 2048),
    group_size: int | None = None,
    act_layer: str = 'relu',
    attn_layer: str | None = None,
    attn_kwargs: Mapping[str, Any] | None = None,
) -> NfCfg:
    """NF-ResNet: 7x7 stem with max pool, 1/4 bottleneck, attention after conv3."""
    return NfCfg(
        depths=depths,
        channels=channels,
        stem_type='7x7_pool',
        stem_chs=64,
        bottle_ratio=0.25,
        group_size=group_size,
        act_layer=act_layer,
        attn_layer=attn_layer,
        attn_kwargs=attn_kwargs or {},
    )


def _nfreg_cfg(depths: tuple[int, ...], channels: tuple[int, ...] = (48, 104, 208, 440)) -> NfCfg:
    """NF-RegNet-B: EfficientNet-like, 2.25 expansion from in_chs, SE in the middle, final 1x1 conv."""
    return NfCfg(
        depths=depths,
        channels=channels,
        stem_type='3x3',
        group_size=8,
        width_factor=0.75,
        bottle_ratio=2.25,
        num_features=1280 * channels[-1] // 440,
        reg=True,
        attn_layer='se',
        attn_kwargs=dict(rd_ratio=0.5),
    )


def _nfnet_cfg(
    depths: tuple[int, ...],
    channels: tuple[int, ...] = (256, 512, 1536, 1536),
    group_size: int = 128,
    bottle_ratio: float = 0.5,
    feat_mult: float = 2.0,
    act_layer: str = 'gelu',
    attn_layer: str = 'se',
    attn_kwargs: Mapping[str, Any] | None = None,
) -> NfCfg:
    """NFNet-F/L in timm's numerics (gamma folded into convs, symmetric padding)."""
    return NfCfg(
        depths=depths,
        channels=channels,
        stem_type='deep_quad',
        stem_chs=128,
        group_size=group_size,
        bottle_ratio=bottle_ratio,
        extra_conv=True,
        num_features=int(channels[-1] * feat_mult),
        act_layer=act_layer,
        attn_layer=attn_layer,
        attn_kwargs=attn_kwargs if attn_kwargs is not None else dict(rd_ratio=0.5),
    )


def _dm_nfnet_cfg(
    depths: tuple[int, ...],
    channels: tuple[int, ...] = (256, 512, 1536, 1536),
    act_layer: str = 'gelu',
    skipinit: bool = True,
) -> NfCfg:
    """NFNet-F as DeepMind trained them: gamma in the activations, SAME padding, skipinit gains."""
    cfg = _nfnet_cfg(depths, channels, act_layer=act_layer)
    return replace(cfg, gamma_in_act=True, same_padding=True, skipinit=skipinit)


_light = dict(feat_mult=1.5, group_size=64, bottle_ratio=0.25, act_layer='silu')
_eca_light = dict(group_size=64, bottle_ratio=0.25, attn_layer='eca', attn_kwargs={}, act_layer='silu')

model_cfgs: dict[str, NfCfg] = dict(
    # NFNet-F with GELU, compatible with DeepMind's weights
    dm_nfnet_f0=_dm_nfnet_cfg(depths=(1, 2, 6, 3)),
    dm_nfnet_f1=_dm_nfnet_cfg(depths=(2, 4, 12, 6)),
    dm_nfnet_f2=_dm_nfnet_cfg(depths=(3, 6, 18, 9)),
    dm_nfnet_f3=_dm_nfnet_cfg(depths=(4, 8, 24, 12)),
    dm_nfnet_f4=_dm_nfnet_cfg(depths=(5, 10, 30, 15)),
    dm_nfnet_f5=_dm_nfnet_cfg(depths=(6, 12, 36, 18)),
    dm_nfnet_f6=_dm_nfnet_cfg(depths=(7, 14, 42, 21)),
    # NFNet-F with GELU in timm's own numerics
    nfnet_f0=_nfnet_cfg(depths=(1, 2, 6, 3)),
    nfnet_f1=_nfnet_cfg(depths=(2, 4, 12, 6)),
    nfnet_f2=_nfnet_cfg(depths=(3, 6, 18, 9)),
    nfnet_f3=_nfnet_cfg(depths=(4, 8, 24, 12)),
    nfnet_f4=_nfnet_cfg(depths=(5, 10, 30, 15)),
    nfnet_f5=_nfnet_cfg(depths=(6, 12, 36, 18)),
    nfnet_f6=_nfnet_cfg(depths=(7, 14, 42, 21)),
    nfnet_f7=_nfnet_cfg(depths=(8, 16, 48, 24)),
    # timm's lighter NFNet-L with SiLU
    nfnet_l0=_nfnet_cfg(depths=(1, 2, 6, 3), attn_kwargs=dict(rd_ratio=0.25, rd_divisor=8), **_light),
    eca_nfnet_l0=_nfnet_cfg(depths=(1, 2, 6, 3), feat_mult=1.5, **_eca_light),
    eca_nfnet_l1=_nfnet_cfg(depths=(2, 4, 12, 6), feat_mult=2, **_eca_light),
    eca_nfnet_l2=_nfnet_cfg(depths=(3, 6, 18, 9), feat_mult=2, **_eca_light),
    eca_nfnet_l3=_nfnet_cfg(depths=(4, 8, 24, 12), feat_mult=2, **_eca_light),
    # EfficientNet-influenced RegNets (channels rounded to multiples of 8, as in timm)
    nf_regnet_b0=_nfreg_cfg(depths=(1, 3, 6, 6)),
    nf_regnet_b1=_nfreg_cfg(depths=(2, 4, 7, 7)),
    nf_regnet_b2=_nfreg_cfg(depths=(2, 4, 8, 8), channels=(56, 112, 232, 488)),
    nf_regnet_b3=_nfreg_cfg(depths=(2, 5, 9, 9), channels=(56, 128, 248, 528)),
    nf_regnet_b4=_nfreg_cfg(depths=(2, 6, 11, 11), channels=(64, 144, 288, 616)),
    nf_regnet_b5=_nfreg_cfg(depths=(3, 7, 14, 14), channels=(80, 168, 336, 704)),
    # pre-activation ResNets
    nf_resnet26=_nfres_cfg(depths=(2, 2, 2, 2)),
    nf_resnet50=_nfres_cfg(depths=(3, 4, 6, 3)),
    nf_resnet101=_nfres_cfg(depths=(3, 4, 23, 3)),
    nf_seresnet26=_nfres_cfg(depths=(2, 2, 2, 2), attn_layer='se', attn_kwargs=dict(rd_ratio=1 / 16)),
    nf_seresnet50=_nfres_cfg(depths=(3, 4, 6, 3), attn_layer='se', attn_kwargs=dict(rd_ratio=1 / 16)),
    nf_seresnet101=_nfres_cfg(depths=(3, 4, 23, 3), attn_layer='se', attn_kwargs=dict(rd_ratio=1 / 16)),
    nf_ecaresnet26=_nfres_cfg(depths=(2, 2, 2, 2), attn_layer='eca', attn_kwargs={}),
    nf_ecaresnet50=_nfres_cfg(depths=(3, 4, 6, 3), attn_layer='eca', attn_kwargs={}),
    nf_ecaresnet101=_nfres_cfg(depths=(3, 4, 23, 3), attn_layer='eca', attn_kwargs={}),
    # a tiny model for tests
    test_nfnet=_nfnet_cfg(
        depths=(1, 1, 1, 1),
        channels=(32, 64, 96, 128),
        feat_mult=1.5,
        group_size=8,
        bottle_ratio=0.25,
        attn_kwargs=dict(rd_ratio=0.25, rd_divisor=8),
        act_layer='silu',
    ),
)
