"""The converter: exact round trips, one complete report for bad state dicts, and the command's bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import timm
import torch
from helpers import FP32_RTOL, randomize_, relative_error
from safetensors.numpy import load_file, save_file

import nfnet_jax
from convert import from_timm as cli
from convert.from_timm import convert_state_dict, from_timm, unwrap_state_dict
from nfnet_jax.models.configs import model_cfgs
from nfnet_jax.models.nfnet import abstract_model
from nfnet_jax.weights import (
    CheckpointError,
    StateMismatchError,
    param_shapes,
    read_checkpoint_metadata,
    read_timm_checkpoint,
    save_checkpoint,
    to_timm,
)


def timm_state_dict(name: str, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    model = timm.create_model(name, **kwargs)
    randomize_(model, seed)
    return {key: value.numpy() for key, value in model.state_dict().items()}


def meta_state_dict(name: str) -> dict[str, np.ndarray]:
    """Right keys and shapes, no memory: for checks that never look at values."""
    model = timm.create_model(name, device='meta')
    return {key: np.broadcast_to(np.float32(0), value.shape) for key, value in model.state_dict().items()}


@pytest.fixture(scope='module')
def test_nfnet_sd() -> dict[str, np.ndarray]:
    return timm_state_dict('test_nfnet')


@pytest.mark.parametrize('name', ['test_nfnet', 'dm_nfnet_f0', 'nf_ecaresnet26', 'nf_regnet_b0', 'nf_seresnet26'])
def test_round_trip_is_bit_exact(name):
    state_dict = timm_state_dict(name)
    params = convert_state_dict(state_dict, name)
    back = to_timm(params)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert np.array_equal(back[key], value), key


def test_round_trip_keeps_bfloat16_bits():
    model = timm.create_model('test_nfnet').to(torch.bfloat16)
    randomize_(model)
    params = convert_state_dict(model.state_dict(), 'test_nfnet')
    assert params['stem.conv1.kernel'].dtype == ml_dtypes.bfloat16
    back = to_timm(params)
    for key, value in model.state_dict().items():
        assert np.array_equal(back[key].view(np.int16), value.view(torch.int16).numpy()), key


def test_to_timm_of_a_model_loads_into_timm(test_nfnet_sd, rng):
    ours = nfnet_jax.create_model('test_nfnet', params=convert_state_dict(test_nfnet_sd, 'test_nfnet'))
    theirs = timm.create_model('test_nfnet').eval()
    theirs.load_state_dict({key: torch.from_numpy(value) for key, value in to_timm(ours).items()})
    x = rng.standard_normal((2, 40, 36, 3)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert relative_error(ours(x), expected) <= FP32_RTOL


def test_another_architecture_is_reported_completely():
    with pytest.raises(StateMismatchError) as info:
        convert_state_dict(meta_state_dict('eca_nfnet_l0'), 'nfnet_l0')
    err = info.value
    assert 'stages.0.0.attn_last.fc1.weight' in err.missing  # nfnet_l0 has SE ...
    assert 'stages.0.0.attn_last.conv.weight' in err.unexpected  # ... eca_nfnet_l0 has ECA
    assert len(err.missing) == 4 * 12 and len(err.unexpected) == 12  # fc1/fc2 weight+bias of 12 blocks; 12 ECA convs
    assert 'stages.0.0.attn_last.fc1.weight' in str(err) and 'stages.3.2.attn_last.conv.weight' in str(err)


def test_other_num_classes_and_truncation_are_reported_with_a_hint(test_nfnet_sd):
    ten_classes = dict(test_nfnet_sd, **{'head.fc.weight': np.zeros((10, 192), np.float32)})
    del ten_classes['head.fc.bias'], ten_classes['stem.conv2.gain']
    with pytest.raises(StateMismatchError) as info:
        convert_state_dict(ten_classes, 'test_nfnet')
    assert info.value.missing == ['head.fc.bias', 'stem.conv2.gain']
    assert info.value.misshaped == ['head.fc.weight: got (10, 192), expected (1000, 192)']
    assert 'num_classes=10' in str(info.value)
    params = convert_state_dict(
        dict(
            ten_classes,
            **{'head.fc.bias': np.zeros(10, np.float32), 'stem.conv2.gain': test_nfnet_sd['stem.conv2.gain']},
        ),
        'test_nfnet',
        num_classes=10,
    )
    assert params['head.fc.kernel'].shape == (192, 10)


def test_training_checkpoints_unwrap_and_strip_module_prefix(test_nfnet_sd):
    ema = {f'module.{key}': value + 1 for key, value in test_nfnet_sd.items()}
    checkpoint = {'epoch': 3, 'state_dict': test_nfnet_sd, 'state_dict_ema': ema}
    assert unwrap_state_dict(checkpoint).keys() == test_nfnet_sd.keys()
    np.testing.assert_array_equal(
        unwrap_state_dict(checkpoint, use_ema=True)['head.fc.bias'], ema['module.head.fc.bias']
    )
    with pytest.raises(CheckpointError, match='no EMA weights'):
        unwrap_state_dict({'state_dict': test_nfnet_sd}, use_ema=True)


def test_from_timm_copies_head_pooling_and_drop_rates():
    theirs = timm.create_model('test_nfnet', num_classes=4, global_pool='max', drop_rate=0.2, drop_path_rate=0.1)
    ours = from_timm(theirs)
    assert (ours.num_classes, ours.global_pool, ours.head.drop.rate) == (4, 'max', 0.2)
    assert ours.stages[3][0].drop_path.rate == pytest.approx(0.1)


# --- the command -----------------------------------------------------------------------------------


def run(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def test_command_converts_verifies_and_writes_metadata(tmp_path, capsys):
    out = tmp_path / 'test_nfnet.safetensors'
    assert run('test_nfnet', '-o', out, '--verify') == 0
    report = capsys.readouterr().out
    assert 'verify OK' in report and 'final_conv' in report and 'logits' in report
    params, metadata = nfnet_jax.read_checkpoint(out)
    assert metadata['architecture'] == 'test_nfnet' and metadata['num_classes'] == '1000'
    assert metadata['timm_version'] == timm.__version__ and 'random init' in metadata['source']
    assert len(params) == len(timm.create_model('test_nfnet', device='meta').state_dict())
    model = nfnet_jax.load_checkpoint(out)
    assert model.pretrained_cfg.name == 'test_nfnet.r160_in1k'


def test_command_reads_pth_training_checkpoints(tmp_path, test_nfnet_sd, rng):
    ema = {key: value * 0.5 for key, value in test_nfnet_sd.items()}
    path = tmp_path / 'train.pth'
    torch.save(
        {
            'epoch': 1,
            'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in test_nfnet_sd.items()},
            'state_dict_ema': {k: torch.from_numpy(v) for k, v in ema.items()},
        },
        path,
    )
    assert run('test_nfnet', '--checkpoint', path, '-o', tmp_path / 'a.safetensors') == 0
    assert run('test_nfnet', '--checkpoint', path, '--ema', '-o', tmp_path / 'ema.safetensors') == 0
    plain = load_file(tmp_path / 'a.safetensors')
    np.testing.assert_array_equal(plain['head.fc.bias'], test_nfnet_sd['head.fc.bias'])
    np.testing.assert_array_equal(load_file(tmp_path / 'ema.safetensors')['head.fc.bias'], ema['head.fc.bias'])


def test_command_reads_timm_safetensors_with_other_num_classes(tmp_path):
    source = tmp_path / 'model.safetensors'
    save_file(timm_state_dict('test_nfnet', num_classes=7), source)
    out = tmp_path / 'out.safetensors'
    assert run('test_nfnet', '--checkpoint', source, '-o', out) == 2
    assert not out.exists()
    assert run('test_nfnet', '--checkpoint', source, '--num-classes', '7', '-o', out) == 0
    assert nfnet_jax.load_checkpoint(out).num_classes == 7


def test_existing_output_is_never_replaced_without_force(tmp_path, capsys):
    out = tmp_path / 'mine.safetensors'
    out.write_bytes(b'precious')
    assert run('test_nfnet', '-o', out) == 2
    assert 'already exists' in capsys.readouterr().err and out.read_bytes() == b'precious'
    assert run('test_nfnet', '-o', out, '--force') == 0
    assert nfnet_jax.read_checkpoint(out)[1]['architecture'] == 'test_nfnet'


@pytest.mark.parametrize(
    'argv,message',
    [
        (('nfnet_f9',), "unknown model 'nfnet_f9'; did you mean nfnet_f"),
        (('nfnet_l0.in22k',), 'it has: nfnet_l0.ra2_in1k'),
        (('test_nfnet', '--checkpoint', 'missing.pth'), 'no checkpoint at missing.pth'),
        (('test_nfnet', '--num-classes', '-5'), '--num-classes must be 0 or more'),
        (('test_nfnet', '--checkpoint', 'weights.npz'), 'weights.npz is neither a torch checkpoint'),
    ],
)
def test_bad_names_and_paths_fail_fast(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'weights.npz').write_bytes(b'x')
    assert run(*argv, '-o', 'out.safetensors') == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out.safetensors').exists()


def test_output_must_be_safetensors(tmp_path, capsys):
    assert run('test_nfnet', '-o', tmp_path / 'model.pth') == 2
    assert 'must be a .safetensors file' in capsys.readouterr().err


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_corrupt_checkpoints_fail_cleanly(tmp_path, capsys, test_nfnet_sd, suffix):
    good = tmp_path / f'good{suffix}'
    if suffix == '.safetensors':
        save_file(test_nfnet_sd, good)
    else:
        torch.save({k: torch.from_numpy(v) for k, v in test_nfnet_sd.items()}, good)
    bad = tmp_path / f'bad{suffix}'
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert run('test_nfnet', '--checkpoint', bad, '-o', tmp_path / 'out.safetensors') == 2
    err = capsys.readouterr().err
    assert 'corrupt or truncated' in err and 'Traceback' not in err
    assert not (tmp_path / 'out.safetensors').exists()


def test_pth_files_are_never_unpickled_as_code(tmp_path, capsys):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'x': torch.zeros(1)}, 'hook': print}, path)  # a callable needs full unpickling
    assert run('test_nfnet', '--checkpoint', path, '-o', tmp_path / 'out.safetensors') == 2
    err = capsys.readouterr().err
    assert 'holds builtins.print: objects other than tensors' in err
    assert 'weights_only' not in err  # torch's advice to unpickle anyway is never passed on


def timm_training_checkpoint(state_dict: dict[str, np.ndarray], ema: dict[str, np.ndarray] | None) -> dict:
    """What timm's train.py saves (`CheckpointSaver.save_checkpoint`): weights, EMA and the run beside them."""
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(3)
    optimizer.step()
    checkpoint = {
        'epoch': 7,
        'arch': 'normfreenet',
        'arch_name': 'test_nfnet',
        'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in state_dict.items()},
        'optimizer': optimizer.state_dict(),
        'version': 2,
        'args': argparse.Namespace(model='test_nfnet', lr=np.float64(0.1), mean=np.array([0.5, 0.5]), amp=True),
        'metric': np.float64(71.25),
    }
    if ema is not None:
        checkpoint['state_dict_ema'] = {k: torch.from_numpy(v) for k, v in ema.items()}
    return checkpoint


