"""Train mode, the recipe (optimizer, schedule, loss, EMA), mixed precision and training checkpoints.

Uses test_nfnet at 32x32; one TrainState layout (bfloat16 compute, SGD + AGC, EMA) is shared so
the jitted train step compiles once for the module.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
import timm
import torch
from flax import nnx
from helpers import leaves, make_train_state, relative_error
from timm.loss import LabelSmoothingCrossEntropy

import nfnet_jax
from nfnet_jax.inference import inference_model
from nfnet_jax.models.nfnet import NormFreeBlock
from nfnet_jax.train import (
    ModelEma,
    TrainCheckpointer,
    adaptive_clip_grad,
    cross_entropy_loss,
    nfnet_optimizer,
    train_step,
    warmup_cosine_schedule,
)
from nfnet_jax.weights import CheckpointError, StateMismatchError, clone_with_own_arrays, dotted_path, flat_params

SIZE = 32
# One optimizer for the module: it is static structure of a TrainState, so sharing it lets every
# state below reuse one compiled train step.
TX = nfnet_optimizer(warmup_cosine_schedule(0.1, 100, 5))


def batch(seed: int, n: int = 4) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, SIZE, SIZE, 3)), jnp.float32), jnp.asarray(rng.integers(0, 10, n))


def make_state(seed: int = 0, *, tx: optax.GradientTransformation | None = None, **kwargs):
    """The module's standard run (`helpers.make_train_state`) in bf16 compute, with the NFNet recipe."""
    state = make_train_state(tx or TX, seed=seed, **({'dtype': jnp.bfloat16} | kwargs))
    # Committed to the device, as restored checkpoints are: one compiled train step serves both.
    nnx.update(state, jax.device_put(nnx.state(state), jax.devices()[0]))
    return state


def assert_bitwise_equal(a, b) -> None:
    for x, y in zip(map(np.asarray, leaves(a)), map(np.asarray, leaves(b)), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


# ---------------------------------------------------------------- train mode


def test_train_mode_is_random_and_eval_mode_is_deterministic():
    x, _ = batch(0, n=8)
    model = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0, dropout=1), drop_rate=0.5, drop_path_rate=0.5)
    same_seed = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0, dropout=1), drop_rate=0.5, drop_path_rate=0.5)
    other_seed = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0, dropout=2), drop_rate=0.5, drop_path_rate=0.5)
    forward = nnx.jit(lambda m, x: m(x))  # one compilation per mode

    evaluated = forward(model, x)
    np.testing.assert_array_equal(forward(model, x), evaluated)
    np.testing.assert_array_equal(forward(other_seed, x), evaluated)  # the dropout seed does not matter in eval

    for m in (model, same_seed, other_seed):
        m.train()
    first, second = forward(model, x), forward(model, x)
    assert not np.allclose(first, second), 'each train-mode call draws new masks'
    assert not np.allclose(first, evaluated)
    np.testing.assert_array_equal(forward(same_seed, x), first)  # the same seed, the same masks
    assert not np.allclose(forward(other_seed, x), first)

    model.eval()
    np.testing.assert_array_equal(forward(model, x), evaluated)


def test_drop_path_rates_per_block_equal_timms():
    theirs = timm.create_model('test_nfnet', drop_path_rate=0.3)
    expected = [getattr(b.drop_path, 'drop_prob', 0.0) for stage in theirs.stages for b in stage]  # Identity at 0
    ours = nfnet_jax.create_model('test_nfnet', drop_path_rate=0.3)
    got = [b.drop_path.rate if b.drop_path is not None else 0.0 for stage in ours.stages for b in stage]
    assert got == pytest.approx(expected, abs=1e-7)
    assert len(set(got)) == len(got) > 2


