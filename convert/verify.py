"""Check a converted checkpoint against timm: same weights, same random batch, every feature tap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

import nfnet_jax
from nfnet_jax.numerics import relative_error


def require_timm() -> None:
    """Fail before any long work if the verification side is not installed."""
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        raise nfnet_jax.CheckpointError('--verify needs torch and timm: pip install "nfnet-jax[timm]"') from None


@dataclass
class Report:
    rows: list[tuple[str, tuple[int, ...], float, float]]  # name, NHWC shape, max abs, relative

    @property
    def worst(self) -> float:
        return max(rel for *_, rel in self.rows)


def verify_checkpoint(
    state_dict: Mapping[str, np.ndarray],
    checkpoint_path: str,
    architecture: str,
    num_classes: int,
    image_size: Sequence[int],
    batch_size: int = 2,
    seed: int = 0,
) -> Report:
    """Run timm (with `state_dict`) and nfnet_jax (from the checkpoint file) on one random batch."""
    import timm
    import torch

    timm_model = timm.create_model(architecture, pretrained=False, num_classes=num_classes).eval()
    timm_model.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()})
    model = nfnet_jax.load_checkpoint(checkpoint_path)

    x = np.random.default_rng(seed).standard_normal((batch_size, *image_size, 3)).astype(np.float32)
    with torch.no_grad():
        final, taps = timm_model.forward_intermediates(torch.from_numpy(x).permute(0, 3, 1, 2))
        logits = timm_model.forward_head(final)
    reference = [('logits', logits.numpy())]
    reference += [
        (info['module'], tap.permute(0, 2, 3, 1).numpy())
        for info, tap in zip(timm_model.feature_info, taps, strict=True)
    ]

    ours_final, ours_taps = model.forward_intermediates(x)
    ours = [np.asarray(model.forward_head(ours_final))] + [np.asarray(tap) for tap in ours_taps]
    rows = []
    for (name, ref), out in zip(reference, ours, strict=True):
        max_abs = float(np.max(np.abs(np.asarray(out, np.float64) - ref)))
        rows.append((name, ref.shape, max_abs, relative_error(out, ref)))
    return Report(rows)


def print_report(report: Report, tolerance: float) -> None:
    print(f'{"output":<16} {"shape (NHWC)":<22} {"max abs err":>12} {"max rel err":>12}')
    for name, shape, max_abs, rel in report.rows:
        flag = '' if rel <= tolerance else '  <-- above tolerance'
        print(f'{name:<16} {str(shape):<22} {max_abs:>12.3e} {rel:>12.3e}{flag}')
    verdict = 'OK' if report.worst <= tolerance else 'FAILED'
    print(f'verify {verdict}: worst relative error {report.worst:.3e} (tolerance {tolerance:g})')
