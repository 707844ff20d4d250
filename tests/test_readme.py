"""The README's model card snippets run as written, with the tiny test_nfnet in place of dm_nfnet_f0.

They run in a folder holding a real photo under the README's file name, against the staged
offline hub cache (random weights), and their results are checked for the shapes they promise.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

README = Path(__file__).resolve().parents[1] / 'README.md'
SECTION = "## The model card's workflows"


def snippets() -> dict[str, str]:
    """The python blocks of the model card section, keyed by their subsection title."""
    text = README.read_text(encoding='utf-8')
    section = text[text.index(SECTION) :]
    section = section[: section.index('\n## ', len(SECTION))]
    blocks = {}
    for part in section.split('\n### ')[1:]:
        title, _, body = part.partition('\n')
        code = re.findall(r'```python\n(.*?)```', body, re.S)
        if code:
            blocks[title.strip()] = code[0]
    return blocks


def test_the_section_has_the_model_cards_three_snippets():
    assert list(snippets()) == ['Image classification', 'Feature map extraction', 'Image embeddings']


@pytest.mark.parametrize('title', ['Image classification', 'Feature map extraction', 'Image embeddings'])
def test_snippet_runs_as_written(offline_hub, tmp_path, monkeypatch, capsys, title):
    code = snippets()[title]
    assert "create_model(\n    'dm_nfnet_f0.dm_in1k'" in code or "create_model('dm_nfnet_f0.dm_in1k'" in code
    monkeypatch.chdir(tmp_path)
    Image.fromarray(skimage.data.coffee()).save('beignets-task-guide.png')
    namespace: dict = {}
    exec(compile(code.replace('dm_nfnet_f0.dm_in1k', 'test_nfnet.r160_in1k'), f'README: {title}', 'exec'), namespace)
    printed = capsys.readouterr().out.splitlines()
    model = namespace['model']
    if title == 'Image classification':
        assert namespace['top5_probabilities'].shape == (1, 5) and len(printed) == 5
        assert np.all(np.diff(np.asarray(namespace['top5_probabilities'][0])) <= 0)
    elif title == 'Feature map extraction':
        expected = [
            (1, 160 // r, 160 // r, c)
            for c, r in zip(model.feature_info.channels(), model.feature_info.reduction(), strict=True)
        ]
        assert printed[:5] == [str(shape) for shape in expected]
    else:
        assert namespace['output'].shape == (1, model.head_hidden_size)
