"""Progress reporting that the library emits and the command line renders (tqdm on stderr); silent by default."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Task(Protocol):
    def update(self, n: int) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None, unit: str = "B") -> AbstractContextManager[Task]: ...


class _Silent:
    def update(self, n: int) -> None:
        pass


class SilentProgress:
    """The default: no output at all."""

    @contextmanager
    def task(self, description: str, total: int | None = None, unit: str = "B") -> Iterator[Task]:
        yield _Silent()


SILENT = SilentProgress()
