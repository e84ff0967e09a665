"""Atomic file output for the enclave package: a file is either complete (fsynced, renamed) or absent."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from sconify.errors import DestinationError, KeyMaterialError, NotFoundError


def write_atomic(
    path: Path,
    chunks: Iterable[bytes | memoryview],
    mode: int = 0o644,
    overwrite: bool = True,
    what: str = "file",
) -> None:
    """Write ``chunks`` to ``path`` through a temporary file in the same directory, then rename it.

    The temporary file has ``mode`` from its creation on, so a secret never sits in a file others
    can read. With ``overwrite`` false an existing ``path`` is refused (and never replaced, even by
    a concurrent writer: the final step is a hard link, which fails if the name exists).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise DestinationError(f"cannot write {what} {path}: directory {directory} does not exist; create it first.")
    if not overwrite and path.exists():
        raise DestinationError(f"{what} {path} already exists; choose another name or pass --force to replace it.")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise DestinationError(f"cannot write {what} {path}: {directory} is not writable ({exc.strerror}).") from exc
    tmp = Path(tmp_name)
    try:
        _write_and_rename(fd, tmp, path, chunks, mode, overwrite, what)
    except OSError as exc:
        raise DestinationError(f"cannot write {what} {path} ({exc.strerror or exc}).") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_and_rename(
    fd: int, tmp: Path, path: Path, chunks: Iterable[bytes | memoryview], mode: int, overwrite: bool, what: str
) -> None:
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise DestinationError(
                f"{what} {path} already exists; choose another name or pass --force to replace it."
            ) from exc
    dir_fd = os.open(tmp.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _input_error(exc: OSError, path: Path, what: str, key: bool) -> Exception:
    error = KeyMaterialError if key else NotFoundError
    if isinstance(exc, FileNotFoundError):
        return error(f"{what} {path} does not exist; check the path.")
    if isinstance(exc, IsADirectoryError):
        return error(f"{what} {path} is a directory; give a file.")
    if isinstance(exc, PermissionError):
        return error(f"{what} {path} is not readable ({exc.strerror}); check its permissions.")
    return error(f"{what} {path} cannot be read ({exc.strerror or exc}).")


def read_input(path: Path, what: str, key: bool = False) -> bytes:
    """Read a whole input file, turning a missing or unreadable file into a one-sentence error."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise _input_error(exc, path, what, key) from exc


def open_input(path: Path, what: str) -> BinaryIO:
    """Open an input file for streaming, with the same one-sentence errors as ``read_input``."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise _input_error(exc, path, what, False) from exc
