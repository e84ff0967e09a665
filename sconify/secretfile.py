"""The one place that writes files holding keys or policies: mode 0600 from the first byte, atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from sconify.errors import DestinationError, KeyMaterialError


def write_secret(path: Path, data: bytes, *, force: bool = False, what: str = "key") -> None:
    """Write ``data`` to ``path`` with mode 0600: temp file in the same directory, fsync, rename.

    An existing file is replaced only with ``force``; the file never exists with wider permissions or
    partial content.
    """
    path = Path(path)
    if path.exists() and not force:
        raise DestinationError(f"{what} file {str(path)!r} already exists; remove it or pass --force to replace it.")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise DestinationError(f"directory {str(parent)!r} for the {what} file does not exist; create it first.")
    old = os.umask(0o077)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    finally:
        os.umask(old)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)  # the rename itself survives a crash
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_secret_files(directory: Path, files: dict[str, bytes]) -> None:
    """Write new files holding keys or policies into ``directory`` (one that nobody else uses yet, such as a
    staging directory that is renamed into place afterwards): each is created with mode 0600, all are written
    and then made durable together, with one flush of the directory, which is much quicker than one atomic
    ``write_secret`` after another."""
    directory = Path(directory)
    fds = []
    try:
        for name, data in files.items():
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        for fd in fds:  # the first flush commits the others' data and names as well
            os.fsync(fd)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        for fd in fds:
            os.close(fd)


def read_secret(path: Path, what: str = "key") -> bytes:
    """Read a key or policy file, with a clear error when it is missing or unreadable."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"{what} file {str(path)!r} does not exist; give the right path.") from None
    except OSError as exc:
        raise KeyMaterialError(f"{what} file {str(path)!r} cannot be read ({exc.strerror}).") from None


def make_private_dir(path: Path) -> None:
    """Create a directory for policies and keys with mode 0700 (an existing one is tightened)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
