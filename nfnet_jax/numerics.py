"""How nfnet_jax compares its numbers with a reference (timm, another device, another layout)."""

from __future__ import annotations

import numpy as np

# The parity tolerance of float32 outputs against timm: max|ours - timm| / max|timm|.
FP32_RTOL = 1e-5


def relative_error(ours: object, reference: object) -> float:
    """max|ours - reference| / max|reference|, in float64: the metric of every parity check."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise ValueError(f'cannot compare shape {ours.shape} with {reference.shape}')
    return float(np.max(np.abs(ours - reference)) / max(float(np.max(np.abs(reference))), 1e-30))
