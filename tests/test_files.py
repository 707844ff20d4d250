"""Outputs: checked before the work (existing, unwritable, under a file), written whole or not at all,
with the umask's permissions, and never left half written by SIGTERM or Ctrl-C in a real process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nfnet_jax.files import OutputError, atomic_write, atomic_write_together, check_output, check_output_folder
from nfnet_jax.weights import save_checkpoint


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / 'notes').write_text('a file, not a folder')
    with pytest.raises(OutputError, match='cannot be made: .*notes is not a folder'):
        check_output(tmp_path / 'notes' / 'sub' / 'model.safetensors')
    with pytest.raises(OutputError, match='notes exists and is not a folder'):
        check_output_folder(tmp_path / 'notes')
    with pytest.raises(OutputError, match='is a folder; name the file'):
        check_output(tmp_path)
    with pytest.raises(FileExistsError, match='pass --force'):
        check_output(tmp_path / 'notes')
    assert check_output(tmp_path / 'new' / 'deeper' / 'out.npy') == tmp_path / 'new' / 'deeper' / 'out.npy'
    assert not (tmp_path / 'new').exists()  # checked, not made


@pytest.mark.parametrize('existing', [False, True])
def test_files_written_together_are_all_written_or_none(tmp_path, existing):
    """An exported artifact and its description: a failed write of the second leaves neither, and with --force
    the earlier pair stays as it was."""
    artifact, description = tmp_path / 'm.jaxexport', tmp_path / 'm.jaxexport.json'
    if existing:
        artifact.write_text('old artifact')
        description.write_text('old description')

    def disk_full(tmp: str) -> None:
        Path(tmp).write_text('half')
        raise OSError(28, 'No space left on device')

    with pytest.raises(OSError, match='No space left'):
        atomic_write_together({artifact: lambda tmp: Path(tmp).write_text('new'), description: disk_full}, force=True)
    if existing:
        assert (artifact.read_text(), description.read_text()) == ('old artifact', 'old description')
    assert sorted(path.name for path in tmp_path.iterdir()) == (['m.jaxexport', 'm.jaxexport.json'] if existing else [])
    write_new = {artifact: lambda tmp: Path(tmp).write_text('new'), description: lambda tmp: None}
    atomic_write_together(write_new, force=True)
    assert artifact.read_text() == 'new' and description.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes in read-only folders; the file-as-folder test stands in')
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / 'locked'
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match='cannot write in .*locked'):
            check_output(folder / 'out.npy')
    finally:
        folder.chmod(0o700)


def test_written_files_get_the_umasks_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / 'a.txt', lambda tmp: Path(tmp).write_text('x'))
        save_checkpoint(
            tmp_path / 'b.safetensors',
            {'w': np.zeros(2, np.float32)},
            architecture='x',
            num_classes=1,
            global_pool='avg',
        )
    finally:
        os.umask(old)
    for name in ('a.txt', 'b.safetensors'):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # mkstemp alone gives 0o600


def test_a_written_file_given_a_mode_gets_it_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / 'a.txt', lambda tmp: Path(tmp).write_text('x'), mode=0o644)
    finally:
        os.umask(old)
    assert (tmp_path / 'a.txt').stat().st_mode & 0o777 == 0o644  # not 0o666, as umask 000 gives a plain open


# A real process, stopped while its output is being written: the write is made to hang once the
# temporary file is complete, and the process is told so on stdout. A pytest-xdist worker ignores SIGINT,
# and an ignored signal stays ignored across exec: the child first takes Python's own SIGINT handler, as a
# command started from a shell has, so Ctrl-C becomes KeyboardInterrupt.
_HANG_IN_WRITE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import {module} as target
real = target.{function}
def hanging(*args, **kwargs):
    real(*args, **kwargs)
    print('WRITING', flush=True)
    time.sleep(120)
target.{function} = hanging
from {command} import main
sys.exit(main(sys.argv[1:]))
"""


