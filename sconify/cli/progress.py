"""tqdm progress bars on stderr for the library's progress events (off with -q or when stderr is no tty)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click

from sconify.progress import SILENT, Progress, Task


class TqdmProgress:
    """One bar per task, stacked; safe to use from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._position = 0

    @contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "B") -> Iterator[Task]:
        from tqdm import tqdm  # only when bars are shown: importing it costs more than many conversions' set-up

        with self._lock:
            position = self._position
            self._position += 1
        bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            position=position,
            dynamic_ncols=True,
        )
        try:
            yield bar
        finally:
            bar.close()
            with self._lock:
                self._position -= 1


def progress_for(ctx: click.Context) -> Progress:
    """Bars when a person watches stderr and did not ask for quiet; silence otherwise."""
    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    if quiet or not sys.stderr.isatty():
        return SILENT
    return TqdmProgress()
