"""Sharding NFNets over many devices and many hosts with JAX's SPMD machinery: one program, XLA partitions it.

    mesh = make_mesh()                                   # every device of every process, axes ('data', 'model')
    classify = shard_inference(classifier(model), mesh)  # batch split along 'data'
    logits = classify(global_batch(local_images, mesh))  # each process feeds its own rows
    mine = local_rows(logits, mesh)                      # and gets its own rows back

    trainer = ShardedTrainer(state, mesh, fsdp=True)     # nfnet_jax.parallel.train: the train step, sharded
    metrics = trainer.train_step(local_images, local_labels)
    for images, labels in prefetch_to_device(local_batches, mesh):  # the next 2 batches on their way
        metrics = trainer.train_step(images, labels)

A mesh is a 2-d grid of devices: the batch is split along 'data'; the 'model' axis (size 1
unless `make_mesh(model_parallelism=n)`) splits big weights along their output channels, for
models whose weights (and activations) are too big to replicate on every device. The FSDP
option of `ShardedTrainer` also splits params and optimizer state along 'data'. No collective
is written here: `jax.jit` gets the input and output shardings and XLA inserts the
all-reduces of the gradients and the all-gathers of sharded weights.

Multi-host (a TPU pod slice, several GPU hosts): run the same script once per host, call
`initialize_distributed()` before anything else touches JAX, build the same model on every
host (same seed or the same checkpoint), and feed each host's share of every batch with
`global_batch`. Every process must make the same sequence of sharded calls with the same
global shapes: a process that stops calling leaves the others waiting in a collective until
the distributed runtime's heartbeat timeout ends them all.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
MODEL_AXIS = 'model'
# Tensors with fewer elements stay replicated: splitting a bias or a small kernel saves almost
# no memory and costs a collective per use. 2**16 float32 elements are 256 KiB.
DEFAULT_MIN_SHARD_SIZE = 2**16


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
    shutdown_timeout_s: int = 300,
) -> None:
    """Join this process to a multi-process JAX run (`jax.distributed.initialize`); call it before any JAX work.

    On a TPU pod slice, or under SLURM / Open MPI, leave the arguments out: JAX finds the
    coordinator and this process's rank itself. Elsewhere pass the coordinator's `host:port`
    (process 0's host), the number of processes and this process's rank. CPU devices use gloo
    collectives, so the same code runs on CPU-only hosts. If a process dies, the others stop
    (abort) after `heartbeat_timeout_s` instead of waiting forever in a collective; a process
    that finishes waits at most `shutdown_timeout_s` for the others at exit.
    """
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )


def leader_decides(decide: Callable[[], Any]) -> Any:
    """What `decide()` returns on process 0 (a JSON value), on every process; the others never call it.

    For what only process 0 may find out, from files it alone may see (a run folder on its own
    disk): every process then acts on the same answer. An error `decide` raises on process 0 is
    raised on every process, as a ValueError with the same message on the others, so all stop
    together instead of waiting for process 0 in a collective. One process: just `decide()`.
    """
    if jax.process_count() == 1:
        return decide()
    answer: dict[str, Any] = {}
    if jax.process_index() == 0:
        try:
            answer = {'value': decide()}
        except Exception as err:
            answer = {'error': str(err)}
            _broadcast_json(answer)
            raise
    answer = _broadcast_json(answer)
    if 'error' in answer:
        raise ValueError(answer['error'])
    return answer['value']


def refuse_unless_all_agree(problem: str | None) -> None:
    """Raise on every process when any process found a problem (a one-line message, None when it found none).

    The message raised everywhere (a ValueError) is the lowest such process's. Every process
    must call it, like any collective.
    """
    problems = [problem] if jax.process_count() == 1 else _allgather_json(problem)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise ValueError(first)


def _broadcast_json(value: Any) -> Any:
    """Process 0's JSON value on every process (the others' `value` is ignored)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    padded = np.zeros(size, np.uint8)
    if jax.process_index() == 0:
        padded[:] = data
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes())


