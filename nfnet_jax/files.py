"""Writing output files safely, for every command and library call that writes one.

Outputs are checked before any long work starts (`check_output`), and written through a
temporary file in the target folder that takes the final name only when it is complete
(`atomic_write`): a crash, Ctrl-C or a failed check never leaves a half file under the name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """Raise FileExistsError if `path` exists and overwriting it was not asked for."""
    if Path(path).exists() and not force:
        raise FileExistsError(f'{path} already exists; pass --force (force=True) to overwrite it')


def check_output(path: str | os.PathLike, force: bool = False, suffix: str | None = None) -> Path:
    """Check, before the work, that an output file can be written: right suffix, not there unless `force`."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f'{path}: the output must be a {suffix} file')
    refuse_existing(path, force)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], force: bool = False) -> None:
    """`write(tmp_path)` into a temporary file beside `path`, then rename it to `path`: never a half file.

    Refuses to replace an existing file unless `force`.
    """
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
