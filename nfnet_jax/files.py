"""Writing output files safely, for every command and library call that writes one.

Outputs are checked before any long work starts (`check_output`, `check_output_folder`): the
file is not there (unless overwriting was asked for), and its folder exists or can be made
and takes files. They are written through a temporary file in the target folder that takes
the final name only when it is complete (`atomic_write`): a crash, Ctrl-C, SIGTERM (the
commands turn it into an exception, `exit_on_signals`) or a failed check never leaves a half
file under the name, nor the temporary file. Written files get the usual permissions (those
the umask allows), not the temporary file's private ones.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path


def display_name(path: str | os.PathLike) -> str:
    """A file name on one line, for text and messages: control characters and bytes that are not UTF-8
    backslash-escaped (`new\\nline.png`, `bad\\xff.png`)."""
    text = os.fsencode(path).decode('utf-8', 'backslashreplace')
    return ''.join(ch if ch.isprintable() else ch.encode('unicode_escape').decode('ascii') for ch in text)


def name_fields(path: str | os.PathLike) -> dict[str, str]:
    """A file name for JSON, losslessly: `file` is the name as text; for a name that is not UTF-8, `file` shows
    the bad bytes as U+FFFD and `file_bytes` holds the name's bytes in base64 (`os.fsdecode` of them gives
    the path back)."""
    raw = os.fsencode(path)
    try:
        return {'file': raw.decode('utf-8')}
    except UnicodeDecodeError:
        return {'file': raw.decode('utf-8', 'replace'), 'file_bytes': base64.b64encode(raw).decode('ascii')}


def list_file_bytes(paths: Iterable[str | os.PathLike]) -> bytes:
    """Paths as a list file: one per line, or NUL-terminated (as `find -print0`) if a name holds a newline.

    The names' bytes are written as they are: names that are not UTF-8 survive.
    """
    names = [os.fsencode(path) for path in paths]
    end = b'\0' if any(b'\n' in name for name in names) else b'\n'
    return b''.join(name + end for name in names)


def read_list_file(path: str | os.PathLike) -> list[Path]:
    """The paths of a list file (`split_list`)."""
    return split_list(Path(path).read_bytes())


def split_list(data: bytes) -> list[Path]:
    """The paths of a list: NUL-separated if it holds a NUL, else one per line; blank lines are skipped."""
    names = data.split(b'\0') if b'\0' in data else data.splitlines()
    return [Path(os.fsdecode(name)) for name in names if name.strip()]


class OutputError(OSError):
    """An output that cannot be written where it was asked for: said before any work is done."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another signal asked for) received: raised like Ctrl-C, so every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f'stopped by {signal.Signals(signum).name}')
        self.signum = signum


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """Raise FileExistsError if `path` exists and overwriting it was not asked for."""
    if Path(path).exists() and not force:
        raise FileExistsError(f'{path} already exists; pass --force (force=True) to overwrite it')


def check_report_file(path: str | os.PathLike, force: bool) -> None:
    """A report to be written at the end of a long run, checked before the run: not there (or `force`), in a folder
    that is there. Raises FileExistsError or FileNotFoundError."""
    refuse_existing(path, force)
    if not Path(path).parent.is_dir():
        raise FileNotFoundError(f'cannot write {path}: {Path(path).parent} is not a directory')


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Check that `folder` is a folder that takes new files, or can be made: raise OutputError if not.

    Tried for real (a temporary file is made and removed in it, or in the nearest existing folder
    above it), so read-only filesystems, permissions and ACLs all count, for root too.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = 'exists and is not a folder' if existing == folder else f'cannot be made: {existing} is not a folder'
        raise OutputError(f'{folder} {what}')
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise OutputError(f'cannot write in {existing}: {err.strerror or err}') from None
    return folder


def check_output(path: str | os.PathLike, force: bool = False, suffix: str | None = None) -> Path:
    """Check, before the work, that an output file can be written: right suffix, not there unless `force`,
    not a folder, and its folder exists (or can be made) and takes files."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f'{path}: the output must be a {suffix} file')
    if path.is_dir():
        raise OutputError(f'{path} is a folder; name the file to write')
    refuse_existing(path, force)
    check_output_folder(path.parent)
    return path


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask can only be read by setting it, racing other threads)
        with open('/proc/self/status', encoding='ascii') as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], force: bool = False, mode: int | None = None
) -> None:
    """`write(tmp_path)` into a temporary file beside `path`, then rename it to `path`: never a half file.

    Refuses to replace an existing file unless `force`. The file gets the permissions `mode`, by default
    those a plain `open` would give it (0o666 less the umask).
    """
    atomic_write_together({path: write}, force, mode)


def atomic_write_together(
    writes: Mapping[str | os.PathLike, Callable[[str], None]], force: bool = False, mode: int | None = None
) -> None:
    """`atomic_write` for files that belong together (an artifact and its description): every one is written
    to its temporary file before any is renamed, so a failed write leaves none of them."""
    paths = [Path(path) for path in writes]
    for path in paths:
        refuse_existing(path, force)
    temporaries: list[str] = []
    try:
        for path, write in zip(paths, writes.values(), strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
            temporaries.append(tmp)
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        for tmp, path in zip(temporaries, paths, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temporaries:
            with contextlib.suppress(OSError):  # a folder made read-only: the first error is the one to tell
                Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exit_on_signals(*signums: int) -> Iterator[None]:
    """Within the block, the signals (default SIGTERM) raise `Terminated` in the main thread, as Ctrl-C raises
    KeyboardInterrupt: `atomic_write` and every `finally` clean up instead of the process vanishing mid-write."""

    def handler(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signums = signums or (signal.SIGTERM,)
    try:
        previous = {signum: signal.signal(signum, handler) for signum in signums}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike, what: str = 'run') -> Iterator[None]:
    """Hold the lock file `path` (pid and host inside) for the block, so two runs never write one output.

    A lock left by a process that no longer exists on this host (killed) is taken over; one held by a
    live process, or by another host, is an error saying who holds it.
    """
    path = Path(path)
    me = f'{os.getpid()} {socket.gethostname()}\n'
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, _, host = path.read_text().strip().partition(' ')
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, host = -1, ''
            if host == socket.gethostname() and pid > 0 and not _alive(pid):
                path.unlink(missing_ok=True)  # a stale lock of a killed run
                continue
            where = f'process {pid} on {host}' if pid > 0 else 'another process'
            raise FileExistsError(
                f'another {what} ({where}) holds {path}: wait for it to finish, or stop it. If it is gone '
                '(another host cannot be checked from here), delete that file and start again'
            ) from None
        with os.fdopen(fd, 'w') as f:
            f.write(me)
        break
    else:
        raise FileExistsError(f'could not take the lock {path}: it keeps being made by another process')
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text() == me:
                path.unlink()
