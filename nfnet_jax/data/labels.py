"""The ImageNet-1k class names and WordNet ids, read from the table shipped with the package.

The names describe a model's outputs, not its inputs: `nfnet_jax.inference.predictor` labels the top-k
classes with them. The table (from timm's data/_info) is package data in `nfnet_jax/_info`.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, str], ...]:
    text = resources.files('nfnet_jax').joinpath('_info', 'imagenet_1k_classes.tsv').read_text(encoding='utf-8')
    return tuple(tuple(line.split('\t', 1)) for line in text.splitlines())


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (WordNet lemmas, e.g. 'tench, Tinca tinca').

    The same descriptions as timm's `ImageNetInfo().index_to_description(i)`, shipped with the package.
    """
    return [lemma for _, lemma in _imagenet_classes()]


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (e.g. 'n01440764')."""
    return [synset for synset, _ in _imagenet_classes()]
