"""Save and resume a whole training run (params, optimizer state, EMA, step, RNG) with orbax.

One directory per run; one sub-directory per saved step. orbax writes each step into a
temporary directory and renames it only when every file is complete, so a save cut short
(crash, preemption, full disk) leaves a `<step>.orbax-checkpoint-tmp-*` directory that is never
listed as a step and never restored. Beside the state, each step stores a small JSON record
of the run (the model's class, the architecture, head and input of every NFNet in it, every
state path with its shape), so a checkpoint of another model or another optimizer is refused
with a list of what differs, before anything is read into the run. The record also holds the
SHA-256 of every array (`checksums`), checked after a restore and before the state changes: a
step whose files changed after they were written is refused, naming the arrays. Steps saved
without checksums restore unchecked. Restoring never writes to the checkpoint directory.

A save that fails (a full disk, a folder made read-only) raises `CheckpointSaveError`, one line
naming the step and the cause, from `save` or `wait`; its temporary directory is removed, and
orbax's own reports of the failure (a traceback per thread and per array) are not printed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nfnet_jax.files import OutputError
from nfnet_jax.models.nfnet import NormFreeNet, find_nfnets
from nfnet_jax.train.state import TrainState
from nfnet_jax.weights.file import array_sha256
from nfnet_jax.weights.params import CheckpointError, check_shapes, dotted_path, flat_state

FORMAT = 'nfnet_jax.train'
_STATE, _RUN = 'state', 'run'
_NFNET_KEYS = ('architecture', 'num_classes', 'in_chans', 'global_pool')
SETTLE_S = 60  # how long a failed save's other writes may take to end before its files are removed


def describe_nfnet(model: NormFreeNet) -> dict[str, Any]:
    """An NFNet's architecture, head and input, as a run record keeps them."""
    architecture = model.pretrained_cfg.architecture if model.pretrained_cfg is not None else type(model).__name__
    return {
        'architecture': architecture,
        'num_classes': model.num_classes,
        'in_chans': model.in_chans,
        'global_pool': model.global_pool,
    }


def describe_run(state: TrainState) -> dict[str, Any]:
    """The JSON record saved beside the state: what model it is and the shape of every state entry.

    Any model is described by its class and its state's paths and shapes; every NFNet inside
    it (the model itself at path '', or a backbone) also by its architecture, head and input.
    """
    return {
        'format': FORMAT,
        'model': type(state.model).__name__,
        'nfnets': {path: describe_nfnet(net) for path, net in find_nfnets(state.model).items()},
        'shapes': state_shapes(state),
    }


