"""Feature-map extraction: timm's `features_only=True` model and its `FeatureInfo`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from nfnet_jax.models.layers import Array
from nfnet_jax.models.nfnet import NormFreeNet

OutIndices = int | Sequence[int]


def out_indices_as_tuple(out_indices: OutIndices) -> tuple[int, ...]:
    """timm's reading of `out_indices`: an int n means the last n taps, a sequence is kept as given."""
    if isinstance(out_indices, int):
        return tuple(range(-out_indices, 0))
    return tuple(out_indices)


class FeatureInfo:
    """timm's FeatureInfo: channels, reduction and module name of each tap, selected by `out_indices`.

    `channels()`, `reduction()`, `module_name()` and `get_dicts()` give the values at the
    output indices; with `idx` they index the full list of taps instead, as in timm.
    """

    def __init__(self, feature_info: Sequence[dict[str, Any]], out_indices: OutIndices):
        self.out_indices = out_indices_as_tuple(out_indices)
        self.info = [dict(info, index=i) for i, info in enumerate(feature_info)]

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        def select(i: int) -> dict[str, Any]:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [select(i) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [select(i) for i in idx]
        return select(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get('num_chs', idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get('reduction', idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get('module', idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f'FeatureInfo(out_indices={self.out_indices}, info={self.info})'


class FeatureListNet(nnx.Module):
    """A backbone that returns the NHWC feature maps at timm's taps, as a list (timm's features_only model).

    The wrapped network is pruned: stages after the deepest tap, and the head, are gone, so
    neither their parameters nor their compute remain. Parameter paths are the full model's
    under `backbone.`.
    """

    def __init__(self, model: NormFreeNet, out_indices: OutIndices = (0, 1, 2, 3, 4)):
        self.feature_info = FeatureInfo(model.feature_info, out_indices)
        self.take_indices = tuple(model.prune_intermediate_layers(self.feature_info.out_indices))
        self.backbone = model
        self.pretrained_cfg = model.pretrained_cfg

    def __call__(self, x: Array) -> list[Array]:
        return self.backbone.forward_intermediates(x, list(self.take_indices), intermediates_only=True)
