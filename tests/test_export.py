"""Serving artifacts (`python -m nfnet_jax.export`, `export_inference`) and the conv/matmul precision setting.

Metric: relative error max|a - b| / max|b|. An artifact is loaded back in a fresh process that
imports jax only (neither flax nor nfnet_jax) and must give the inference function's own outputs
within 1e-6.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FP32_RTOL, random_weights, relative_error

import nfnet_jax
from nfnet_jax import export, inference
from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.nfnet import abstract_model
from nfnet_jax.weights.params import param_shapes

EXPORT_RTOL = 1e-6
OUTPUT_KINDS = ('logits', 'embeddings', 'features')

# Loads each artifact with jax alone and calls it on its images; argv: OUT.npz, then ARTIFACT IMAGES.npy pairs.
LOADER = """
import sys
import jax
import numpy as np

outputs = {}
for i in range(2, len(sys.argv), 2):
    with open(sys.argv[i], 'rb') as f:
        exported = jax.export.deserialize(f.read())
    result = exported.call(np.load(sys.argv[i + 1]))
    for j, leaf in enumerate(jax.tree.leaves(result)):
        outputs[f'{i // 2 - 1}_{j}'] = np.asarray(leaf)
assert 'flax' not in sys.modules and 'nfnet_jax' not in sys.modules, 'the loader imported more than jax'
np.savez(sys.argv[1], **outputs)
"""


def load_elsewhere(tmp_path: Path, calls: list[tuple[bytes, np.ndarray]]) -> list[list[np.ndarray]]:
    """Each (artifact, images) called in one fresh process that imports jax only: each call's output leaves."""
    argv = []
    for i, (data, images) in enumerate(calls):
        (tmp_path / f'{i}.jaxexport').write_bytes(data)
        np.save(tmp_path / f'{i}.npy', images)
        argv += [str(tmp_path / f'{i}.jaxexport'), str(tmp_path / f'{i}.npy')]
    subprocess.run([sys.executable, '-c', LOADER, str(tmp_path / 'out.npz'), *argv], check=True, timeout=300)
    saved = np.load(tmp_path / 'out.npz')
    keys = sorted((tuple(map(int, key.split('_'))), key) for key in saved.files)
    return [[saved[key] for (call, _), key in keys if call == i] for i in range(len(calls))]


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_command_artifact_runs_without_flax_and_matches_the_inference_functions(offline_hub, tmp_path, record_property):
    """test_nfnet: the command's logits for any batch size; the library's embeddings and feature maps."""
    out = tmp_path / 'test_nfnet.jaxexport'
    argv = ['--model', 'test_nfnet.r160_in1k', '-o', str(out), '--batch', 'dynamic', '--size', '64']
    assert export.main([*argv, '--platforms', 'cpu,cuda,tpu', '--precision', 'highest']) == 0
    description = json.loads((tmp_path / 'test_nfnet.jaxexport.json').read_text())
    assert description['input']['shape'] == ['batch', 64, 64, 3] and description['platforms'] == ['cpu', 'cuda', 'tpu']
    assert description['data_config']['mean'] == [0.5, 0.5, 0.5]

    model = nfnet_jax.create_model('test_nfnet.r160_in1k', pretrained=True, precision='highest')
    classify, embed = inference.classifier(model), inference.embedder(model)
    features = inference.feature_extractor(model)
    x = images((3, 64, 64, 3))
    embeddings, maps = (inference.export_inference(model, output=kind, batch=3, size=64) for kind in OUTPUT_KINDS[1:])
    artifact = out.read_bytes()
    calls = [(artifact, x[:1]), (artifact, x), (embeddings.serialize(), x), (maps.serialize(), x)]
    loaded = load_elsewhere(tmp_path, calls)

    logits = classify.apply(classify.state, x)
    expected = [[logits[:1]], [logits], [embed.apply(embed.state, x)], features.apply(features.state, x)]
    errors = []
    for got, want in zip(loaded, expected, strict=True):
        assert [g.shape for g in got] == [w.shape for w in want]
        errors += [relative_error(g, w) for g, w in zip(got, want, strict=True)]
    assert max(errors) <= EXPORT_RTOL
    record_property('figure', ('test_nfnet artifacts (logits, embeddings, 5 maps) in a jax-only process', max(errors)))
    # Against `classify(x)`, which compiles with nfnet_jax's CPU options (other conv kernels): rounding only.
    vs_compiled = relative_error(loaded[1][0], classify(x))
    assert vs_compiled <= FP32_RTOL
    record_property('figure', ('test_nfnet logits artifact in a jax-only process vs classify(x)', vs_compiled))

    # The sidecar's sha256 is what the loader checks: 64 bytes overwritten are refused, not run.
    assert description['sha256'] == hashlib.sha256(artifact).hexdigest()
    np.testing.assert_allclose(export.load_artifact(out).call(x[:1]), loaded[0][0], rtol=EXPORT_RTOL)
    damaged = bytearray(artifact)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
    out.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r'test_nfnet.jaxexport: its sha256 does not match .* export the model again'):
        export.load_artifact(out)
    (tmp_path / 'test_nfnet.jaxexport.json').unlink()
    with pytest.raises(ValueError, match=r'no sha256 of test_nfnet.jaxexport to check it against'):
        export.load_artifact(out)