@pytest.mark.parametrize(
    'name,legacy',
    [
        ('model_best.pth.tar', False),
        ('checkpoint-7.pth.tar', True),
        ('last.tar', False),
        ('pytorch_model.bin', False),
        ('run.ckpt', False),
        ('weights.pt', True),
        ('no_suffix_at_all', False),
    ],
)
def test_timm_training_checkpoints_of_every_name_and_format(tmp_path, test_nfnet_sd, name, legacy):
    ema = {key: value * 0.5 for key, value in test_nfnet_sd.items()}
    path = tmp_path / name
    torch.save(timm_training_checkpoint(test_nfnet_sd, ema), path, _use_new_zipfile_serialization=not legacy)
    plain, averaged = read_timm_checkpoint(path), read_timm_checkpoint(path, use_ema=True)
    np.testing.assert_array_equal(plain['head.fc.bias'], test_nfnet_sd['head.fc.bias'])
    np.testing.assert_array_equal(averaged['head.fc.bias'], ema['head.fc.bias'])


def test_checkpoints_are_read_by_content_not_name(tmp_path, capsys, test_nfnet_sd):
    disguised = tmp_path / 'model.pth'  # a safetensors file under a torch name
    save_file(test_nfnet_sd, disguised)
    np.testing.assert_array_equal(read_timm_checkpoint(disguised)['head.fc.bias'], test_nfnet_sd['head.fc.bias'])
    pickled = tmp_path / 'model.safetensors'  # and a torch file under a safetensors name
    torch.save({k: torch.from_numpy(v) for k, v in test_nfnet_sd.items()}, pickled)
    np.testing.assert_array_equal(read_timm_checkpoint(pickled)['head.fc.bias'], test_nfnet_sd['head.fc.bias'])


