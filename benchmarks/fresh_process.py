"""A measurement in a fresh process: what JAX caches within a process (compiled programs) cannot flatter it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.machine import REPO


def run_module(module: str, args: Sequence[str], what: str) -> dict[str, Any]:
    """`python -m module *args` from the repository's root; the JSON of its last line of output. A failure
    raises RuntimeError with the end of its stderr, naming `what` failed."""
    done = subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f'{what} failed:\n{done.stderr[-4000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])
