"""What the project's commands share: progress and messages on stderr, user errors in one line (exit 2),
the model source flags, the CPU memory flag, and the multi-host flags."""

from __future__ import annotations

import argparse
import errno
import signal
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from PIL import Image

from nfnet_jax import cpu
from nfnet_jax.data import set_max_image_pixels
from nfnet_jax.factory import create_model, load_checkpoint
from nfnet_jax.files import OutputError, Terminated, exit_on_signals
from nfnet_jax.models.nfnet import NormFreeNet
from nfnet_jax.models.pretrained import resolve_name
from nfnet_jax.parallel.mesh import initialize_distributed
from nfnet_jax.progress import log
from nfnet_jax.weights.params import CheckpointError

# Errors that mean the input was wrong: the message says what to do, a traceback would only hide it.
USER_ERRORS = (CheckpointError, FileExistsError, FileNotFoundError, OutputError, ValueError)
# What the system says when a file cannot be read or written for the user to fix: permissions, a read-only or full disk.
REFUSED_BY_THE_SYSTEM = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`, with a user error printed as `error: ...` and exit code 2.

    SIGTERM stops it as Ctrl-C does, by an exception: outputs being written are removed, never
    left half written; the exit code is then 128 + the signal's number, as the shell reports it.
    """
    try:
        with exit_on_signals():
            return run(args)
    except USER_ERRORS as err:
        log(f'error: {err}')
        return 2
    except OSError as err:  # a folder made read-only, a full disk: said in one line, as a failed save is
        if err.errno not in REFUSED_BY_THE_SYSTEM:
            raise
        log(f'error: {err}; fix the permissions or free space there, then run the command again')
        return 2
    except (AssertionError, RuntimeError):  # what JAX raises when JAX_PLATFORMS names no backend it can start
        problem = backend_problem()
        if problem is None:
            raise
        log(f'error: {problem}')
        return 2
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
        log(f'stopped by {signal.Signals(signum).name}: nothing half written was left')
        return 128 + signum


def backend_problem() -> str | None:
    """Why JAX cannot start a backend (e.g. JAX_PLATFORMS=cuda on a machine without a GPU), in one line, or None."""
    try:
        jax.devices()
    except (AssertionError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else 'none of its platforms is available here'
        return (
            f'JAX could not start a backend for JAX_PLATFORMS={jax.config.jax_platforms or ""!r} ({reason}); '
            'set JAX_PLATFORMS to a platform this machine has (e.g. cpu), or unset it'
        )
    return None


def add_model_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model_help: str = 'pretrained arch.tag from the Hugging Face hub, e.g. dm_nfnet_f0.dm_in1k',
) -> None:
    """`--model NAME.TAG | --checkpoint FILE` (one of them required), checked by `check_model_arguments` and read
    by `load_model`. `model_help` is for a command that reads `--model` its own way."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--model', help=model_help)
    source.add_argument('--checkpoint', type=Path, help='a checkpoint written by python -m convert.from_timm')


def check_model_arguments(args: argparse.Namespace) -> None:
    """`add_model_arguments`' flags checked before anything is loaded: a known name, or a checkpoint that is there."""
    if args.model is not None:
        resolve_name(args.model)
    elif not args.checkpoint.is_file():
        raise FileNotFoundError(f'no checkpoint at {args.checkpoint}')


def load_model(args: argparse.Namespace, **model_kwargs: Any) -> NormFreeNet:
    """The model `add_model_arguments`' flags name: a converted checkpoint, or pretrained hub weights.

    `model_kwargs` are `create_model`'s (`dtype`, `precision`, ...).
    """
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint, **model_kwargs)
    return create_model(args.model, pretrained=True, **model_kwargs)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max-image-pixels`, applied by `apply_image_arguments`."""
    parser.add_argument(
        '--max-image-pixels',
        type=int,
        default=Image.MAX_IMAGE_PIXELS,
        help=f"larger images are reported as unreadable (default PIL's {Image.MAX_IMAGE_PIXELS:,}; 0: no limit)",
    )


def apply_image_arguments(args: argparse.Namespace) -> None:
    """The pixel limit for this process's image reads; PIL's own warning is silenced, each such file being reported."""
    set_max_image_pixels(args.max_image_pixels)
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)


def add_cpu_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, on_by_default: bool = True) -> None:
    """`--keep-cpu-memory` / `--no-keep-cpu-memory`, applied with the CPU backend by `apply_cpu_arguments`.

    Without either flag the value is None (on when the command is the process), or with
    `on_by_default=False` it is False.
    """
    default = 'on by default when the command is the process (python -m ...)' if on_by_default else 'off by default'
    parser.add_argument(
        '--keep-cpu-memory',
        action=argparse.BooleanOptionalAction,
        default=None if on_by_default else False,
        help='on CPU, keep large buffers between calls (nfnet_jax.cpu.memory): faster; the process keeps its peak '
        f'memory until it exits. {default}',
    )


def apply_cpu_arguments(args: argparse.Namespace, is_process: bool) -> bool:
    """The CPU backend (`nfnet_jax.cpu.enable`) for a command that is the process, or that asks to keep CPU memory.

    The commands pass `is_process=__name__ == '__main__'`. The backend and the memory settings
    hold for the whole process, so a command's `main` called from Python leaves that process as it
    is unless given `--keep-cpu-memory`. On another default backend nothing is changed. A command
    calls this first, before any JAX computation; True when the backend is on.
    """
    keep_memory = is_process if args.keep_cpu_memory is None else args.keep_cpu_memory
    if not (is_process or keep_memory):
        return False
    try:
        return cpu.enable(keep_memory=keep_memory)
    except RuntimeError:
        raise ValueError(
            '--keep-cpu-memory needs a process in which JAX has not run yet (its CPU client keeps the settings '
            'it was made with): run the command on its own (python -m ...), or leave the flag out'
        ) from None


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """A command's flags for joining a multi-host run (read by `initialize_from_args`)."""
    group = parser.add_argument_group('multi-host (one process per host)')
    group.add_argument('--distributed', action='store_true', help='join a run found from the environment (TPU, SLURM)')
    group.add_argument('--coordinator', help='HOST:PORT of process 0, for a multi-host run without auto-detection')
    group.add_argument('--num-processes', type=int, help='with --coordinator: how many processes (hosts)')
    group.add_argument('--process-id', type=int, help='with --coordinator: this process, 0 .. num-processes - 1')


def initialize_from_args(args: argparse.Namespace) -> None:
    """`initialize_distributed` as `add_distributed_arguments`'s flags ask; nothing without them."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in explicit) and None in explicit:
        raise ValueError('--coordinator, --num-processes and --process-id go together')
    if args.distributed or args.coordinator is not None:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