def test_ema_only_checkpoint_asks_for_ema(tmp_path, capsys, test_nfnet_sd):
    checkpoint = timm_training_checkpoint(test_nfnet_sd, test_nfnet_sd)
    del checkpoint['state_dict']
    path = tmp_path / 'model_best.pth.tar'
    torch.save(checkpoint, path)
    assert run('test_nfnet', '--checkpoint', path, '-o', tmp_path / 'out.safetensors') == 2
    assert 'holds only EMA weights (state_dict_ema): pass --ema' in capsys.readouterr().err
    assert run('test_nfnet', '--checkpoint', path, '--ema', '-o', tmp_path / 'out.safetensors') == 0


def test_load_checkpoint_of_a_torch_file_says_convert(tmp_path, test_nfnet_sd):
    path = tmp_path / 'model_best.pth.tar'
    torch.save(timm_training_checkpoint(test_nfnet_sd, None), path)
    with pytest.raises(CheckpointError, match='is a torch/timm checkpoint.*python -m convert.from_timm'):
        nfnet_jax.load_checkpoint(path)


def test_another_architecture_writes_nothing(tmp_path, capsys):
    source = tmp_path / 'resnet.safetensors'
    save_file(timm_state_dict('nf_resnet26'), source)
    assert run('test_nfnet', '--checkpoint', source, '-o', tmp_path / 'out.safetensors') == 2
    err = capsys.readouterr().err
    assert 'another architecture' in err and 'missing: stem.conv1.weight' in err
    assert list(tmp_path.iterdir()) == [source]


