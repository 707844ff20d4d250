"""examples/finetune.py, short: from converted weights, the loss falls and accuracy rises far above chance.

Chance on the 10 digit classes is 0.1. test_nfnet at 32x32, 60 steps of batch 64, drop path on,
so the converted-weights path, train mode and the checkpoints all run as a user runs them.
The example trains through `nfnet_jax.train.train_and_evaluate`, the loop of `python -m
nfnet_jax.finetune`, whose multi-host path tests/test_finetune.py runs on two processes (FSDP,
gloo): the example is not run on two processes again here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import nfnet_jax
from nfnet_jax.weights import flat_params, save_checkpoint

EXAMPLE = Path(__file__).parents[1] / 'examples' / 'finetune.py'


@pytest.fixture(scope='module')
def finetune():
    spec = importlib.util.spec_from_file_location('finetune', EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


@pytest.mark.slow
def test_finetuning_learns_the_digits(finetune, tmp_path):
    # "Converted" weights: a 1000-class test_nfnet written as `python -m convert.from_timm` writes it.
    weights = tmp_path / 'test_nfnet.safetensors'
    source = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0))
    save_checkpoint(weights, flat_params(source), architecture='test_nfnet', num_classes=1000, global_pool='avg')
    out = tmp_path / 'out'
    argv = ['--model', 'test_nfnet', '--checkpoint', str(weights), '--output-dir', str(out)]
    argv += ['--steps', '60', '--eval-every', '30', '--warmup-steps', '10', '--drop-path-rate', '0.1']
    result = finetune.main(argv)

    run = out / 'run'  # the run of train_and_evaluate, beside the digits it trained on
    losses = [r['loss'] for r in records(run) if r['kind'] == 'train']
    evals = [r for r in records(run) if r['kind'] == 'eval']
    assert len(losses) == 60
    # Bounds that hold for any random backbone (seeds 0-3: loss drops 0.31-0.79, top-1 0.37-0.68; chance 0.1).
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.25, (losses[:10], losses[-10:])
    assert result['model']['top1'] > 0.25, evals
    assert [e['step'] for e in evals] == [30, 60] and result['step'] == 60
    assert sorted(int(p.name) for p in (run / 'checkpoints').iterdir()) == [30, 60]
    assert len((out / 'digits' / 'train.tsv').read_text().splitlines()) == 30 * 64  # an epoch is --eval-every steps

    # The run's directory is never reused by accident, and --resume at the end trains nothing more.
    with pytest.raises(FileExistsError, match='--resume'):
        finetune.main(argv)
    before = records(run)
    resumed = finetune.main([*argv, '--resume'])
    assert records(run) == before and resumed == result
