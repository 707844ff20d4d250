"""What the project's commands share: progress on stderr, and mistakes reported in one line, exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from nfnet_jax.checkpoint import CheckpointError

# Errors that mean the input was wrong: the message says what to do, a traceback would only hide it.
USER_ERRORS = (CheckpointError, FileExistsError, FileNotFoundError, ValueError)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`, with a user error printed as `error: ...` and exit code 2."""
    try:
        return run(args)
    except USER_ERRORS as err:
        log(f'error: {err}')
        return 2
