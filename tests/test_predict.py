"""`python -m nfnet_jax.predict` end to end, on a staged hub cache and on a converted checkpoint.

The folder holds real photos (one RGBA, one 16-bit grayscale PNG), a text file and a
truncated JPEG. Results are checked against timm run on the same files (timm's own
transform after `convert('RGB')`, as its datasets do): probabilities to 2e-6 absolute (the
JSON keeps 6 decimals), embeddings to relative error max|ours - timm| / max|timm| <= 1e-5.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import timm.data
import torch
from helpers import FP32_RTOL, bomb_png, relative_error
from PIL import Image

from convert.from_timm import main as convert_main
from nfnet_jax.predict import main as predict_main

TAG = 'test_nfnet.r160_in1k'
READABLE = ('camera_16bit.png', 'chelsea.png', 'coffee.jpg', 'logo_rgba.png')
UNREADABLE = ('notes.txt', 'truncated.jpg')


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('images')
    Image.fromarray(skimage.data.coffee()).save(folder / 'coffee.jpg')
    Image.fromarray(skimage.data.chelsea()).save(folder / 'chelsea.png')
    Image.fromarray(skimage.data.logo()).save(folder / 'logo_rgba.png')
    Image.fromarray(skimage.data.camera().astype(np.uint16) * 257).save(folder / 'camera_16bit.png')
    (folder / 'notes.txt').write_text('not an image')
    (folder / 'truncated.jpg').write_bytes((folder / 'coffee.jpg').read_bytes()[:4000])
    return folder


def timm_outputs(folder: Path, **model_kwargs) -> np.ndarray:
    model = timm.create_model(TAG, pretrained=True, **model_kwargs).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    batch = torch.stack([transform(Image.open(folder / name).convert('RGB')) for name in READABLE])
    with torch.no_grad():
        return model(batch).numpy()


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'nfnet_jax.predict', *args], capture_output=True, text=True, env=os.environ, timeout=300
    )


def test_topk_json_from_the_hub_cache_matches_timm_and_reports_bad_files(offline_hub, folder):
    result = run_predict(str(folder), '--model', TAG, '--json', '--topk', '3', '--batch-size', '3')
    assert result.returncode == 1, result.stderr
    for name in UNREADABLE:
        assert f'{folder / name}: not a readable image' in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(row['file']).name for row in rows] == list(READABLE)
    probabilities = torch.from_numpy(timm_outputs(folder)).softmax(dim=-1)
    top_p, top_i = torch.topk(probabilities, k=3)
    for row, expected_p, expected_i in zip(rows, top_p.numpy(), top_i.numpy(), strict=True):
        assert [entry['index'] for entry in row['topk']] == expected_i.tolist()
        np.testing.assert_allclose([entry['probability'] for entry in row['topk']], expected_p, rtol=0, atol=2e-6)
        assert row['topk'][0]['label'] == timm.data.ImageNetInfo().index_to_description(int(expected_i[0]))


@pytest.mark.slow
def test_embeddings_from_a_converted_checkpoint_match_timm_with_cpu_memory_kept(offline_hub, folder, tmp_path):
    checkpoint, out = tmp_path / 'model.safetensors', tmp_path / 'embeddings.npy'
    assert convert_main([TAG, '-o', str(checkpoint)]) == 0
    result = run_predict(
        str(folder), '--checkpoint', str(checkpoint), '--embeddings', str(out), '--batch-size', '2', '--keep-cpu-memory'
    )
    assert result.returncode == 1, result.stderr
    assert [line.split('\t')[1] for line in result.stdout.splitlines()] == [str(folder / n) for n in READABLE]
    embeddings = np.load(out)
    assert embeddings.dtype == np.float32
    assert relative_error(embeddings, timm_outputs(folder, num_classes=0)) <= FP32_RTOL
    assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]

    before = out.read_bytes()
    again = run_predict(str(folder / 'coffee.jpg'), '--checkpoint', str(checkpoint), '--embeddings', str(out))
    assert again.returncode == 2 and 'already exists; pass --force' in again.stderr
    assert out.read_bytes() == before


def test_text_output_names_each_image_with_its_classes(offline_hub, folder, capsys):
    assert predict_main([str(folder / 'coffee.jpg'), str(folder / 'chelsea.png'), '--model', TAG, '--topk', '2']) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(folder / 'coffee.jpg') and lines[3] == str(folder / 'chelsea.png')
    assert len(lines) == 6 and all(line.strip().split()[0].endswith('%') for line in lines[1:3] + lines[4:6])


def test_a_decompression_bomb_is_reported_and_the_run_goes_on(offline_hub, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)  # the command sets it; restored after
    bomb = bomb_png(tmp_path / 'bomb.png')
    assert predict_main([str(bomb), str(folder / 'coffee.jpg'), '--model', TAG, '--json', '--topk', '1']) == 1
    captured = capsys.readouterr()
    assert f'{bomb}: refused: 10,000,000,000 pixels, over the limit of 89,478,485' in captured.err
    assert [json.loads(line)['file'] for line in captured.out.splitlines()] == [str(folder / 'coffee.jpg')]
    assert predict_main([str(folder / 'coffee.jpg'), '--model', TAG, '--max-image-pixels', '1000']) == 1
    assert 'coffee.jpg: refused: 240,000 pixels, over the limit of 1,000' in capsys.readouterr().err


def test_hostile_file_names_are_listed_losslessly(offline_hub, folder, tmp_path, capsys):
    images = tmp_path / 'images'
    images.mkdir()
    for name in (b'with space.jpg', b'new\nline.jpg', b'caf\xe9.jpg'):
        Path(os.fsdecode(bytes(images) + b'/' + name)).write_bytes((folder / 'coffee.jpg').read_bytes())
    (images / 'dangling.jpg').symlink_to(images / 'gone.jpg')
    assert predict_main([str(images), '--model', TAG, '--json', '--topk', '1']) == 1
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [row.get('file_bytes') for row in rows] == [
        base64.b64encode(bytes(images) + b'/caf\xe9.jpg').decode(),
        None,
        None,
    ]
    assert [row['file'] for row in rows[1:]] == [f'{images}/new\nline.jpg', f'{images}/with space.jpg']
    assert f'{images}/dangling.jpg: not a readable image (FileNotFoundError' in captured.err
    assert predict_main([str(images), '--model', TAG, '--topk', '1']) == 1
    text = capsys.readouterr().out.splitlines()
    assert text[0::2] == [f'{images}/caf\\xe9.jpg', f'{images}/new\\nline.jpg', f'{images}/with space.jpg']


@pytest.mark.parametrize(
    'args,message',
    [
        (['missing.jpg', '--model', TAG], 'missing.jpg: no such file or folder'),
        (['-', '--model', TAG], "'-': images cannot be read from standard input"),
        (['IMAGES', '--model', TAG, '--embeddings', 'out.txt'], 'must be a .npy file'),
        (['IMAGES', '--model', TAG, '--batch-size', '0'], 'at least 1'),
        (['IMAGES', '--model', 'nfnet_f0'], 'no pretrained weights for nfnet_f0'),
    ],
)
def test_bad_arguments_fail_before_any_work(offline_hub, folder, capsys, args, message):
    args = [str(folder) if arg == 'IMAGES' else arg for arg in args]
    assert predict_main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('platforms', ['rocm', 'cuda'])
def test_a_jax_platform_this_machine_lacks_is_one_line(offline_hub, folder, platforms):
    if platforms == 'cuda' and any(Path(f'/dev/{name}').exists() for name in ('nvidia0', 'nvidiactl')):
        pytest.skip('this machine has an NVIDIA GPU')
    result = subprocess.run(
        [sys.executable, '-m', 'nfnet_jax.predict', str(folder), '--model', TAG],
        capture_output=True,
        text=True,
        env={**os.environ, 'JAX_PLATFORMS': platforms},
        timeout=300,
    )
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert f"error: JAX could not start a backend for JAX_PLATFORMS='{platforms}'" in result.stderr
    assert 'set JAX_PLATFORMS to a platform this machine has' in result.stderr