def test_drop_path_drops_whole_residual_branches_with_the_right_rate():
    """A block in train mode: out = alpha * branch * mask / keep + shortcut, mask ~ Bernoulli(keep) per sample."""
    block = NormFreeBlock(
        8,
        8,
        alpha=0.2,
        act_layer=lambda: nfnet_jax.models.layers.GammaAct('relu'),
        conv_layer=nfnet_jax.models.layers.ScaledStdConv2d,
        skipinit=True,
        drop_path_rate=0.25,
        rngs=nnx.Rngs(0, dropout=1),
    )
    block.skipinit_gain[...] = jnp.ones(())
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4000, 3, 3, 8)), jnp.float32)
    branch = np.asarray(block(x) - x)  # eval mode: alpha * branch
    block.train()
    dropped = np.asarray(block(x) - x)
    kept = np.abs(dropped).reshape(4000, -1).max(axis=1) > 0
    assert abs(kept.mean() - 0.75) < 0.02  # 4000 samples: the standard error is 0.007
    np.testing.assert_allclose(dropped[kept], branch[kept] / 0.75, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- recipe


def test_label_smoothing_loss_equals_timms():
    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((16, 10)).astype(np.float32) * 3, rng.integers(0, 10, 16)
    expected = LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    got = cross_entropy_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), 0.1)
    assert got.dtype == jnp.float32
    assert float(cross_entropy_loss(jnp.asarray(logits), jnp.asarray(labels), 0.1)) == pytest.approx(expected, rel=1e-6)