def test_failed_verification_leaves_no_file(tmp_path, capsys, monkeypatch):
    real = cli.convert_state_dict

    def broken(state_dict, name, **kwargs):
        params = real(state_dict, name, **kwargs)
        # A flipped stem kernel: on the main path, which timm's fresh init (silent residual branches) keeps.
        params['stem.conv1.kernel'] = params['stem.conv1.kernel'][::-1].copy()
        return params

    monkeypatch.setattr(cli, 'convert_state_dict', broken)
    assert run('test_nfnet', '-o', tmp_path / 'out.safetensors', '--verify') == 2
    captured = capsys.readouterr()
    assert 'verify FAILED' in captured.out and 'verification failed' in captured.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_hub_unreachable_points_to_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty-cache'))
    assert run('test_nfnet.r160_in1k', '-o', tmp_path / 'out.safetensors') == 2
    assert '--checkpoint PATH' in capsys.readouterr().err


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    out = tmp_path / 'tiny.safetensors'
    assert run('test_nfnet', '-o', out) == 0
    with pytest.raises(CheckpointError, match='holds test_nfnet, not nfnet_l0'):
        nfnet_jax.create_model('nfnet_l0', checkpoint_path=out)
    with pytest.raises(CheckpointError, match='not an nfnet_jax checkpoint'):
        nfnet_jax.load_checkpoint(_timm_file(tmp_path))


def random_checkpoint(path, seed: int = 0):
    shapes = param_shapes(abstract_model(model_cfgs['test_nfnet']))
    rng = np.random.default_rng(seed)
    params = {key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}
    save_checkpoint(path, params, architecture='test_nfnet', num_classes=1000, global_pool='avg')
    return params


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    path = tmp_path / 'model.safetensors'
    params = random_checkpoint(path)
    metadata = read_checkpoint_metadata(path)
    assert json.loads(metadata['tensor_sha256']).keys() == params.keys()
    old = tmp_path / 'old.safetensors'  # as written before checksums were saved: loads, unchecked
    save_file(params, old, metadata={k: v for k, v in metadata.items() if k != 'tensor_sha256'})
    assert nfnet_jax.load_checkpoint(old).num_classes == 1000

    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(data)
    for load in (
        nfnet_jax.read_checkpoint,
        nfnet_jax.load_checkpoint,
        lambda p: nfnet_jax.create_model('test_nfnet', checkpoint_path=p),
    ):
        with pytest.raises(CheckpointError, match=rf'{path} is damaged: 1 tensors differ from the checksums saved'):
            load(path)
    assert nfnet_jax.read_checkpoint(path, verify=False)[0].keys() == params.keys()


@pytest.mark.parametrize(
    'edit,message',
    [
        ({'num_classes': 'abc'}, 'no valid head description'),
        ({'architecture': None}, 'names no architecture'),
        ({'architecture': 'resnet50'}, "names an unknown architecture 'resnet50'"),
        ({'tensor_sha256': '{not json'}, 'tensor_sha256 metadata is not readable'),
    ],
)
def test_hand_edited_metadata_is_a_checkpoint_error(tmp_path, edit, message):
    path = tmp_path / 'model.safetensors'
    params = random_checkpoint(path)
    metadata = {k: v for k, v in (read_checkpoint_metadata(path) | edit).items() if v is not None}
    save_file(params, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=message):
        nfnet_jax.load_checkpoint(path)


def _timm_file(tmp_path):
    path = tmp_path / 'timm.safetensors'
    save_file({'w': np.zeros(2, np.float32)}, path)
    return path


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'convert.from_timm', 'nfnet_l9', '-o', str(tmp_path / 'x.safetensors')],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "unknown model 'nfnet_l9'; did you mean nfnet_l0" in result.stderr
    assert 'Warning' not in result.stderr
