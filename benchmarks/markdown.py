"""The markdown tables of the benchmarks' reports, in one format for every command that prints or writes one.

Only the standard library: the accelerator run's watching process imports it without torch or JAX.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def fmt(value: Any, spec: str = '.2f') -> str:
    """A cell: None as 'n/a', a float through `spec`, anything else as str."""
    if value is None:
        return 'n/a'
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table's lines: the header, its rule, and a line per row of cells (each shown through `fmt`)."""
    return [
        '| ' + ' | '.join(columns) + ' |',
        '|' + '---|' * len(columns),
        *('| ' + ' | '.join(fmt(cell) for cell in row) + ' |' for row in rows),
    ]