def test_sgd_nesterov_with_weight_decay_equals_torch():
    """Without AGC the recipe is torch's SGD(momentum=0.9, nesterov=True, weight_decay) on decayed params."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)]
    theirs = torch.nn.Parameter(torch.from_numpy(weight.copy()))
    torch_opt = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    tx = nfnet_optimizer(0.1, weight_decay=0.01, clip_factor=None)
    params = {'conv': {'kernel': jnp.asarray(weight)}}
    opt_state = tx.init(params)
    for g in grads:
        theirs.grad = torch.from_numpy(g)
        torch_opt.step()
        updates, opt_state = tx.update({'conv': {'kernel': jnp.asarray(g)}}, opt_state, params)
        params = optax.apply_updates(params, updates)
    assert relative_error(params['conv']['kernel'], theirs.detach().numpy()) < 1e-6


def test_weight_decay_skips_gains_and_biases_and_agc_skips_the_classifier():
    ones = jnp.ones((3, 3, 2, 4))
    params = {
        'stages': {
            0: {0: {'conv1': {'kernel': ones, 'bias': jnp.ones(4), 'gain': jnp.ones(4)}, 'skipinit_gain': jnp.ones(())}}
        },
        'head': {'fc': {'kernel': jnp.ones((4, 10)), 'bias': jnp.ones(10)}},
    }
    tx = nfnet_optimizer(1.0, momentum=0.0, weight_decay=0.5, clip_factor=0.01)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    block = updates['stages'][0][0]
    np.testing.assert_allclose(block['conv1']['kernel'], -0.5 * ones)  # decayed
    np.testing.assert_allclose(updates['head']['fc']['kernel'], -0.5)  # the classifier's weights are decayed too
    for no_decay in (
        block['conv1']['bias'],
        block['conv1']['gain'],
        block['skipinit_gain'],
        updates['head']['fc']['bias'],
    ):
        np.testing.assert_array_equal(no_decay, 0.0)

    huge = jax.tree.map(lambda p: 1e3 * p, params)
    clipped, _ = adaptive_clip_grad(0.01).update(huge, None, params)
    np.testing.assert_array_equal(clipped['head']['fc']['kernel'], huge['head']['fc']['kernel'])  # excluded
    # per output unit of the HWIO kernel: ||g|| becomes 0.01 * ||p|| = 0.01 * sqrt(18)
    norms = np.linalg.norm(np.asarray(clipped['stages'][0][0]['conv1']['kernel']).reshape(-1, 4), axis=0)
    np.testing.assert_allclose(norms, 0.01 * np.sqrt(18), rtol=1e-6)
    np.testing.assert_allclose(clipped['stages'][0][0]['conv1']['gain'], 0.01)  # per element: |g| = 0.01 * |p|
    np.testing.assert_allclose(np.linalg.norm(clipped['stages'][0][0]['conv1']['bias']), 0.01 * 2, rtol=1e-6)


def test_warmup_cosine_schedule():
    schedule = warmup_cosine_schedule(0.4, total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.2)
    assert float(schedule(10)) == pytest.approx(0.4)
    assert float(schedule(60)) == pytest.approx(0.2, rel=1e-5)  # half way through the cosine
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match='warmup_steps'):
        warmup_cosine_schedule(0.4, total_steps=10, warmup_steps=10)


def test_ema_follows_the_formula():
    model = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0))
    ema = ModelEma(model, decay=0.9, warmup=False)
    start = flat_params(ema.model)  # numpy copies: nnx.state views the live variables
    nnx.update(model, jax.tree.map(lambda p: p + 1.0, nnx.state(model, nnx.Param)))
    ema.update(model, step=jnp.asarray(0))
    got = flat_params(ema.model)
    for path, value in start.items():
        np.testing.assert_allclose(got[path], value + 0.1, rtol=1e-6, atol=1e-6)
    assert float(ModelEma(model, 0.999).current_decay(jnp.asarray(0))) == pytest.approx(0.1)  # warmup: (1+0)/(10+0)


# ---------------------------------------------------------------- mixed precision and the train step


@pytest.fixture(scope='module')
def trained():
    """A state after two bf16 steps, with what it took to get there."""
    state = make_state()
    before = flat_params(state.model)
    metrics = [train_step(state, *batch(step), label_smoothing=0.1) for step in range(2)]
    return state, before, metrics


def test_mixed_precision_keeps_params_optimizer_state_and_loss_in_float32(trained):
    state, _, metrics = trained
    x, labels = batch(0)
    # Traced only (eval_shape): the dtypes, not the values, are under test.
    features, logits = nnx.eval_shape(lambda m: (m.forward_features(x), m(x)), state.model)
    assert features.dtype == logits.dtype == jnp.bfloat16  # the compute
    grads = nnx.eval_shape(lambda m: nnx.grad(lambda m: cross_entropy_loss(m(x), labels))(m), state.model)
    for name, tree in {
        'params': nnx.state(state.model, nnx.Param),
        'gradients': grads,
        'optimizer moments': nnx.state(state.optimizer, nnx.OptVariable),
        'EMA': nnx.state(state.ema, nnx.Param),
    }.items():
        dtypes = {x.dtype for x in jax.tree.leaves(tree)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (name, dtypes)
    assert all(m['loss'].dtype == jnp.float32 for m in metrics)


def test_train_step_updates_params_ema_and_step(trained):
    state, before, _ = trained
    assert state.step == 2
    after, ema = flat_params(state.model), flat_params(state.ema.model)
    for path in before:
        if path.endswith('kernel'):  # every weight moved, and the EMA lags behind
            assert not np.array_equal(before[path], after[path]), path
            assert not np.array_equal(ema[path], after[path]), path


def test_the_step_donates_the_state_and_copies_made_before_it_keep_their_arrays():
    """The state's arrays go to the step (JAX deletes them); an EMA and a folded model own theirs."""
    state = make_state()
    taken = jax.tree.leaves(nnx.state(state.model, nnx.Param))
    folded = inference_model(state.model)
    train_step(state, *batch(0), label_smoothing=0.1)  # the `trained` fixture's program: no new compile
    assert all(x.is_deleted() for x in taken)
    assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(folded)))
    assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(state)))


