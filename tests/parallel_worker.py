"""Runs the sharded computations of tests/test_parallel.py in a fresh process and saves their outputs.

JAX fixes the number of devices when it starts, so each topology needs its own process:
    python tests/parallel_worker.py devices OUT_DIR                  # 1 process, 8 host devices
    python tests/parallel_worker.py process OUT_DIR PORT ID [--fail]  # one of 2 processes, 2 devices each
`devices` also computes the single-device references (on its device 0). Each run writes
`<run>.npz` files of outputs and whole train states (gathered from every process) and a
`<run>.json` of facts about the shardings; the test compares them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from multihost import child_xla_flags

# Compiling dominates these runs (a dozen train and eval steps of every layout). Set here too, so
# that the worker runs the same by hand as under run_processes.
os.environ['XLA_FLAGS'] = child_xla_flags(8 if sys.argv[1] == 'devices' else 2)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import count_sharded, leaves, make_train_state, random_params  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import nfnet_jax  # noqa: E402
from nfnet_jax import parallel  # noqa: E402
from nfnet_jax.inference import InferenceFn, classifier, embedder, feature_extractor  # noqa: E402
from nfnet_jax.parallel.train import ShardedTrainer  # noqa: E402
from nfnet_jax.train import TrainState, eval_step, nfnet_optimizer, train_step  # noqa: E402
from nfnet_jax.weights import flat_params, set_flat_params  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# As the commands do on CPU. Without it, XLA's SPMD partitioner (jaxlib 0.10.2) aborts on the kernel gradient of a
# grouped convolution in the FSDP + model-axis train step; the backend runs each group as its own convolution.
nfnet_jax.cpu.enable()

SIZE, BATCH, CLASSES = 32, 8, 10
TX = nfnet_optimizer(0.1)
OUTPUTS = ('logits', 'embeddings', 'features')


def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32)
    return images, rng.integers(0, CLASSES, BATCH)


def randomize(model: nnx.Module) -> None:
    set_flat_params(model, random_params(flat_params(model)))


def make_model() -> nfnet_jax.NormFreeNet:
    model = nfnet_jax.create_model('test_nfnet', rngs=nnx.Rngs(0), num_classes=CLASSES)
    randomize(model)
    return model


def make_state(randomized: bool = True) -> TrainState:
    return make_train_state(TX, dropout_seed=1, num_classes=CLASSES, randomized=randomized)


def arrays(tree) -> list[np.ndarray]:
    """Every array of a state as numpy (global ones gathered from all processes), PRNG keys as their raw data."""
    return [
        np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))
        for x in leaves(tree)
    ]


def inference_fns(model: nfnet_jax.NormFreeNet) -> dict[str, InferenceFn]:
    return {'logits': classifier(model), 'embeddings': embedder(model), 'features': feature_extractor(model)}


def flat(name: str, outputs) -> dict[str, np.ndarray]:
    """`name.0`, `name.1`, ... for every array of an output pytree."""
    return {f'{name}.{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(outputs))}


def single_device_run(images: np.ndarray, labels: np.ndarray, device: jax.Device) -> dict[str, np.ndarray]:
    """The references: inference, and nfnet_jax.train's own jitted steps, on one device."""
    results = {}
    for name, fn in inference_fns(make_model()).items():
        results |= flat(name, fn.apply(jax.device_put(fn.state, device), jax.device_put(images, device)))
    state = make_state()
    nnx.update(state, jax.device_put(nnx.state(state), device))
    metrics = train_step(state, jax.device_put(images, device), jax.device_put(labels, device))
    evaluation = eval_step(state.eval_model, jax.device_put(images, device), jax.device_put(labels, device))
    results |= flat('state', arrays(nnx.state(state))) | {'loss': metrics['loss'], 'eval_loss': evaluation['loss_sum']}
    return results


def sharded_inference(mesh, images: np.ndarray, rows: slice, names=OUTPUTS) -> tuple[dict[str, np.ndarray], dict]:
    """This process's rows of each sharded output; every divisible weight split along 'model' (min_shard_size=1)."""
    results, facts = {}, {}
    fns = inference_fns(make_model())
    for name in names:
        fn = fns[name]
        sharded = parallel.shard_inference(fn, mesh, min_shard_size=1)
        results |= flat(name, parallel.local_rows(sharded(parallel.global_batch(images[rows], mesh)), mesh))
        facts['sharded_params'] = count_sharded(sharded.state)
    return results, facts


