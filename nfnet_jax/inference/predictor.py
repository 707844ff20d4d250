"""What `predict` and `batch_predict` compute and print: one `Predictor` for both commands.

A Predictor holds a model's jitted prediction (top-k classes or pooled embeddings), on one device
or sharded over a mesh, and the `ClassNames` that label its classes. It takes uint8 batches (a
transform's `host_part()`) and normalises them on the device inside the jitted function. `batch_predict merge`, which
has no model, labels its rows with `ClassNames.of` given what the run's Predictor recorded, so the
two commands name every class alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nfnet_jax import parallel
from nfnet_jax.data import imagenet_labels, imagenet_synsets, resolve_model_data_config
from nfnet_jax.data.device import DeviceStage
from nfnet_jax.files import display_name, name_fields
from nfnet_jax.inference import InferenceFn, compile_forward
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.weights.file import read_checkpoint_metadata


def top_k_probabilities(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` highest softmax probabilities (float32) of each row and their class indices."""
    return jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)


def compile_prediction(
    model: NormFreeNet, embeddings: bool, topk: int, stage: DeviceStage | None = None
) -> InferenceFn:
    """The jitted outputs of an image batch: (top-k probabilities, indices), or (pooled embeddings,).

    uint8 images are normalised by `stage` first, in the same program (default: with the model's
    own mean and std, as its eval transform's `device_stage` does); float images are taken as
    normalised already. `topk` is clamped to the number of classes; a model without a classifier
    can only embed.
    """
    if not embeddings and model.num_classes == 0:
        raise ValueError('this model has no classifier (num_classes=0): ask for embeddings (--embeddings)')
    k = min(topk, max(model.num_classes, 1))
    if stage is None:
        config = resolve_model_data_config(model)
        stage = DeviceStage(tuple(config['mean']), tuple(config['std']))

    def predict(model: NormFreeNet, images: jax.Array) -> tuple:
        if images.dtype == jnp.uint8:
            images = stage.normalize(images)
        if embeddings:
            return (model.forward_head(model.forward_features(images), pre_logits=True),)
        return top_k_probabilities(model(images), k)

    return compile_forward(model, predict)  # the weight standardisation folded in once


def pad_rows(images: np.ndarray, rows: int) -> np.ndarray:
    """`images` padded with zero images to `rows`, so every batch has the one shape that was compiled."""
    return np.concatenate([images, np.zeros((rows - len(images), *images.shape[1:]), images.dtype)])


def checkpoint_class_names(checkpoint: str | os.PathLike) -> list[str] | None:
    """The class names a checkpoint's metadata holds (`python -m nfnet_jax.finetune` saves them), or None."""
    saved = json.loads(read_checkpoint_metadata(checkpoint).get('class_names', 'null'))
    return [str(name) for name in saved] if isinstance(saved, list) else None


@dataclass(frozen=True)
class ClassNames:
    """The names and WordNet ids ('' where there are none) of a classifier's classes, and its top-k rows as printed."""

    names: tuple[str, ...]
    synsets: tuple[str, ...]

    @classmethod
    def of(cls, num_classes: int, own: Sequence[str] | None = None) -> ClassNames:
        """`own` names (a fine-tuned checkpoint's) when they name every class, else ImageNet-1k's for a
        1000-class head, otherwise 'class N'."""
        if own is not None and len(own) == num_classes:
            return cls(tuple(own), ('',) * num_classes)
        if num_classes == 1000:
            return cls(tuple(imagenet_labels()), tuple(imagenet_synsets()))
        return cls(tuple(f'class {i}' for i in range(num_classes)), ('',) * num_classes)

    def format_topk(self, path: Path, probabilities: Sequence[float], classes: Sequence[int], as_json: bool) -> str:
        """One image's top-k as text lines, or as one JSON object (`{"file", "topk": [...]}`; the file's name as
        `name_fields` gives it)."""
        top = [(float(p), int(c)) for p, c in zip(probabilities, classes, strict=True)]
        if as_json:
            entries = [
                {'index': c, 'label': self.names[c], 'synset': self.synsets[c], 'probability': round(p, 6)}
                for p, c in top
            ]
            return json.dumps({**name_fields(path), 'topk': entries})
        lines = [display_name(path)]
        lines += [
            f'  {100 * p:6.2f}%  {self.names[c]}' + (f' ({self.synsets[c]})' if self.synsets[c] else '') for p, c in top
        ]
        return '\n'.join(lines)


class Predictor:
    """A model's predictions for the commands: the top-k classes or the pooled embeddings of image batches, and
    each image's result as printed.

    `checkpoint` is the file the model was loaded from (None for hub weights): when its metadata
    holds class names, they label the classes. With a `mesh`, the prediction is sharded over it
    (`nfnet_jax.parallel.shard_inference`) and each call takes this process's rows of a global batch.
    `stage` normalises uint8 batches (the eval transform's `device_stage`; default: the model's
    own mean and std, as `compile_prediction`).
    """

    def __init__(
        self,
        model: NormFreeNet,
        checkpoint: str | os.PathLike | None = None,
        *,
        topk: int = 5,
        embeddings: bool = False,
        mesh: Mesh | None = None,
        stage: DeviceStage | None = None,
    ):
        self.embeddings, self.mesh = embeddings, mesh
        # Recorded by batch_predict in its run directory, for `merge` to label as this does.
        self.own_class_names = None if checkpoint is None else checkpoint_class_names(checkpoint)
        self.class_names = ClassNames.of(model.num_classes, self.own_class_names)
        function = compile_prediction(model, embeddings, topk, stage)
        self.function = function if mesh is None else parallel.shard_inference(function, mesh)

    def __call__(self, images: np.ndarray, rows: int) -> tuple[np.ndarray, ...]:
        """(top-k probabilities, class indices) or (embeddings,) of `images` (uint8, or float32 normalised already),
        one row each.

        They run as a batch of `rows` (this process's rows, with a mesh), padded with zero images,
        so that every call has the one shape that was compiled.
        """
        padded = pad_rows(images, rows)
        if self.mesh is None:
            outputs = self.function(padded)
        else:
            outputs = parallel.local_rows(self.function(parallel.global_batch(padded, self.mesh)), self.mesh)
        return tuple(np.asarray(output)[: len(images)] for output in outputs)

    def format_row(self, path: Path, output: tuple[np.ndarray, ...], row: int, as_json: bool) -> str:
        """One image's result as `predict` prints it: its top-k classes (`ClassNames.format_topk`) or, for
        embeddings, the `row` of the embeddings array that holds it."""
        if self.embeddings:
            return json.dumps({**name_fields(path), 'row': row}) if as_json else f'{row}\t{display_name(path)}'
        return self.class_names.format_topk(path, *output, as_json)