def test_the_state_stays_split_between_steps_and_is_split_again_when_its_structure_changes(monkeypatch):
    """Once split, a step walks no graph (no nnx.split / nnx.update) and compiles once; a mode switch or a replaced
    Variable is seen: the state is split again and the step runs with its new structure (the new head trains)."""
    from nfnet_jax import cpu
    from nfnet_jax.train.step import train_steps

    # Dropout and drop path on; arrays not committed to a device, as a fresh model's are.
    state = make_train_state(TX, dtype=jnp.bfloat16)
    x, labels = jax.device_put(batch(0), jax.devices()[0])
    train_step(state, x, labels, label_smoothing=0.1)  # the first call splits (the `trained` fixture's program)
    cache = train_steps(cpu.enabled(), 0.1)
    kept, jitted = cache(state)
    programs = jitted._cache_size()
    with monkeypatch.context() as patched:
        for walk in ('split', 'update', 'state', 'graphdef'):
            patched.setattr(nnx, walk, lambda *a, walk=walk, **k: pytest.fail(f'a step called nnx.{walk}'))
        for _ in range(2):
            before = np.asarray(state.model.head.fc.kernel[...])
            train_step(state, x, labels, label_smoothing=0.1)
            assert not np.array_equal(before, state.model.head.fc.kernel[...])  # updated in place
    assert cache(state)[0] is kept and state.step == 3
    assert jitted._cache_size() == programs  # a fresh state is committed as the step's outputs are: no new program
    state.model.eval()  # dropout off: another GraphDef
    assert cache(state)[0] is not kept and cache(state)[0].graphdef != kept.graphdef
    state.model.train()
    kept = cache(state)[0]
    state.model.head.fc.kernel = nnx.Param(jnp.zeros_like(state.model.head.fc.kernel[...]))  # a Variable replaced
    train_step(state, x, labels, label_smoothing=0.1)
    assert cache(state)[0] is not kept and np.any(state.model.head.fc.kernel[...] != 0)


def test_bfloat16_compute_follows_float32():
    """The same weights in bf16 and f32 give close logits and loss: bf16 changes the rounding, not the math."""
    x, labels = batch(0)
    f32 = nfnet_jax.create_model('test_nfnet', num_classes=10, rngs=nnx.Rngs(0))
    bf16 = nfnet_jax.create_model('test_nfnet', num_classes=10, dtype=jnp.bfloat16, params=flat_params(f32))
    forward = nnx.jit(lambda m, x: m(x))
    logits_bf16, logits_f32 = forward(bf16, x), forward(f32, x)
    assert logits_bf16.dtype == jnp.bfloat16
    assert relative_error(logits_bf16, logits_f32) < 3e-2
    loss_bf16, loss_f32 = (float(cross_entropy_loss(logits, labels)) for logits in (logits_bf16, logits_f32))
    assert loss_bf16 == pytest.approx(loss_f32, rel=1e-2)


# ---------------------------------------------------------------- checkpoints


def directory_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob('*'))
        if p.is_file()
    }


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory, trained):
    """A run directory holding the state of `trained` at step 2."""
    state, _, _ = trained
    directory = tmp_path_factory.mktemp('run')
    with TrainCheckpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(state)
    return directory


class BackgroundSaveFailed:
    """An orbax manager whose last save failed in its threads: `close` re-raises it, as tensorstore words it."""

    def close(self) -> None:
        raise ValueError('PERMISSION_DENIED: Error writing local file "10.orbax-checkpoint-tmp/state/_sharding"')


def test_a_background_save_that_failed_is_one_error_at_close_and_never_hides_the_first(tmp_path):
    from nfnet_jax.train.checkpoint import CheckpointSaveError

    checkpointer = TrainCheckpointer(tmp_path / 'a')
    checkpointer._manager.close()
    checkpointer._manager, checkpointer._saving = BackgroundSaveFailed(), 10
    with pytest.raises(CheckpointSaveError, match=r'could not save checkpoint step 10 in .* \(PERMISSION_DENIED'):
        checkpointer.close()
    # The run's first error is the one told.
    with pytest.raises(PermissionError, match='curves.png'), TrainCheckpointer(tmp_path / 'b') as checkpointer:
        checkpointer._manager.close()
        checkpointer._manager, checkpointer._saving = BackgroundSaveFailed(), 10
        raise PermissionError(13, 'Permission denied', 'curves.png')