def saved_nfnets(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The NFNets of a saved run record; records written before user models were supported describe one, at ''."""
    if 'nfnets' in run:
        return run['nfnets']
    return {'': {key: run.get(key) for key in _NFNET_KEYS}}


def describe_nfnets(nfnets: dict[str, dict[str, Any]]) -> str:
    """'test_nfnet at 'backbone' with 0 classes, ...' for each NFNet of a run record, or 'no NFNet'."""
    texts = [
        f'{n.get("architecture")} {f"at {path!r}" if path else "as the model"} with {n.get("num_classes")} '
        f'classes, {n.get("in_chans")} input channels and global_pool={n.get("global_pool")!r}'
        for path, n in sorted(nfnets.items())
    ]
    return ' and '.join(texts) or 'no NFNet'


def state_shapes(state: TrainState) -> dict[str, list[int]]:
    return {path: list(var.shape) for path, var in flat_state(state)}


def state_checksums(state: Any) -> dict[str, str]:
    """SHA-256 of every array of a state (a TrainState, or an nnx.State) by path, PRNG keys as their data.

    Arrays this process does not hold whole (shards of a multi-host run) are left out.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    checksums = {}
    for path, value in nnx.to_flat_state(state):
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        if isinstance(value, jax.Array):
            if not value.is_fully_addressable:
                continue
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
        checksums[dotted_path(path)] = array_sha256(np.asarray(value))
    return checksums


def _is_orphan_read_error(record: logging.LogRecord) -> bool:
    """asyncio's report of a tensorstore read that failed after nobody waited for it any more."""
    exc = record.exc_info[1] if record.exc_info else None
    return (
        record.getMessage().startswith(('Future exception was never retrieved', 'Task exception was never retrieved'))
        and isinstance(exc, ValueError)
        and re.match(r'[A-Z_]+: ', str(exc)) is not None  # tensorstore's status codes: DATA_LOSS: ..., NOT_FOUND: ...
    )


def _is_orbax_error_report(record: logging.LogRecord) -> bool:
    """orbax's own error log of a failed save or restore, which reaches the caller as an exception anyway."""
    return record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname


class CheckpointSaveError(OutputError):
    """A checkpoint could not be written (disk full, no permission): said in one line, nothing half-written left."""


def _quiet_failed_io_noise() -> None:
    """Keep a failed orbax save or restore to its one clear error (installed once, process-wide).

    When one array fails, orbax closes its event loop while the other reads or writes are still
    running. Each then reports, as an unraisable exception, that the loop is closed, asyncio logs
    every failed read nobody waits for, and orbax logs the failure from each of its threads: one
    traceback per array, thousands for a big state. Only those reports are dropped; every other
    goes where it went.
    """
    previous = sys.unraisablehook
    if getattr(previous, '_nfnet_jax_quiet', False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
            return
        previous(unraisable)

    hook._nfnet_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(lambda record: not _is_orphan_read_error(record))
    logging.getLogger('absl').addFilter(lambda record: not _is_orbax_error_report(record))


class TrainCheckpointer:
    """Saves a `TrainState` every time `save` is called and restores the latest (or a given) step.

    `max_to_keep` finished steps are kept (older ones are deleted after a newer one is
    complete); None keeps all. Saves are asynchronous: training continues while the files are
    written; `wait()` (or `close()`) blocks until they are finished.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f'{self.directory} exists and is not a directory')
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _RUN))
        self._saving: int | None = None  # the step of the last save started
        self._threads = set(threading.enumerate())  # those before orbax's: a failed save waits for orbax's to end
        self._failure: CheckpointSaveError | None = None  # once a save failed, every later call says so
        _quiet_failed_io_noise()

    def steps(self) -> list[int]:
        """The finished checkpoints, oldest first (unfinished saves are not steps)."""
        self._manager.reload()  # another process (or an interrupted one) may have changed the directory
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState) -> int:
        """Save at the state's current step; refuses to replace a step that is already saved."""
        step = state.step
        self.wait()
        if step in self.steps():
            raise FileExistsError(
                f'{self.directory} already holds a checkpoint for step {step}; '
                'restore it to continue that run, or use another directory'
            )
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(nnx.state(state)),
                _RUN: ocp.args.JsonSave(describe_run(state) | {'checksums': state_checksums(state)}),
            }
        )
        self._saving = step
        try:
            self._manager.save(step, args=args)
        except Exception as err:  # orbax and tensorstore raise many types for a write that fails
            self._fail(err)
        return step

    def _fail(self, err: Exception) -> None:
        """Remove what the failed save of step `self._saving` left, and raise its one-line error."""
        if self._failure is None:
            with contextlib.suppress(Exception):  # its other threads stop once they see the failure
                self._manager.close()
            deadline = time.monotonic() + SETTLE_S
            for thread in set(threading.enumerate()) - self._threads:
                if not thread.daemon and thread is not threading.current_thread():
                    thread.join(max(deadline - time.monotonic(), 0))
            for partial in self.directory.glob(f'{self._saving}.orbax-checkpoint-tmp*'):
                shutil.rmtree(partial, ignore_errors=True)
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._failure = CheckpointSaveError(
                f'could not save checkpoint step {self._saving} in {self.directory} ({cause}); nothing half-written '
                'was kept: free space there (or make it writable), then resume from the last finished checkpoint'
            )
        raise self._failure from None

    def read_run(self, step: int) -> dict[str, Any]:
        """The JSON record of a saved step, with a clear error if it is missing or unreadable."""
        try:
            run = self._manager.restore(step, args=ocp.args.Composite(**{_RUN: ocp.args.JsonRestore()}))[_RUN]
        except Exception as err:  # orbax raises many types for missing or damaged files
            raise CheckpointError(
                f'step {step} in {self.directory} has no readable run record (corrupt, or not written by '
                f'nfnet_jax.train): {type(err).__name__}: {err}'
            ) from None
        if not isinstance(run, dict) or run.get('format') != FORMAT:
            raise CheckpointError(f'step {step} in {self.directory} was not written by nfnet_jax.train')
        return run

    def check_compatible(self, state: TrainState, step: int) -> None:
        """Raise a CheckpointError naming every difference between a saved step and `state`."""
        saved, ours = self.read_run(step), describe_run(state)
        where = f'checkpoint step {step} in {self.directory}'
        saved_nets, our_nets = saved_nfnets(saved), ours['nfnets']
        if saved_nets != our_nets:
            raise CheckpointError(
                f'{where} is a run of {describe_nfnets(saved_nets)}; this run has {describe_nfnets(our_nets)}: '
                'build the same model to resume it'
            )
        model_keys = {k: v for k, v in ours['shapes'].items() if k.startswith('model.')}
        saved_model_keys = {k: v for k, v in saved['shapes'].items() if k.startswith('model.')}
        check_shapes(f'{where}: model', model_keys, saved_model_keys, 'the saved model has another structure')
        check_shapes(
            f'{where}: optimizer / EMA state',
            ours['shapes'],
            saved['shapes'],
            'the run was saved with another optimizer or EMA setting: build the TrainState as that run did',
        )

    def restore(self, state: TrainState, step: int | None = None) -> int:
        """Load a saved step (default: the latest) into `state`, in place; returns the step.

        Everything is checked and read before `state` changes: on any error `state` is as it was.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f'no finished checkpoint in {self.directory}')
        elif step not in self.steps():
            raise CheckpointError(f'no finished checkpoint for step {step} in {self.directory}; it has {self.steps()}')
        self.check_compatible(state, step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(state))
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
            )
        except Exception as err:  # tensorstore / orbax errors on damaged files come in many types
            raise CheckpointError(
                f'checkpoint step {step} in {self.directory} could not be read (corrupt or truncated?): '
                f'{type(err).__name__}: {err}'
            ) from None
        self.verify(step, restored[_STATE])
        nnx.update(state, restored[_STATE])
        return step

    def verify(self, step: int, restored: nnx.State) -> None:
        """Raise a CheckpointError naming every array of a restored step that differs from its saved checksum."""
        saved = self.read_run(step).get('checksums')
        if not saved:
            return  # saved before checksums were recorded
        found = state_checksums(restored)
        damaged = sorted(path for path in saved.keys() & found.keys() if saved[path] != found[path])
        if damaged:
            raise CheckpointError(
                f'checkpoint step {step} in {self.directory} is damaged: {len(damaged)} arrays differ from the '
                f'checksums saved with them ({", ".join(damaged[:5])}{" ..." if len(damaged) > 5 else ""}); '
                'nothing was restored. Restore an earlier step'
            )

    def wait(self) -> None:
        """Block until every save started so far is finished; raise `CheckpointSaveError` if one failed."""
        if self._failure is not None:
            raise self._failure
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # the failure of a background save, as orbax re-raises it
            self._fail(err)

    def close(self) -> None:
        """Wait for the saves started, and release orbax's threads; after a failed save, only release them."""
        if self._failure is None:
            try:
                self._manager.close()
            except Exception as err:  # a background save failed: clean up and say so, as `wait` does
                self._fail(err)

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        try:
            self.close()
        except CheckpointSaveError:
            if exc_type is None:  # otherwise the error already on its way is the first one, and is kept
                raise