def stop_while_writing(tmp_path: Path, signum: int, module: str, function: str, command: str, *argv: str) -> str:
    script = _HANG_IN_WRITE.format(module=module, function=function, command=command)
    process = subprocess.Popen(
        [sys.executable, '-c', textwrap.dedent(script), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        lines = iter(process.stdout.readline, '')
        assert 'WRITING\n' in lines, process.stderr.read()  # reads up to it (a command may print rows first)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    assert 'Traceback' not in err
    return err


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_conversion_leaves_no_file(tmp_path, signum):
    out = tmp_path / 'out' / 'test_nfnet.safetensors'
    err = stop_while_writing(
        tmp_path, signum, 'nfnet_jax.weights.file', 'save_file', 'convert.from_timm', 'test_nfnet', '-o', str(out)
    )
    assert f'stopped by {signal.Signals(signum).name}' in err
    assert list(out.parent.iterdir()) == []  # neither the output nor its hidden .NAME.XXXX.tmp


@pytest.fixture(scope='module')
def model_and_image(tmp_path_factory) -> tuple[Path, Path]:
    from PIL import Image

    from nfnet_jax.models.configs import model_cfgs
    from nfnet_jax.models.nfnet import abstract_model
    from nfnet_jax.weights import param_shapes

    folder = tmp_path_factory.mktemp('inputs')
    shapes = param_shapes(abstract_model(model_cfgs['test_nfnet'], num_classes=10))
    params = {path: np.full(shape, 0.01, np.float32) for path, shape in shapes.items()}
    save_checkpoint(folder / 'model.safetensors', params, architecture='test_nfnet', num_classes=10, global_pool='avg')
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / 'image.png')
    return folder / 'model.safetensors', folder / 'image.png'


def test_commands_refuse_an_unwritable_output_before_any_work(tmp_path, model_and_image, capsys):
    from convert.from_timm import main as convert_main
    from nfnet_jax import batch_predict, predict
    from nfnet_jax.inference import batch_run

    checkpoint, image = model_and_image
    (tmp_path / 'file').write_text('not a folder')
    under_file = tmp_path / 'file' / 'sub'
    model = ['--checkpoint', str(checkpoint)]
    assert convert_main(['test_nfnet', '-o', str(under_file / 'x.safetensors')]) == 2
    assert predict.main([str(image), *model, '--embeddings', str(under_file / 'e.npy')]) == 2
    assert batch_predict.main(['run', str(image), *model, '--output', str(under_file / 'run')]) == 2
    # merge checks its output before it reads a chunk (this run has none)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / batch_run.FILE_LIST).write_text(f'{image}\n')
    manifest = {
        'format': batch_run.FORMAT,
        'files_sha256': hashlib.sha256(f'{image}\n'.encode()).hexdigest(),
        'output': 'topk',
        'chunk_size': 1,
    }
    (run_dir / batch_run.MANIFEST).write_text(json.dumps(manifest))
    assert batch_predict.main(['merge', str(run_dir), str(under_file / 'top.jsonl')]) == 2
    err = capsys.readouterr().err
    assert err.count(f'error: {under_file} cannot be made: {tmp_path / "file"} is not a folder') == 3, err
    assert f'{under_file / "run"} cannot be made' in err
    assert 'building' not in err and 'files at' not in err  # no model was loaded


@pytest.mark.slow
@pytest.mark.parametrize('command', ['predict', 'batch_predict'])
def test_a_stopped_prediction_leaves_no_file(tmp_path, model_and_image, command):
    checkpoint, image = model_and_image
    out = tmp_path / 'out'
    if command == 'predict':
        argv = [str(image), '--checkpoint', str(checkpoint), '--embeddings', str(out / 'e.npy')]
        out.mkdir()
        stop_while_writing(tmp_path, signal.SIGTERM, 'numpy', 'save', 'nfnet_jax.predict', *argv)
        assert list(out.iterdir()) == []
    else:
        argv = ['run', str(image), '--checkpoint', str(checkpoint), '--output', str(out)]
        stop_while_writing(tmp_path, signal.SIGTERM, 'numpy', 'savez', 'nfnet_jax.batch_predict', *argv)
        assert list((out / 'chunks').iterdir()) == []  # the chunk is redone on resume, never half there


def test_a_folder_made_read_only_or_a_full_disk_is_one_line_not_a_traceback(capsys):
    from nfnet_jax.cli import run_command

    def fails(error: OSError) -> Callable[[object], int]:
        def run(args: object) -> int:
            raise error

        return run

    read_only = PermissionError(13, 'Permission denied', 'run/curves.png')
    assert run_command(fails(read_only), None) == 2
    assert capsys.readouterr().err == (
        "error: [Errno 13] Permission denied: 'run/curves.png'; fix the permissions or free space there, "
        'then run the command again\n'
    )
    assert run_command(fails(OSError(28, 'No space left on device')), None) == 2
    with pytest.raises(OSError, match='Input/output error'):  # not something the user can fix: the traceback
        run_command(fails(OSError(5, 'Input/output error')), None)