def sharded_train(mesh, fsdp: bool, images: np.ndarray, labels: np.ndarray, rows: slice):
    """One ShardedTrainer step and eval step, each process feeding its rows; the whole state gathered."""
    state = make_state()
    trainer = ShardedTrainer(state, mesh, fsdp=fsdp, min_shard_size=1)
    metrics = trainer.train_step(images[rows], labels[rows])
    evaluation = trainer.eval_step(images[rows], labels[rows])
    placed = zip(jax.tree.leaves(nnx.state(state)), jax.tree.leaves(trainer.state_shardings), strict=True)
    facts = {
        'step': state.step,
        'shardings_kept': all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in placed),
        'sharded_params': count_sharded(nnx.state(state.model, nnx.Param)),
        'sharded_optimizer_state': count_sharded(nnx.state(state.optimizer)),
    }
    results = flat('state', arrays(nnx.state(state))) | {'loss': metrics['loss'], 'eval_loss': evaluation['loss_sum']}
    return results, facts


def save(out: Path, name: str, results: dict[str, np.ndarray], facts: dict) -> None:
    np.savez(out / f'{name}.npz', **results)
    (out / f'{name}.json').write_text(json.dumps(facts | {'devices': jax.device_count()}))


def topology(mesh) -> str:
    return f'{mesh.shape["data"]}x{mesh.shape["model"]}'


def devices_run(out: Path) -> None:
    images, labels = batch()
    everything = slice(None)
    save(out, 'single', single_device_run(images, labels, jax.devices()[0]), {})
    mesh = parallel.make_mesh(1)  # 8x1: params replicated
    save(out, f'inference {topology(mesh)}', *sharded_inference(mesh, images, everything, OUTPUTS[:1]))
    mesh = parallel.make_mesh(4)  # 2x4: params split over 4 devices
    save(out, f'inference {topology(mesh)}', *sharded_inference(mesh, images, everything))
    for model_parallelism, fsdp in ((1, False), (2, True)):  # 8x1 data parallel; 4x2 FSDP + model axis
        mesh = parallel.make_mesh(model_parallelism)
        save(out, f'train {topology(mesh)}', *sharded_train(mesh, fsdp, images, labels, everything))
    # The model's own random init traced under jit with sharded outputs, against the same build on one device.
    built = parallel.create_sharded(lambda: make_state(False), parallel.make_mesh(2), fsdp=True, min_shard_size=1)
    single = jax.jit(lambda: nnx.state(make_state(False)))()  # no shardings asked: on the default device
    facts = {'sharded_params': count_sharded(nnx.state(built.model, nnx.Param))}
    results = flat('built', arrays(nnx.state(built))) | flat('single', arrays(single))
    save(out, 'create_sharded', results, facts)


def process_run(out: Path, port: int, process_id: int, fail: bool) -> None:
    # Short timeouts: a failure must end both processes well within the test's deadline. Both finish
    # on a collective, so neither waits long for the other at the shutdown barrier in a normal run.
    # 10 s heartbeats once ended a healthy run in CI (both tasks reported as missing heartbeats 8 s
    # after the start, the other pytest worker loading the same 2 cores); alone it passed.
    parallel.initialize_distributed(
        f'127.0.0.1:{port}', 2, process_id, initialization_timeout_s=60, heartbeat_timeout_s=30, shutdown_timeout_s=30
    )
    if fail and process_id == 1:
        raise RuntimeError('process 1 fails on purpose before the first collective')
    images, labels = batch()
    rows = parallel.process_rows(BATCH)
    mesh = parallel.make_mesh(2)  # 2x2: data and model axes both span processes' devices
    inference, inference_facts = sharded_inference(mesh, images, rows)
    train, train_facts = sharded_train(mesh, True, images, labels, rows)
    facts = {'processes': jax.process_count(), 'process': jax.process_index(), 'rows': [rows.start, rows.stop]}
    save(out, f'process {process_id}', inference | train, facts | {'inference': inference_facts, 'train': train_facts})


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == 'devices':
        devices_run(out)
    else:
        process_run(out, int(sys.argv[3]), int(sys.argv[4]), '--fail' in sys.argv)


if __name__ == '__main__':
    main()
