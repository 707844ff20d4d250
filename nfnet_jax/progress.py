"""Progress bars and log lines for long work (downloads, conversions, runs, benchmarks), on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm import tqdm

# In a log file (not a terminal), progress is one whole line at most this often instead of a redraw per step.
LOG_INTERVAL_S = 10.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _LineProgress(tqdm):
    """tqdm for a log file: each update it shows is a whole line, never a carriage-return redraw.

    A line is written only when the count moved since the last one (tqdm also redraws around
    every `write`), and the last count is shown once at `close`.
    """

    _shown_n: float | None = None

    def clear(self, nolock: bool = False) -> None:
        """Nothing to erase: lines in a log stay."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == '' or self.n == self._shown_n:
            return False
        self.fp.write((msg or self.__str__()) + '\n')
        self.fp.flush()
        self._shown_n = self.n
        return True

    def close(self) -> None:
        if not self.disable:
            self.display()
            self.leave = False  # the final line is written; tqdm would otherwise add a redraw and a newline
        super().close()


def progress(
    iterable: Iterable[Any] | None = None, *, total: int | None = None, file: IO[str] | None = None, **kwargs: Any
) -> tqdm:
    """A tqdm progress bar on stderr that redraws on a terminal and writes a line every few seconds to a log."""
    file = file or sys.stderr
    if file.isatty():
        return tqdm(iterable, total=total, file=file, **kwargs)
    return _LineProgress(iterable, total=total, file=file, mininterval=LOG_INTERVAL_S, **kwargs)