def test_a_resumed_run_takes_the_identical_next_step(saved_run, trained):
    state, _, _ = trained
    resumed = make_state(seed=7)  # another init and other dropout seeds: all replaced by the restore
    with TrainCheckpointer(saved_run) as checkpointer:
        assert checkpointer.restore(resumed) == 2
    assert_bitwise_equal(nnx.state(resumed), nnx.state(state))

    x, labels = batch(2)
    continued = clone_with_own_arrays(state)
    expected = train_step(continued, x, labels, label_smoothing=0.1)
    got = train_step(resumed, x, labels, label_smoothing=0.1)
    assert float(got['loss']) == float(expected['loss'])
    assert_bitwise_equal(nnx.state(resumed), nnx.state(continued))  # params, momentum, EMA, step, RNG counts


def test_an_unfinished_save_is_never_taken_for_a_checkpoint(saved_run, tmp_path, trained):
    state, _, _ = trained
    run = tmp_path / 'run'
    shutil.copytree(saved_run, run)
    # What orbax leaves when a save of step 9 dies before its final rename: a temporary directory,
    # here with the complete files of step 2 in it (but not the rename that would make it step 9).
    shutil.copytree(run / '2', run / '9.orbax-checkpoint-tmp-1700000000000000')
    (run / '9.orbax-checkpoint-tmp-1700000000000000' / 'commit_success.txt').unlink(missing_ok=True)
    with TrainCheckpointer(run) as checkpointer:
        assert checkpointer.steps() == [2]
        assert checkpointer.restore(make_state(seed=3)) == 2
        with pytest.raises(CheckpointError, match='no finished checkpoint for step 9'):
            checkpointer.restore(make_state(seed=3), step=9)


def test_save_refuses_to_replace_a_step(saved_run, trained):
    before = directory_digest(saved_run)
    with TrainCheckpointer(saved_run) as checkpointer, pytest.raises(FileExistsError, match='step 2'):
        checkpointer.save(trained[0])
    assert directory_digest(saved_run) == before


