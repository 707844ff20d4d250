"""nfnet_jax.parallel: sharded inference and training equal the single-device results, on one and two processes.

The JAX work runs in children (tests/parallel_worker.py), one topology each:
- 1 process x 8 host devices: the single-device references (on device 0); meshes 8x1 and 2x4
  (data x model) for inference; 8x1 data parallel and 4x2 FSDP (params split along both axes)
  for a training step and an eval step; `create_sharded`;
- 2 processes x 2 devices (gloo collectives on loopback): mesh 2x2, inference and an FSDP step,
  each process feeding only its half of the batch; then the same with process 1 failing.
Figures: relative error = max|sharded - single device| / max|single device| (conftest's),
the worst over every output array, or over every state array (params, momentum, EMA, RNG keys);
test_nfnet with every param randomised, dropout and drop path on.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import relative_error
from multihost import ROOT, free_port, run_processes

from nfnet_jax import parallel

pytestmark = pytest.mark.slow  # every test here starts processes of 8 or 2 devices

WORKER = str(ROOT / 'tests' / 'parallel_worker.py')
INFERENCE_RTOL = 1e-5
# A training step sums gradients in another order on each layout; the worst array is a gain's
# momentum (its gradient sums over batch and pixels with cancellation): 1e-5 to 2.5e-5 measured.
STATE_RTOL = 1e-4
LOSS_RTOL = 1e-6
# Only against a hung collective: the 8-device run takes ~140 s on an idle 2-core machine, more under load.
DEADLINE_S = 600
OUTPUTS = ('logits', 'embeddings', 'features')


def load(folder: Path, name: str) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(folder / f'{name}.npz') as arrays:
        return dict(arrays), json.loads((folder / f'{name}.json').read_text())


def worst(ours: dict, reference: dict, prefix: str, rows: slice | None = None) -> float:
    """The largest relative error over the arrays `prefix.*` (`rows` of the reference's outputs)."""
    keys = [key for key in reference if key.startswith(prefix + '.')]
    assert keys and all(key in ours for key in keys)
    return max(relative_error(ours[key], reference[key] if rows is None else reference[key][rows]) for key in keys)


@pytest.fixture(scope='module')
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('one_process')
    [run] = run_processes([['python', WORKER, 'devices', str(out)]], devices=8, timeout=DEADLINE_S)
    assert run.returncode == 0, run.output[-3000:]
    return out


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory) -> Path:
    out, port = tmp_path_factory.mktemp('two_processes'), free_port()
    runs = run_processes([['python', WORKER, 'process', str(out), str(port), str(i)] for i in range(2)], 2, DEADLINE_S)
    for run in runs:
        assert run.returncode == 0, run.output[-3000:]
    return out


def check_train_step(
    ours: dict[str, np.ndarray], facts: dict, reference: dict[str, np.ndarray], fsdp: bool, record, label: str
) -> None:
    assert facts['step'] == 1
    state_error = worst(ours, reference, 'state')
    record('figure', (f'{label}: whole train state after one step vs one device', state_error))
    assert state_error < STATE_RTOL
    assert relative_error(ours['loss'], reference['loss']) < LOSS_RTOL
    assert relative_error(ours['eval_loss'], reference['eval_loss']) < LOSS_RTOL
    assert facts['shardings_kept']  # the step returns the state with the shardings it was given
    assert (facts['sharded_params'] > 0) == fsdp
    assert (facts['sharded_optimizer_state'] > 0) == fsdp


def test_sharded_inference_on_8_devices_equals_one_device(one_process, record_property):
    reference, _ = load(one_process, 'single')
    for topology, split in (('8x1', False), ('2x4', True)):
        ours, facts = load(one_process, f'inference {topology}')
        assert facts['devices'] == 8
        assert (facts['sharded_params'] > 0) == split  # 2x4: kernels split over the 4 'model' devices
        for name in OUTPUTS if split else OUTPUTS[:1]:
            error = worst(ours, reference, name)
            record_property('figure', (f'1 process x 8 devices, mesh {topology}: {name} vs one device', error))
            assert error < INFERENCE_RTOL, (topology, name)


def test_data_parallel_and_fsdp_steps_on_8_devices_equal_one_device(one_process, record_property):
    reference, _ = load(one_process, 'single')
    check_train_step(*load(one_process, 'train 8x1'), reference, False, record_property, 'data parallel, mesh 8x1')
    check_train_step(*load(one_process, 'train 4x2'), reference, True, record_property, 'FSDP, mesh 4x2')


