"""Shared test setup: exact float32 math on every backend, and timm models with random weights."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

# GPUs and TPUs default to TF32/bf16 passes for float32 matmuls and convs; parity needs full float32.
jax.config.update('jax_default_matmul_precision', 'highest')

FP32_RTOL = 1e-5  # max|ours - timm| / max|timm|, the parity metric of every test


def relative_error(ours, reference) -> float:
    """max|ours - reference| / max|reference|, computed in float64."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f'shape {ours.shape} != {reference.shape}'
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-30))


def randomize_(module, seed: int = 0) -> None:
    """Give every tensor of a torch module random values, in place.

    timm's own init zeroes the biases, every skipinit gain and (non-dm models) every conv3
    gain, which silences the residual branches and hides most bugs. Gains are drawn from
    U(0.8, 1.2): wider ranges make the 96-block nfnet_f7 so ill-conditioned that timm's own
    float32 result is 1.2e-5 (relative) away from its float64 result; with this range 1.8e-6.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith('gain'):
                param.copy_(torch.rand(param.shape, generator=generator) * 0.4 + 0.8)
            elif param.ndim > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def stage_hub_checkpoint(cache: Path, state_dict: dict, repo_id: str, revision: str = '0123456789abcdef') -> Path:
    """Lay out a Hugging Face hub cache folder holding `repo_id/model.safetensors`, as the hub client writes it."""
    from safetensors.torch import save_file

    repo = cache / f'models--{repo_id.replace("/", "--")}'
    (repo / 'snapshots' / revision).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(revision)
    path = repo / 'snapshots' / revision / 'model.safetensors'
    save_file({key: value.contiguous() for key, value in state_dict.items()}, path)
    return path


@pytest.fixture(scope='session')
def hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding timm's test_nfnet.r160_in1k with random weights (every tensor randomised)."""
    import timm

    cache = tmp_path_factory.mktemp('hub_cache')
    model = timm.create_model('test_nfnet')
    randomize_(model, seed=1)
    stage_hub_checkpoint(cache, model.state_dict(), 'timm/test_nfnet.r160_in1k')
    return cache


@pytest.fixture
def offline_hub(hub_cache, monkeypatch) -> Path:
    """Point huggingface_hub at the staged cache, offline: the real hub client runs, without a network.

    huggingface_hub reads its environment once at import, so its constants are patched too;
    the environment variables are set for subprocesses.
    """
    import huggingface_hub.constants

    monkeypatch.setenv('HF_HUB_CACHE', str(hub_cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hub_cache))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    return hub_cache


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the worst parity error per family and the figures tests record as `('figure', (label, value))`,
    so every CI log shows the figures, not only a pass."""
    worst: dict[str, tuple[float, str]] = {}
    figures: list[tuple[str, float]] = []
    for report in terminalreporter.stats.get('passed', []):
        for name, value in report.user_properties:
            if name == 'parity':
                architecture, size, error = value
                family = architecture.rstrip('0123456789')  # dm_nfnet_f, nfnet_l, nf_regnet_b, ...
                if error >= worst.get(family, (-1.0, ''))[0]:
                    worst[family] = (error, f'{architecture} at {size[0]}x{size[1]}')
            elif name == 'figure':
                figures.append(value)
    if worst:
        terminalreporter.write_sep('-', 'worst fp32 parity error per family (max|ours - timm| / max|timm|)')
        for family, (error, where) in sorted(worst.items()):
            terminalreporter.write_line(f'{family:<14} {error:.2e}  ({where})')
    if figures:
        terminalreporter.write_sep('-', 'other measured figures (relative errors: max|ours - ref| / max|ref|)')
        for label, error in figures:
            terminalreporter.write_line(f'{error:.2e}  {label}')