@pytest.mark.parametrize(
    'build, message',
    [
        # Shapes only (nothing is read before the architecture is refused), so nothing is initialised.
        (lambda: nnx.eval_shape(lambda: make_state(architecture='nf_regnet_b0')), 'nf_regnet_b0'),
        (lambda: make_state(num_classes=5), '5 classes'),
        (lambda: make_state(tx=optax.adam(1e-3)), 'another optimizer'),
        (lambda: make_state(ema=None), 'another optimizer or EMA'),
    ],
    ids=['another-architecture', 'another-head', 'another-optimizer', 'no-ema'],
)
def test_a_checkpoint_that_does_not_fit_is_refused_and_left_alone(saved_run, build, message):
    state = build()
    concrete = not isinstance(jax.tree.leaves(nnx.state(state))[0], jax.ShapeDtypeStruct)
    state_before = leaves(nnx.state(state)) if concrete else None
    files_before = directory_digest(saved_run)
    with TrainCheckpointer(saved_run) as checkpointer, pytest.raises(CheckpointError, match=message) as error:
        checkpointer.restore(state)
    if isinstance(error.value, StateMismatchError):
        assert error.value.missing or error.value.unexpected or error.value.misshaped
    assert directory_digest(saved_run) == files_before
    if concrete:
        for a, b in zip(leaves(nnx.state(state)), state_before, strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_corrupt_checkpoint_gives_a_clear_error(saved_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(saved_run, run)
    data_files = [p for p in (run / '2' / 'state').rglob('*') if p.is_file() and p.stat().st_size > 1000]
    assert data_files
    for p in data_files:
        p.write_bytes(b'\0garbage' * 100)
    state = make_state(seed=5)
    state_before = leaves(nnx.state(state))
    files_before = directory_digest(run)
    with TrainCheckpointer(run) as checkpointer, pytest.raises(CheckpointError, match='corrupt'):
        checkpointer.restore(state)
    assert directory_digest(run) == files_before
    for a, b in zip(leaves(nnx.state(state)), state_before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_failed_save_raises_one_error_and_leaves_no_temporary_folder(saved_run, tmp_path, trained, monkeypatch):
    """A save that fails in orbax's background threads (here its run record cannot be written, as a full disk
    fails a write): `wait` raises one CheckpointSaveError naming the step, the temporary folder is removed, every
    later call says the same, and closing does not wait on the failed save."""
    from nfnet_jax.train import checkpoint

    run = tmp_path / 'run'
    shutil.copytree(saved_run, run)
    state = make_state(seed=4)
    for seed in range(3):  # step 3: after the saved step 2
        train_step(state, *batch(seed), label_smoothing=0.1)
    monkeypatch.setattr(checkpoint, 'state_checksums', lambda state: {'unwritable': object()})
    with TrainCheckpointer(run) as checkpointer:
        with pytest.raises(checkpoint.CheckpointSaveError) as failed:
            checkpointer.save(state)
            checkpointer.wait()
        assert str(failed.value).startswith(f'could not save checkpoint step 3 in {run} (Object of type object')
        with pytest.raises(checkpoint.CheckpointSaveError):
            checkpointer.save(state)
    assert sorted(p.name for p in run.iterdir()) == ['2']  # no 3.orbax-checkpoint-tmp


_RESTORE_DAMAGED = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_train import make_state
from nfnet_jax.train import TrainCheckpointer
from nfnet_jax.weights import CheckpointError
run = Path(sys.argv[1])
state = make_state(seed=5)
for _ in range(5):  # the reports come at random times: more tries, more chances for one
    with TrainCheckpointer(run) as checkpointer:
        try:
            checkpointer.restore(state)
        except CheckpointError as err:
            print(f'error: {{err}}'[:200], file=sys.stderr)
"""


@pytest.mark.slow
def test_a_failed_restore_says_one_thing_not_thousands(saved_run, tmp_path):
    """A real process: the reads orbax leaves running report at random times, up to the process's exit."""
    run = tmp_path / 'run'
    shutil.copytree(saved_run, run)
    for manifest in (run / '2' / 'state').rglob('manifest.ocdbt'):  # every array's read then fails
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    script = _RESTORE_DAMAGED.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, '-c', script, str(run)], capture_output=True, text=True, timeout=300)
    assert result.stderr.count('error: checkpoint step 2') == 5 and 'could not be read' in result.stderr
    assert 'Event loop is closed' not in result.stderr and 'never retrieved' not in result.stderr, result.stderr[:3000]


def test_a_step_whose_values_changed_is_refused_naming_the_array(saved_run, tmp_path):
    run = tmp_path / 'run'
    shutil.copytree(saved_run, run)
    # One array rewritten with other values that still decode, as a disk or a copying tool can leave
    # it. (Flipping bytes of the zstd-compressed data files is no test: it decodes or fails by luck.)
    array = ts.open(
        {
            'driver': 'zarr',
            'kvstore': {'driver': 'ocdbt', 'base': f'file://{run}/2/state/', 'path': 'model.stem.conv1.kernel.value/'},
        }
    ).result()
    array[...] = -array.read().result()
    state = make_state(seed=5)
    state_before = leaves(nnx.state(state))
    damaged = r'1 arrays differ from the checksums saved with them \(model\.stem\.conv1\.kernel\)'
    pattern = rf'step 2 in .* is damaged: {damaged}; nothing'
    with TrainCheckpointer(run) as checkpointer, pytest.raises(CheckpointError, match=pattern):
        checkpointer.restore(state)
    for a, b in zip(leaves(nnx.state(state)), state_before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_state_paths_cover_params_optimizer_ema_and_rngs(trained):
    paths = [dotted_path(p) for p, _ in nnx.to_flat_state(nnx.state(trained[0]))]
    assert 'model.stem.conv1.kernel' in paths
    assert 'optimizer.step' in paths
    assert any(p.startswith('optimizer.opt_state') and p.endswith('stem.conv1.kernel') for p in paths)  # momentum
    assert 'ema.model.stem.conv1.kernel' in paths
    assert any(p.startswith('model.') and p.endswith('rngs.key') for p in paths)