@pytest.mark.slow
def test_dm_nfnet_f0_artifact_matches_the_classifier(tmp_path, record_property):
    """dm_nfnet_f0 with random weights at 64 px, batch 1: the weights (71M) travel inside the artifact."""
    shapes = param_shapes(abstract_model(model_cfgs['dm_nfnet_f0']))
    params = {k: v.astype(np.float32) for k, v in random_weights(shapes, output_axis=-1).items()}
    model = nfnet_jax.create_model('dm_nfnet_f0', params=params)
    classify = inference.classifier(model)
    x = images((1, 64, 64, 3))
    data = inference.export_inference(model, size=64).serialize()
    assert len(data) > 4 * 70e6  # float32 weights included
    (got,) = load_elsewhere(tmp_path, [(data, x)])[0]
    # The artifact's weights are constants, which XLA:CPU compiles into other kernels than weights passed
    # as arguments (classify.apply): 1.1e-6 measured, as far as classify(x) and classify.apply are apart.
    error = relative_error(got, classify.apply(classify.state, x))
    assert error <= FP32_RTOL
    record_property('figure', ('dm_nfnet_f0 artifact (64 px, batch 1) in a jax-only process vs classify.apply', error))


def test_inference_state_holds_weights_only():
    """No PRNG key in the state (an inference model never draws), even for a model built to train with dropout."""
    model = nfnet_jax.create_model('test_nfnet', drop_rate=0.5, drop_path_rate=0.2)
    assert nnx.state(model, nnx.RngState)  # the model itself keeps its streams for training
    assert not nnx.state(inference.inference_model(model), nnx.RngState)
    classify = inference.classifier(model)
    leaves = jax.tree.leaves(classify.state)
    assert all(not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) for leaf in leaves)
    assert all(np.asarray(leaf).dtype == np.float32 for leaf in leaves)


@pytest.mark.parametrize(
    'argv,message',
    [
        (['--platforms', 'cpu,gpu'], '--platforms'),
        (['--platforms', 'cpu,cpu'], '--platforms'),
        (['--batch', '0'], '--batch'),
        (['--batch', 'any'], '--batch'),
        (['--batch', '99999999999999999999'], '--batch must be an integer from 1 to 2,147,483,647'),
        (['--size', '0'], '--size'),
        (['--model', 'test_nfnet.nope'], 'unknown tag'),
        (['--checkpoint', 'missing.safetensors'], 'no checkpoint'),
    ],
)
def test_command_refuses_bad_arguments_before_loading_the_model(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(export, 'load_model', lambda *a, **k: pytest.fail('the model was loaded'))
    source = [] if any(a in argv for a in ('--model', '--checkpoint')) else ['--model', 'test_nfnet']
    assert export.main([*source, '-o', str(tmp_path / 'm.jaxexport'), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('existing', ['m.jaxexport', 'm.jaxexport.json'])
def test_command_refuses_an_existing_output(tmp_path, monkeypatch, capsys, existing):
    monkeypatch.setattr(export, 'load_model', lambda *a, **k: pytest.fail('the model was loaded'))
    (tmp_path / existing).write_text('keep')
    assert export.main(['--model', 'test_nfnet', '-o', str(tmp_path / 'm.jaxexport')]) == 2
    assert 'already exists' in capsys.readouterr().err
    assert (tmp_path / existing).read_text() == 'keep' and len(list(tmp_path.iterdir())) == 1


def test_bad_choices_are_argparse_errors():
    for argv in (['--dtype', 'float16'], ['--output', 'probs'], ['--precision', 'fastest']):
        with pytest.raises(SystemExit) as exit_info:
            export.main(['--model', 'test_nfnet', '-o', 'unused', *argv])
        assert exit_info.value.code == 2
