"""What `predict` and `batch_predict` compute and print: top-k classes or embeddings of an image batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nfnet_jax.data import imagenet_labels, imagenet_synsets
from nfnet_jax.files import display_name, name_fields
from nfnet_jax.inference import InferenceFn, compile_forward
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.weights.file import read_checkpoint_metadata


def top_k_probabilities(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` highest softmax probabilities (float32) of each row and their class indices."""
    return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)


def compile_prediction(model: NormFreeNet, embeddings: bool, topk: int) -> InferenceFn:
    """The jitted outputs of an image batch: (top-k probabilities, indices), or (pooled embeddings,).

    `topk` is clamped to the number of classes; a model without a classifier can only embed.
    """
    if not embeddings and model.num_classes == 0:
        raise ValueError('this model has no classifier (num_classes=0): ask for embeddings (--embeddings)')
    k = min(topk, max(model.num_classes, 1))

    def predict(model: NormFreeNet, images: jax.Array) -> tuple:
        if embeddings:
            return (model.forward_head(model.forward_features(images), pre_logits=True),)
        return top_k_probabilities(model(images), k)

    return compile_forward(model, predict)  # the weight standardisation folded in once


def pad_rows(images: np.ndarray, rows: int) -> np.ndarray:
    """`images` padded with zero images to `rows`, so every batch has the one shape that was compiled."""
    return np.concatenate([images, np.zeros((rows - len(images), *images.shape[1:]), images.dtype)])


def class_names(num_classes: int, checkpoint: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """Names and WordNet ids: a checkpoint's own class names (`python -m nfnet_jax.finetune` saves them),
    else ImageNet-1k's for a 1000-class head, otherwise 'class N' and ''."""
    saved = json.loads(read_checkpoint_metadata(checkpoint).get('class_names', 'null')) if checkpoint else None
    if isinstance(saved, list) and len(saved) == num_classes:
        return [str(name) for name in saved], ['' for _ in saved]
    if num_classes == 1000:
        return imagenet_labels(), imagenet_synsets()
    names = [f'class {i}' for i in range(num_classes)]
    return names, ['' for _ in names]


def format_topk(path: Path, top: list[tuple[float, int]], labels: list[str], synsets: list[str], as_json: bool) -> str:
    """One image's top-k as text lines, or as one JSON object (`{"file", "topk": [...]}`; the name: `name_fields`)."""
    if as_json:
        entries = [{'index': c, 'label': labels[c], 'synset': synsets[c], 'probability': round(p, 6)} for p, c in top]
        return json.dumps({**name_fields(path), 'topk': entries})
    lines = [display_name(path)]
    lines += [f'  {100 * p:6.2f}%  {labels[c]}' + (f' ({synsets[c]})' if synsets[c] else '') for p, c in top]
    return '\n'.join(lines)