def _allgather_json(value: Any) -> list[Any]:
    """Every process's JSON value, in process order."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes, strict=True)]


def make_mesh(model_parallelism: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: every device of every process).

    'model' has `model_parallelism` devices, neighbours in the device order (the same host, the
    fastest links); 'data' has the rest. The axes are Auto: XLA propagates shardings through the
    model, so layers need no sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_parallelism < 1 or len(devices) % model_parallelism:
        raise ValueError(
            f'model_parallelism={model_parallelism} must be a positive divisor of the {len(devices)} devices'
        )
    shape = (len(devices) // model_parallelism, model_parallelism)
    return jax.make_mesh(shape, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto,) * 2, devices=devices)


def partition_spec(shape: Sequence[int], mesh: Mesh, axes: Sequence[str], min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
    """How one tensor is split: each mesh axis in `axes` (of size > 1) takes its own tensor dimension.

    The last dimension (output channels of HWIO conv kernels and (in, out) Linear kernels)
    is tried first, then the others from the largest; a dimension the axis does not divide is
    skipped, and a tensor with no such dimension or fewer than `min_size` elements is
    replicated along that axis. The rule depends on the shape only, so a parameter, its
    gradient, its momentum and its EMA are always split alike.
    """
    dims: list[str | None] = [None] * len(shape)
    if not shape or math.prod(shape) < min_size:
        return P()
    order = [len(shape) - 1] + sorted(range(len(shape) - 1), key=lambda d: -shape[d])
    for axis in axes:
        size = mesh.shape[axis]
        if size == 1:
            continue
        for d in order:
            if dims[d] is None and shape[d] % size == 0:
                dims[d] = axis
                break
    return P(*dims)


def state_shardings(
    state: Any, mesh: Mesh, axes: Sequence[str] = (MODEL_AXIS,), min_size: int = DEFAULT_MIN_SHARD_SIZE
) -> Any:
    """A NamedSharding for every array of `state` (an nnx.State or any pytree), by `partition_spec`."""
    return jax.tree.map(lambda x: NamedSharding(mesh, partition_spec(x.shape, mesh, axes, min_size)), state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split along 'data', replicated along 'model'."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Any, mesh: Mesh | NamedSharding) -> Any:
    """One global array per leaf of `local` (this process's rows), split along 'data' (or on a given sharding).

    Every process calls it with its own rows, all of the same shape; the global batch is the
    processes' rows in process order. With one process it simply shards the whole batch.
    """
    sharding = mesh if isinstance(mesh, NamedSharding) else batch_sharding(mesh)
    return jax.tree.map(lambda x: _rows_to_global(x, sharding), local)


def prefetch_to_device(iterator: Iterable[Any], mesh_or_sharding: Mesh | NamedSharding, size: int = 2) -> Iterator[Any]:
    """The items of `iterator` with their arrays already on the devices, read `size` items ahead of the consumer.

    Each item is a pytree whose array leaves are this process's rows: they become global arrays
    as `global_batch` makes them (split along 'data' of a mesh, or on the given sharding), for a
    multi-process mesh too; other leaves (a step number, file names) pass through unchanged.
    Transfers are asynchronous, so while the consumer's step runs on the devices the next `size`
    items are already read and on their way: the loop never waits for input between steps.
    """
    if size < 1:
        raise ValueError(f'prefetch size must be at least 1, got {size}')
    sharding = mesh_or_sharding if isinstance(mesh_or_sharding, NamedSharding) else batch_sharding(mesh_or_sharding)

    def place_arrays(item: Any) -> Any:
        return jax.tree.map(
            lambda x: _rows_to_global(x, sharding) if isinstance(x, (np.ndarray, jax.Array)) else x, item
        )

    def prefetched(items: Iterator[Any]) -> Iterator[Any]:
        queue = collections.deque(place_arrays(item) for item in itertools.islice(items, size))
        while queue:
            yield queue.popleft()
            queue.extend(place_arrays(item) for item in itertools.islice(items, 1))

    return prefetched(iter(iterator))


def _rows_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """This process's rows of an array -> the global array on `sharding` (its leading axis split)."""
    x = np.asarray(x)
    blocks = _process_row_blocks(sharding)
    if x.ndim == 0 or x.shape[0] % blocks:
        raise ValueError(
            f'this process feeds {blocks} data shards of the mesh, so its batch size must be a '
            f'multiple of {blocks}; got an array of shape {x.shape}'
        )
    return jax.make_array_from_process_local_data(sharding, x)


def _process_row_blocks(sharding: NamedSharding) -> int:
    """How many distinct blocks of rows this process's devices hold under `sharding` (its leading axis split)."""
    first = sharding.spec[0] if len(sharding.spec) else None
    axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
    where = [sharding.mesh.axis_names.index(axis) for axis in axes]
    return len(
        {
            tuple(index[i] for i in where)
            for index, device in np.ndenumerate(sharding.mesh.devices)
            if device.process_index == jax.process_index()
        }
    )


def process_rows(global_batch_size: int) -> slice:
    """This process's rows of a global batch of `global_batch_size`, as `global_batch` puts them together."""
    rows = global_batch_size // jax.process_count()
    return slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)


def local_rows(outputs: Any, mesh: Mesh) -> Any:
    """This process's rows of each batch-sharded output, as numpy, in the order it fed them to `global_batch`."""
    host_local = multihost_utils.global_array_to_host_local_array(outputs, mesh, P(DATA_AXIS))
    return jax.tree.map(np.asarray, host_local)


def place(tree: Any, shardings: Any) -> Any:
    """The arrays of `tree` on their shardings; every process must hold the same values (not checked).

    Works for process-local arrays in a multi-process run too (each process contributes its
    own shards).
    """
    return jax.tree.map(_put, tree, shardings)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """`jax.device_put`, except that process-local values for a multi-process sharding go through the host.

    Each process then transfers only the shards of its own devices, and no collective compares
    the processes' copies (`jax.device_put` would gather every array to check them).
    """
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def create_sharded(
    build: Callable[[], nnx.Module], mesh: Mesh, *, fsdp: bool = False, min_shard_size: int = DEFAULT_MIN_SHARD_SIZE
) -> nnx.Module:
    """Build a module (a model, a TrainState) directly in its shards: no device ever holds all of it.

    `build` runs under jit with the outputs sharded as `ShardedTrainer` shards them (or
    `shard_inference`, with `fsdp=False`), e.g. for a model too big for one device:
    `create_sharded(lambda: TrainState(create_model('nfnet_f7', rngs=nnx.Rngs(0)), tx), mesh, fsdp=True)`.
    Random initialisation draws with jax.random inside the program (a traced `create_model` does), and gives
    the same values as the same build jitted on one device (JAX's partitionable RNG); they differ from
    an eager `create_model`'s, which numpy draws on the host.
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
    axes = (MODEL_AXIS, DATA_AXIS) if fsdp else (MODEL_AXIS,)
    shardings = state_shardings(abstract_state, mesh, axes, min_shard_size)
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)
