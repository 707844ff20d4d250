"""Random weights for parity checks against timm: the one weight randomisation of the tests and of the accelerator
run's parity step (`benchmarks.accelerator.steps`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def random_weights(shapes: Mapping[str, tuple[int, ...]], output_axis: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 values for named weight shapes.

    timm's own init zeroes the biases, every skipinit gain and (non-dm models) every conv3
    gain, which silences the residual branches and hides most bugs. Gains are drawn from
    U(0.8, 1.2): wider ranges make the 96-block nfnet_f7 so ill-conditioned that timm's own
    float32 result drifts from its float64 result by more than the parity tolerance.
    Kernels are N(0, 1/fan_in), with fan_in every axis but `output_axis` (0 for torch, -1 for flax);
    biases N(0, 0.01). Drawn by torch's generator, much faster than numpy's on the largest models.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in shapes.items():
        if name.endswith('gain'):
            values = torch.empty(shape).uniform_(0.8, 1.2, generator=generator)
        elif len(shape) > 1:
            fan_in = np.prod(shape) // shape[output_axis]
            values = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        else:
            values = torch.randn(shape, generator=generator) * 0.1
        weights[name] = values.numpy()
    return weights


def randomize_(module: Any, seed: int = 0) -> None:
    """Give every parameter of a torch module random values (`random_weights`), in place."""
    import torch

    params = dict(module.named_parameters())
    values = random_weights({name: tuple(p.shape) for name, p in params.items()}, output_axis=0, seed=seed)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(torch.from_numpy(values[name]))
