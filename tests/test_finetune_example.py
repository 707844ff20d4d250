"""examples/finetune.py, short: from converted weights, the loss falls and accuracy rises far above chance.

Chance on the 10 digit classes is 0.1. test_nfnet at 32x32, 60 steps of batch 64, drop path on,
so the converted-weights path, train mode and the checkpoints all run as a user runs them.
Its multi-host flags drive the library code that tests/test_finetune.py runs on two processes
(`python -m nfnet_jax.finetune`: FSDP, gloo): the example is not run on two processes again here.
"""

from __future__ import annotations

import importlib.util
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


def test_finetuning_learns_the_digits(finetune, tmp_path):
    # "Converted" weights: a 1000-class test_nfnet written as `python -m convert.from_timm` writes it.
    weights = tmp_path / 'test_nfnet.safetensors'
    source = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0))
    save_checkpoint(weights, flat_params(source), architecture='test_nfnet', num_classes=1000, global_pool='avg')
    run = tmp_path / 'run'
    argv = ['--model', 'test_nfnet', '--checkpoint', str(weights), '--output-dir', str(run)]
    argv += ['--steps', '60', '--eval-every', '30', '--warmup-steps', '10', '--drop-path-rate', '0.1']
    history = finetune.main(argv)

    losses = history['train_loss']
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.5, (losses[:10], losses[-10:])
    assert history['final_accuracy'] > 0.5, history['evals']
    assert [e['step'] for e in history['evals']] == [30, 60]
    assert sorted(int(p.name) for p in run.iterdir() if p.name.isdigit()) == [30, 60]

    # The run's directory is never reused by accident, and --resume at the end trains nothing more.
    with pytest.raises(FileExistsError, match='--resume'):
        finetune.main(argv)
    resumed = finetune.main([*argv, '--resume'])
    assert resumed['train_loss'] == [] and resumed['final_accuracy'] == history['final_accuracy']