def test_create_sharded_builds_the_same_state_in_shards(one_process):
    arrays, facts = load(one_process, 'create_sharded')
    assert facts['sharded_params'] > 0
    built = {key.replace('built.', 'state.'): value for key, value in arrays.items() if key.startswith('built.')}
    single = {key.replace('single.', 'state.'): value for key, value in arrays.items() if key.startswith('single.')}
    assert worst(built, single, 'state') < LOSS_RTOL


def test_two_processes_equal_one_device(one_process, two_processes, record_property):
    """Each process fed half the batch: its rows of every output, and the whole state after the step."""
    reference, _ = load(one_process, 'single')
    for rank in range(2):
        ours, facts = load(two_processes, f'process {rank}')
        assert (facts['devices'], facts['processes'], facts['process']) == (4, 2, rank)
        rows = slice(*facts['rows'])
        assert facts['inference']['sharded_params'] > 0
        for name in OUTPUTS:
            error = worst(ours, reference, name, rows)
            record_property('figure', (f'2 processes x 2 devices, process {rank}: {name} vs one device', error))
            assert error < INFERENCE_RTOL, (rank, name)
        label = f'2 processes x 2 devices, FSDP, process {rank}'
        check_train_step(ours, facts['train'], reference, True, record_property, label)


def test_a_failing_process_ends_both_processes(tmp_path):
    """Process 1 dies before the first collective; process 0 must stop on its own, not hang."""
    port = free_port()
    commands = [['python', WORKER, 'process', str(tmp_path), str(port), str(i), '--fail'] for i in range(2)]
    runs = run_processes(commands, devices=2, timeout=120)
    assert runs[1].returncode not in (0, None) and 'fails on purpose' in runs[1].output
    # Not killed by our deadline: the distributed runtime ended it (30 s timeouts in the worker).
    assert runs[0].returncode not in (0, None), runs[0].output[-3000:]
    assert not list(tmp_path.glob('*.npz'))


@pytest.mark.parametrize(
    ('shape', 'axes', 'min_size', 'spec'),
    [
        ((3, 3, 64, 128), ('model',), 0, (None, None, None, 'model')),  # output channels first
        ((3, 3, 64, 6), ('model',), 0, (None, None, 'model', None)),  # not divisible: the largest other axis
        ((3, 3, 64, 128), ('model', 'data'), 0, (None, None, 'data', 'model')),  # FSDP: another axis
        ((3, 3, 64, 128), ('model',), 10**6, ()),  # small: replicated
        ((), ('model',), 0, ()),
        ((3, 5), ('model',), 0, (None, None)),  # nothing divisible: replicated
    ],
)
def test_partition_spec(shape, axes, min_size, spec):
    mesh = FakeMesh({'data': 2, 'model': 4} if 'data' in axes else {'data': 1, 'model': 4})
    assert tuple(parallel.partition_spec(shape, mesh, axes, min_size)) == spec


class FakeMesh:
    """What partition_spec reads from a mesh: its axis sizes (this process has one device)."""

    def __init__(self, shape: dict[str, int]):
        self.shape = shape


def test_bad_mesh_and_batch_are_refused():
    with pytest.raises(ValueError, match='model_parallelism=3 must be a positive divisor'):
        parallel.make_mesh(3, devices=[object()] * 4)
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {'data': 1, 'model': 1}
    with pytest.raises(ValueError, match='batch size must be a multiple'):
        parallel.global_batch(np.float32(1), mesh)  # a scalar has no batch axis


def test_prefetch_to_device_reads_size_items_ahead_and_places_their_arrays():
    mesh = parallel.make_mesh()
    read: list[int] = []

    def items():
        for k in range(5):
            read.append(k)
            yield k, f'file{k}', (np.full((4, 2), k, np.float32), np.arange(4))

    prefetched = parallel.prefetch_to_device(items(), mesh, size=2)
    assert read == []  # nothing is read before the first item is asked for
    step, name, (images, labels) = next(prefetched)
    assert read == [0, 1]  # the first item and the one after it
    assert (step, name) == (0, 'file0')  # other leaves pass through
    assert isinstance(images, jax.Array) and images.sharding == parallel.batch_sharding(mesh)
    assert np.array_equal(images, np.zeros((4, 2))) and np.array_equal(labels, np.arange(4))
    rest = list(prefetched)
    assert [item[0] for item in rest] == [1, 2, 3, 4] and read == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match='at least 1'):
        parallel.prefetch_to_device(items(), mesh, size=0)
