"""`python -m nfnet_jax.batch_predict`: equal to predict's outputs, resumable, on one and on two processes.

A randomised test_nfnet checkpoint (10 classes, 160x160) on a folder of small images with one
unreadable file. The reference is `nfnet_jax.inference.predictor.compile_prediction` on one device over all
readable images in one batch; figures are relative errors max|ours - ref| / max|ref|.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from helpers import bomb_png, random_params, relative_error
from multihost import free_port, run_processes
from PIL import Image

from nfnet_jax import batch_predict, predict
from nfnet_jax.data import create_transform, find_images, load_batch, resolve_model_data_config
from nfnet_jax.factory import create_model, load_checkpoint
from nfnet_jax.inference import batch_run
from nfnet_jax.inference.predictor import compile_prediction
from nfnet_jax.weights import flat_params, save_checkpoint

RTOL = 1e-5
TOPK = 3


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('model') / 'test_nfnet.safetensors'
    model = create_model('test_nfnet', rngs=nnx.Rngs(0), num_classes=10)
    save_checkpoint(
        path, random_params(flat_params(model)), architecture='test_nfnet', num_classes=10, global_pool='avg'
    )
    return path


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('images')
    (folder / 'more').mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        pixels = rng.integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / ('more' if i % 3 else '.') / f'image{i}.png')
    (folder / 'image5b.jpg').write_bytes(b'not an image')
    return folder


@pytest.fixture(scope='module')
def reference(checkpoint, images) -> dict:
    model = load_checkpoint(checkpoint)
    files = [path for path in find_images([images]) if path.suffix == '.png']
    batch = load_batch(files, create_transform(**resolve_model_data_config(model)))
    probabilities, classes = map(np.asarray, compile_prediction(model, False, TOPK)(batch))
    [embeddings] = map(np.asarray, compile_prediction(model, True, TOPK)(batch))
    return {
        'files': [str(f) for f in files],
        'probabilities': probabilities,
        'classes': classes,
        'embeddings': embeddings,
    }


def run(images: Path, checkpoint: Path, out: Path, *options: str) -> int:
    return batch_predict.main(['run', str(images), '--checkpoint', str(checkpoint), '--output', str(out), *options])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_embeddings(merged: Path, reference: dict) -> None:
    assert merged.with_suffix('.files.txt').read_text().splitlines() == reference['files']
    assert relative_error(np.load(merged), reference['embeddings']) < RTOL


def test_top_k_of_a_folder_in_chunks_equals_predict(images, checkpoint, reference, tmp_path):
    # 11 files in chunks of 4, batches of 3: padded batches and a short last chunk.
    assert run(images, checkpoint, tmp_path / 'run', '--topk', str(TOPK), '--chunk-size', '4', '--batch-size', '3') == 1
    assert sorted(p.name for p in (tmp_path / 'run' / 'chunks').iterdir()) == ['000000.npz', '000001.npz', '000002.npz']
    assert batch_predict.main(['merge', str(tmp_path / 'run'), str(tmp_path / 'top.jsonl')]) == 0
    lines = read_jsonl(tmp_path / 'top.jsonl')
    assert [line['file'] for line in lines] == [str(p) for p in find_images([images])]  # input order
    [broken] = [line for line in lines if 'error' in line]
    assert broken['file'].endswith('image5b.jpg') and 'not a readable image' in broken['error']
    predicted = [line for line in lines if 'topk' in line]
    classes = np.array([[entry['index'] for entry in line['topk']] for line in predicted])
    probabilities = np.array([[entry['probability'] for entry in line['topk']] for line in predicted])
    np.testing.assert_array_equal(classes, reference['classes'])
    assert relative_error(probabilities, reference['probabilities']) < RTOL
    assert predicted[0]['topk'][0]['label'] == f'class {classes[0, 0]}'


def test_merge_labels_a_fine_tuned_checkpoints_classes_as_predict_does(images, tmp_path, capsys):
    """A checkpoint whose metadata holds its class folders' names (as `finetune` writes best.safetensors): the
    merged rows name the classes by those names, as `predict --json` does, even once the checkpoint has moved."""
    names = ['daisy', 'rose', 'tulip']
    checkpoint = tmp_path / 'best.safetensors'
    model = create_model('test_nfnet', rngs=nnx.Rngs(1), num_classes=3)
    metadata = {'class_names': json.dumps(names)}
    save_checkpoint(
        checkpoint,
        random_params(flat_params(model)),
        architecture='test_nfnet',
        num_classes=3,
        global_pool='avg',
        extra_metadata=metadata,
    )
    files = [str(images / 'image0.png'), str(images / 'image3.png'), str(images / 'more' / 'image1.png')]
    assert predict.main([*files, '--checkpoint', str(checkpoint), '--json', '--topk', '3']) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert batch_predict.main(['run', *files, '--checkpoint', str(checkpoint), '--output', str(tmp_path / 'run')]) == 0
    checkpoint.rename(tmp_path / 'moved.safetensors')  # merge labels with what the run recorded
    assert batch_predict.main(['merge', str(tmp_path / 'run'), str(tmp_path / 'top.jsonl')]) == 0
    merged = read_jsonl(tmp_path / 'top.jsonl')

    def labels(rows: list[dict]) -> list[list[tuple[int, str]]]:
        return [[(entry['index'], entry['label']) for entry in row['topk']] for row in rows]

    assert [row['file'] for row in merged] == [row['file'] for row in printed] == files
    assert labels(merged) == labels(printed)
    assert all(label == names[index] for row in labels(merged) for index, label in row)
    assert all(sorted(label for _, label in row) == names for row in labels(merged))  # top 3 of 3: every name


def test_an_interrupted_run_resumes_without_redoing_chunks(
    images, checkpoint, reference, tmp_path, monkeypatch, capsys
):
    out, list_file = tmp_path / 'run', tmp_path / 'files.txt'
    list_file.write_text(''.join(f'{path}\n' for path in find_images([images])))
    options = ('--embeddings', '--chunk-size', '3', '--batch-size', '2')
    write_chunk, written = batch_predict.write_chunk, []

    def interrupted_after_two(run_dir, chunk, *args) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C or a preemption between two chunks
        write_chunk(run_dir, chunk, *args)
        written.append(chunk)

    monkeypatch.setattr(batch_predict, 'write_chunk', interrupted_after_two)
    argv = ['run', '--list', str(list_file), '--checkpoint', str(checkpoint), '--output', str(out), *options]
    assert batch_predict.main(argv) == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    finished = {path.name: path.stat().st_mtime_ns for path in (out / 'chunks').glob('*.npz')}
    assert sorted(finished) == ['000000.npz', '000001.npz'] and not list((out / 'chunks').glob('000002*'))
    assert batch_predict.main(['merge', str(out), str(tmp_path / 'early.npy')]) == 2  # refuses a partial run

    monkeypatch.setattr(batch_predict, 'write_chunk', write_chunk)
    computed = []
    predict_chunk = batch_predict.predict_chunk
    monkeypatch.setattr(batch_predict, 'predict_chunk', lambda f, i, *a: computed.append(i) or predict_chunk(f, i, *a))
    assert (
        batch_predict.main(
            ['run', '--list', str(list_file), '--checkpoint', str(checkpoint), '--output', str(out), *options]
        )
        == 0  # the unreadable file was in a finished chunk: this invocation read none
    )
    assert computed == [range(6, 9), range(9, 11)]  # only the unfinished chunks
    assert {name: (out / 'chunks' / name).stat().st_mtime_ns for name in finished} == finished  # untouched
    assert batch_predict.main(['merge', str(out), str(tmp_path / 'embeddings.npy')]) == 0
    check_embeddings(tmp_path / 'embeddings.npy', reference)

    # A damaged chunk (truncated, or text garbage) is named, with what to do; deleting it and running again works.
    damaged = out / 'chunks' / '000001.npz'
    chunk = damaged.read_bytes()
    capsys.readouterr()
    for garbage in (chunk[: len(chunk) // 2], b'not a chunk at all\n' * 100):
        damaged.write_bytes(garbage)
        assert batch_predict.main(['merge', str(out), str(tmp_path / 'again.npy')]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and '000001.npz: a damaged chunk' in err, err
        assert 'run the same `run` command again' in err and 'pickle' not in err and len(err) < 300, err
    damaged.unlink()
    assert (
        batch_predict.main(
            ['run', '--list', str(list_file), '--checkpoint', str(checkpoint), '--output', str(out), *options]
        )
        == 0
    )
    assert batch_predict.main(['merge', str(out), str(tmp_path / 'again.npy')]) == 0
    check_embeddings(tmp_path / 'again.npy', reference)


@pytest.mark.slow
def test_two_processes_embed_like_one(images, checkpoint, reference, tmp_path):
    """2 processes x 2 devices on loopback (gloo), each reading only its own chunks."""
    out, port = tmp_path / 'run', free_port()
    command = ['python', '-m', 'nfnet_jax.batch_predict', 'run', str(images), '--checkpoint', str(checkpoint)]
    command += ['--output', str(out), '--embeddings', '--chunk-size', '3', '--coordinator', f'127.0.0.1:{port}']
    runs = run_processes([[*command, '--num-processes', '2', '--process-id', str(i)] for i in range(2)], 2, 400)
    # Exit status 1 for the process whose chunk held the unreadable file, 0 for the other.
    assert sorted(r.returncode for r in runs) == [0, 1], [r.output[-2000:] for r in runs]
    writers = [int(np.load(path)['process']) for path in sorted((out / 'chunks').glob('*.npz'))]
    assert writers == [0, 1, 0, 1]  # chunk c by process c % 2
    assert batch_predict.main(['merge', str(out), str(tmp_path / 'embeddings.npy')]) == 0
    check_embeddings(tmp_path / 'embeddings.npy', reference)


@pytest.mark.parametrize(
    ('prepare', 'options', 'message'),
    [
        (lambda out: None, ['--batch-size', '0'], 'must be at least 1'),
        (lambda out: (out / 'notes.txt').write_text('mine'), [], 'is not empty and has no manifest.json'),
        (lambda out: None, ['--list', 'files.txt'], 'either as inputs'),
    ],
)
def test_bad_runs_are_refused_before_any_work(images, checkpoint, tmp_path, capsys, prepare, options, message):
    out = tmp_path / 'run'
    out.mkdir()
    prepare(out)
    assert run(images, checkpoint, out, *options) == 2
    assert message in capsys.readouterr().err
    assert not (out / 'chunks').exists()


def test_a_run_directory_holds_one_computation(images, checkpoint, tmp_path, capsys):
    out = tmp_path / 'run'
    assert run(images, checkpoint, out, '--embeddings', '--chunk-size', '20') == 1
    before = sorted(p.name for p in (out / 'chunks').iterdir())
    assert run(images, checkpoint, out, '--chunk-size', '20') == 2
    assert "holds another computation (output: 'embeddings' there, 'topk' now" in capsys.readouterr().err
    assert sorted(p.name for p in (out / 'chunks').iterdir()) == before
    listed = find_images([images])
    swapped = tmp_path / 'swapped.txt'
    swapped.write_text(''.join(f'{path}\n' for path in [listed[1], listed[0], *listed[2:]]))
    argv = ['run', '--list', str(swapped), '--checkpoint', str(checkpoint), '--output', str(out)]
    assert batch_predict.main([*argv, '--embeddings', '--chunk-size', '20']) == 2
    err = capsys.readouterr().err
    assert f'the file list: file 0 is {listed[0]} there, {listed[1]} now' in err
    assert f'(its files: --list {out / "files.txt"})' in err
    (tmp_path / 'dup.txt').write_text(f'{images / "image0.png"}\n{images / "image0.png"}\n')
    assert (
        batch_predict.main(
            [
                'run',
                '--list',
                str(tmp_path / 'dup.txt'),
                '--checkpoint',
                str(checkpoint),
                '--output',
                str(tmp_path / 'other'),
            ]
        )
        == 2
    )
    assert 'listed more than once' in capsys.readouterr().err
    assert batch_predict.main(['merge', str(out), str(tmp_path / 'out.jsonl')]) == 2
    assert 'merged into a .npy file' in capsys.readouterr().err
    (tmp_path / 'taken.npy').write_bytes(b'keep')
    assert batch_predict.main(['merge', str(out), str(tmp_path / 'taken.npy')]) == 2
    assert (tmp_path / 'taken.npy').read_bytes() == b'keep'


def test_a_decompression_bomb_is_one_unreadable_file(images, checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', Image.MAX_IMAGE_PIXELS)  # the command sets it; restored after
    folder = tmp_path / 'images'
    folder.mkdir()
    bomb_png(folder / 'bomb.png')
    (folder / 'image0.png').write_bytes((images / 'image0.png').read_bytes())
    assert run(folder, checkpoint, tmp_path / 'run') == 1
    assert 'bomb.png: refused: 10,000,000,000 pixels, over the limit of 89,478,485' in capsys.readouterr().err
    assert batch_predict.main(['merge', str(tmp_path / 'run'), str(tmp_path / 'top.jsonl')]) == 0
    bomb, image = read_jsonl(tmp_path / 'top.jsonl')
    assert 'decompression bomb' in bomb['error'] and 'topk' in image
    # A lower limit refuses the 30x50 image too.
    assert run(folder, checkpoint, tmp_path / 'strict', '--max-image-pixels', '1000') == 1
    assert 'image0.png: refused: 1,500 pixels, over the limit of 1,000' in capsys.readouterr().err


def hostile_folder(folder: Path, source: Path) -> dict[str, bytes]:
    """Images named with a space, a newline and a byte that is not UTF-8, a dangling link and a link loop."""
    folder.mkdir()
    names = {'space': b'with space.png', 'newline': b'new\nline.png', 'latin1': b'caf\xe9.png'}
    for name in names.values():
        Path(os.fsdecode(bytes(folder) + b'/' + name)).write_bytes(source.read_bytes())
    (folder / 'dangling.png').symlink_to(folder / 'gone.png')
    (folder / 'loop.png').symlink_to(folder / 'loop.png')
    return names


def test_hostile_file_names_round_trip_through_run_merge_and_list(images, checkpoint, tmp_path, capsys, monkeypatch):
    folder = tmp_path / 'images'
    names = hostile_folder(folder, images / 'image0.png')
    assert run(folder, checkpoint, tmp_path / 'run') == 1
    err = capsys.readouterr().err
    assert f'{folder}/dangling.png: not a readable image (FileNotFoundError' in err
    assert f'{folder}/loop.png: not a readable image' in err
    assert batch_predict.main(['merge', str(tmp_path / 'run'), str(tmp_path / 'top.jsonl')]) == 0
    lines = read_jsonl(tmp_path / 'top.jsonl')
    exact = [base64.b64decode(line['file_bytes']) if 'file_bytes' in line else line['file'].encode() for line in lines]
    expected = sorted([*names.values(), b'dangling.png', b'loop.png'])
    assert exact == [bytes(folder) + b'/' + name for name in expected]
    assert [line['file'] for line in lines if 'file_bytes' in line] == [f'{folder}/caf\ufffd.png']
    assert ['error' in line for line in lines] == [name in (b'dangling.png', b'loop.png') for name in expected]
    # The run's own file list is a valid --list: the same computation, so it resumes with nothing to do.
    listed = ['run', '--list', str(tmp_path / 'run' / 'files.txt'), '--checkpoint', str(checkpoint)]
    assert batch_predict.main([*listed, '--output', str(tmp_path / 'run')]) == 0
    assert '0 to do' in capsys.readouterr().err
    # ... and so is that list piped in: `--list -` reads standard input.
    monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO((tmp_path / 'run' / 'files.txt').read_bytes())))
    listed[2] = '-'
    assert batch_predict.main([*listed, '--output', str(tmp_path / 'run')]) == 0
    assert '0 to do' in capsys.readouterr().err


def test_a_list_from_a_terminal_says_to_pipe_it(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdin, 'isatty', lambda: True)
    argv = ['run', '--list', '-', '--checkpoint', str(checkpoint), '--output', str(tmp_path / 'run')]
    assert batch_predict.main(argv) == 2
    assert 'standard input, which is a terminal: pipe it in' in capsys.readouterr().err
    assert not (tmp_path / 'run').exists()


def test_one_run_at_a_time_and_a_killed_runs_lock_is_taken_over(images, checkpoint, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    lock = batch_run.lock_path(out, 0)
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
    try:
        lock.write_text(f'{holder.pid} {socket.gethostname()}\n')
        assert run(images, checkpoint, out) == 2
        held = f'another batch_predict run (process {holder.pid} on {socket.gethostname()}) holds {lock}'
        assert held in capsys.readouterr().err
        assert sorted(path.name for path in out.iterdir()) == [lock.name]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    assert run(images, checkpoint, out, '--embeddings') == 1  # the holder was killed: its lock is stale
    assert not lock.exists() and len(list((out / 'chunks').iterdir())) == 1


@pytest.mark.slow
def test_two_processes_with_their_own_run_folders_run_resume_and_refuse_together(
    images, checkpoint, reference, tmp_path
):
    """Hosts without a shared filesystem: each process keeps its own chunks in its own --output, resumes only its
    own unfinished chunk, and a folder of another computation on one host refuses the run on both, in one line."""
    command = ['python', '-m', 'nfnet_jax.batch_predict', 'run', str(images), '--checkpoint', str(checkpoint)]
    command += ['--embeddings', '--chunk-size', '3', '--num-processes', '2']

    def run_both() -> list:
        port = ['--coordinator', f'127.0.0.1:{free_port()}']
        argv = [[*command, *port, '--output', str(tmp_path / f'out{i}'), '--process-id', str(i)] for i in range(2)]
        return run_processes(argv, 2, 400)

    runs = run_both()
    assert sorted(r.returncode for r in runs) == [0, 1], [r.output[-2000:] for r in runs]  # 1: an unreadable file
    chunks = [sorted(p.name for p in (tmp_path / f'out{i}' / 'chunks').glob('*.npz')) for i in range(2)]
    assert chunks == [['000000.npz', '000002.npz'], ['000001.npz', '000003.npz']]
    merged = tmp_path / 'merged'
    shutil.copytree(tmp_path / 'out0', merged, ignore=shutil.ignore_patterns('.lock-*'))
    shutil.copytree(tmp_path / 'out1' / 'chunks', merged / 'chunks', dirs_exist_ok=True)
    assert batch_predict.main(['merge', str(merged), str(tmp_path / 'embeddings.npy')]) == 0
    check_embeddings(tmp_path / 'embeddings.npy', reference)

    kept = {p: p.stat().st_mtime_ns for i in range(2) for p in (tmp_path / f'out{i}' / 'chunks').glob('*.npz')}
    (tmp_path / 'out1' / 'chunks' / '000003.npz').unlink()  # process 1 was stopped before its last chunk
    del kept[tmp_path / 'out1' / 'chunks' / '000003.npz']
    runs = run_both()
    assert [r.returncode for r in runs] == [0, 0], [r.output[-2000:] for r in runs]
    assert '2 of 2 chunks done, 0 to do' in runs[0].output and '1 of 2 chunks done, 1 to do' in runs[1].output
    assert {p: p.stat().st_mtime_ns for p in kept} == kept and (tmp_path / 'out1' / 'chunks' / '000003.npz').exists()

    manifest = tmp_path / 'out1' / 'manifest.json'
    manifest.write_text(manifest.read_text().replace('"chunk_size": 3', '"chunk_size": 4'))
    runs = run_both()
    for finished in runs:
        assert finished.returncode == 2, finished.output[-2000:]
        [line] = [line for line in finished.output.splitlines() if line.startswith('error: ')]
        assert line.startswith(f'error: process 1: {tmp_path / "out1"} holds another computation (chunk_size: 4')
