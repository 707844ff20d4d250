"""The documentation's code runs as written, and its relative links lead to files and headings that exist.

A snippet is found by the marker on the line before its code block, `<!-- snippet: NAME -->`, in
README.md or any docs/*.md, so headings can be reworded and snippets moved between files freely.
Every marked snippet has a test here, and every test's snippet must exist.

The model card snippets run with the tiny test_nfnet in place of dm_nfnet_f0, in a folder holding a
real photo under the model card's file name, against the staged offline hub cache (random weights);
their results are checked for the shapes they promise.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
SNIPPET = re.compile(r'^<!-- snippet: ([\w-]+) -->\n```python\n(.*?)^```', re.S | re.M)
MODEL_CARD = ['model-card-classification', 'model-card-feature-maps', 'model-card-embeddings']
BACKBONE = ['backbone-nnx', 'backbone-freeze', 'backbone-nnx-tutorial', 'backbone-linen', 'backbone-flax-imagenet']
TESTED = {*MODEL_CARD, 'fast-inference', *BACKBONE}


def snippets() -> dict[str, tuple[Path, str]]:
    """Every marked python block of the docs: name -> (file, code)."""
    found: dict[str, tuple[Path, str]] = {}
    for path in DOCS:
        for name, code in SNIPPET.findall(path.read_text(encoding='utf-8')):
            assert name not in found, f'snippet {name!r} is marked twice: {found[name][0]} and {path}'
            found[name] = (path, code)
    return found


def run_snippet(name: str, *replacements: tuple[str, str], namespace: dict | None = None) -> dict:
    """Run a snippet after `replacements`, in a fresh namespace or in `namespace` (a previous snippet's)."""
    path, code = snippets()[name]
    for old, new in replacements:
        assert old in code, f'snippet {name!r} in {path.name} no longer contains {old!r}'
        code = code.replace(old, new)
    namespace = {} if namespace is None else namespace
    exec(compile(code, f'{path.name}: {name}', 'exec'), namespace)
    return namespace


def test_every_marked_snippet_is_tested_and_every_tested_one_exists():
    assert set(snippets()) == TESTED


@pytest.mark.parametrize('name', MODEL_CARD)
def test_model_card_snippet_runs_as_written(offline_hub, tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(skimage.data.coffee()).save('beignets-task-guide.png')
    namespace = run_snippet(name, ('dm_nfnet_f0.dm_in1k', 'test_nfnet.r160_in1k'))
    printed = capsys.readouterr().out.splitlines()
    model = namespace['model']
    if name == 'model-card-classification':
        assert namespace['top5_probabilities'].shape == (1, 5) and len(printed) == 5
        assert np.all(np.diff(np.asarray(namespace['top5_probabilities'][0])) <= 0)
    elif name == 'model-card-feature-maps':
        expected = [
            (1, 160 // r, 160 // r, c)
            for c, r in zip(model.feature_info.channels(), model.feature_info.reduction(), strict=True)
        ]
        assert printed[:5] == [str(shape) for shape in expected]
    else:
        assert namespace['output'].shape == (1, model.head_hidden_size)


def test_fast_inference_snippet_runs_as_written():
    """With test_nfnet at 64 px in place of dm_nfnet_f0 at 256."""
    namespace = run_snippet('fast-inference', ("'dm_nfnet_f0'", "'test_nfnet'"), ('256, 256', '64, 64'))
    assert namespace['logits'].shape == (8, 1000)
    np.testing.assert_array_equal(namespace['same'], namespace['logits'])
    assert namespace['embed'](namespace['images']).shape == (8, namespace['model'].head_hidden_size)
    assert len(namespace['feature_maps'](namespace['images'])) == 4


# Images of ones: zeros would give the head a zero gradient.
SMALL = (("'dm_nfnet_f0'", "'test_nfnet'"), ('jnp.zeros((8, 224, 224, 3))', 'jnp.ones((8, 32, 32, 3))'))


def changed_params(before, after) -> set[str]:
    import jax

    from nfnet_jax.weights import dotted_path

    flat = [
        {dotted_path(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
        for tree in (before, after)
    ]
    return {path for path in flat[0] if not np.array_equal(flat[0][path], flat[1][path])}


def test_backbone_nnx_snippets_run_as_written(tmp_path, monkeypatch):
    """With test_nfnet at 32 px in place of dm_nfnet_f0 at 224; then the freezing snippet in the same namespace."""
    import jax
    from flax import nnx
    from helpers import leaves

    monkeypatch.chdir(tmp_path)
    namespace = run_snippet('backbone-nnx', *SMALL)
    state, resumed = namespace['state'], namespace['resumed']
    assert state.step == resumed.step == 1 and np.isfinite(float(namespace['metrics']['loss']))
    for a, b in zip(leaves(nnx.state(resumed)), leaves(nnx.state(state)), strict=True):
        np.testing.assert_array_equal(a, b)

    before = jax.tree.map(np.array, nnx.state(namespace['Net'](10, rngs=nnx.Rngs(0)), nnx.Param))
    namespace = run_snippet('backbone-freeze', namespace=namespace)
    assert changed_params(before, nnx.state(namespace['frozen'].model, nnx.Param)) == {'head.bias', 'head.kernel'}


def test_backbone_nnx_tutorial_snippet_runs_as_written():
    """Flax's NNX tutorial loop, test_nfnet at 32 px: the train view trains with drop path, the eval view sees it."""
    from flax import nnx

    from nfnet_jax.models.layers import DropPath

    namespace = run_snippet('backbone-nnx-tutorial', *SMALL)
    train_model, eval_model = namespace['train_model'], namespace['eval_model']
    assert int(namespace['optimizer'].step[...]) == 2
    assert all(np.isfinite(float(namespace[name]['loss'])) for name in ('train_metrics', 'eval_metrics'))
    drop_paths = [
        [m.deterministic for _, m in nnx.iter_modules(view) if isinstance(m, DropPath)]
        for view in (train_model, eval_model)
    ]
    assert drop_paths[0] and not any(drop_paths[0]) and all(drop_paths[1])
    start = nnx.state(namespace['nfnet_jax'].create_model('test_nfnet', num_classes=10, rngs=nnx.Rngs(0)), nnx.Param)
    trained, seen = nnx.state(train_model, nnx.Param), nnx.state(eval_model, nnx.Param)
    assert 'head.fc.kernel' in changed_params(start, trained)
    assert not changed_params(trained, seen)  # the views share the parameters


def test_backbone_linen_snippet_runs_as_written():
    """With test_nfnet at 32 px in place of dm_nfnet_f0 at 224: the backbone stays, the head moves."""
    import jax

    namespace = run_snippet('backbone-linen', *SMALL)
    start = namespace['model'].init(jax.random.key(0), namespace['images'])['params']
    start['backbone'] = namespace['linen_variables'](namespace['nfnet_jax'].create_model('test_nfnet', num_classes=0))[
        'params'
    ]
    assert np.isfinite(float(namespace['loss']))
    assert changed_params(start, namespace['params']) == {'head.bias', 'head.kernel'}


def test_backbone_flax_imagenet_snippet_runs_as_written():
    """Flax's examples/imagenet create_model / train_step / eval_step with test_nfnet at 32 px: one step trains."""
    import jax

    namespace = run_snippet(
        'backbone-flax-imagenet',
        ("'dm_nfnet_f0'", "'test_nfnet'"),
        ('224, model', '32, model'),
        ('(n, 8, 224, 224, 3)', '(n, 8, 32, 32, 3)'),
    )
    state, metrics = namespace['state'], namespace['metrics']
    assert int(state.step[0]) == 1 and np.isfinite(float(metrics['loss'][0]))
    before = namespace['params']
    after = jax.tree.map(lambda x: x[0], state.params)
    assert 'head.fc.kernel' in changed_params(before, after)
    assert 0 <= float(namespace['eval_metrics']['accuracy'][0]) <= 1


FENCE = re.compile(r'^```.*?^```', re.S | re.M)
LINK = re.compile(r'\]\(([^)\s]+)\)')


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r'^#+ (.*)$', FENCE.sub('', path.read_text(encoding='utf-8')), re.M)
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-') for heading in headings}


@pytest.mark.parametrize('path', DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_existing_files_and_headings(path):
    text = FENCE.sub('', path.read_text(encoding='utf-8'))
    broken = []
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target):
            continue
        file, _, anchor = target.partition('#')
        linked = (path.parent / file) if file else path
        if not linked.exists() or (anchor and linked.suffix == '.md' and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f'{path.name} has broken links: {broken}'
