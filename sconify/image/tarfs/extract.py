"""Safe extraction of layers into a directory, for tests and tools: nothing is written outside it.

Every path is walked one component at a time from a directory file descriptor with ``O_NOFOLLOW``, so a
symbolic link in the destination (planted by an earlier member or layer) is never followed. Where a member
needs a directory and finds a link or a file, the link or file is replaced by a directory, which is what an
overlay file system shows when an upper layer has a directory over a lower non-directory.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

from sconify.errors import UnsafeArchiveError
from sconify.image.tarfs.entry import Entry, EntryKind, encode_name, split_path
from sconify.image.tarfs.reader import CHUNK, DEFAULT_MAX_SIZE, ByteStream, read_layer

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ExtractReport:
    """What one extraction did."""

    entries: int
    bytes: int
    whiteouts: int
    skipped: tuple[str, ...]


def _ns(mtime: Decimal) -> int:
    return int(mtime * 1_000_000_000)


def _parts(path: str) -> list[bytes]:
    return [encode_name(p) for p in path.split("/")] if path else []


class _Destination:
    """The destination directory, held open, with component-wise, link-refusing path walks."""

    def __init__(self, dest: Path, what: str) -> None:
        self.what = what
        self.fd = os.open(dest, _DIR_FLAGS)
        self.root = dest

    def close(self) -> None:
        os.close(self.fd)

    def open_dir(self, path: str, *, create: bool) -> int | None:
        """An fd of directory ``path`` (relative to the root); made (replacing non-directories) if ``create``,
        else None when absent or not a directory."""
        fd = os.dup(self.fd)
        try:
            for part in _parts(path):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)  # the mode runtimes give a parent no layer lists, whatever the umask
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    if not create:
                        os.close(fd)
                        return None
                    log.warning(
                        "%s: %r needs %r to be a directory; the link or file there is replaced by one",
                        self.what, path, part.decode("utf-8", "surrogateescape"),
                    )
                    os.unlink(part, dir_fd=fd)
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd


def _lstat(name: bytes, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(name: bytes, dir_fd: int) -> None:
    st = _lstat(name, dir_fd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)  # fd-based on Linux: never follows links inside
    else:
        os.unlink(name, dir_fd=dir_fd)


class _Extraction:
    def __init__(self, dest: _Destination, owners: bool) -> None:
        self.dest = dest
        self.owners = owners
        self.touched: set[str] = set()  # paths this layer made or used, with all their ancestors
        self.dirs: dict[str, Entry] = {}
        self.entries = 0
        self.bytes = 0
        self.whiteouts = 0
        self.skipped: list[str] = []

    def touch(self, path: str) -> None:
        while path not in self.touched:
            self.touched.add(path)
            if not path:
                break
            path = split_path(path)[0]

    def remove_lower(self, path: str) -> None:
        """Delete what lower layers left at ``path``, keeping what this layer itself made there."""
        parent, name = split_path(path)
        pfd = self.dest.open_dir(parent, create=False)
        if pfd is None:
            return
        try:
            if path not in self.touched:
                _remove(encode_name(name), pfd)
                return
            if path:
                st = _lstat(encode_name(name), pfd)
                if st is None or not stat.S_ISDIR(st.st_mode):
                    return
        finally:
            os.close(pfd)
        self.clear_lower(path)

    def clear_lower(self, directory: str) -> None:
        dfd = self.dest.open_dir(directory, create=False)
        if dfd is None:
            return
        try:
            names = os.listdir(dfd)
        finally:
            os.close(dfd)
        for name in sorted(names):
            child = os.fsdecode(name) if isinstance(name, bytes) else name
            self.remove_lower(f"{directory}/{child}" if directory else child)

    def apply(self, entry: Entry, content: Any) -> None:
        if entry.is_opaque:
            self.whiteouts += 1
            self.clear_lower(entry.parent)
            return
        if entry.is_whiteout:
            self.whiteouts += 1
            target = entry.whiteout_target
            assert target is not None
            self.remove_lower(target)
            return
        if entry.is_whiteout_meta:
            log.debug("%s: AUFS bookkeeping %r skipped", self.dest.what, entry.path)
            return
        if entry.path == "":
            self.dirs[""] = entry
            self.touch("")
            return
        parent, name = split_path(entry.path)
        pfd = self.dest.open_dir(parent, create=True)
        assert pfd is not None
        try:
            self.touch(entry.path)
            self._create(pfd, encode_name(name), entry, content)
        finally:
            os.close(pfd)
        self.entries += 1

    def _create(self, pfd: int, name: bytes, entry: Entry, content: BinaryIO | None) -> None:
        kind = entry.kind
        existing = _lstat(name, pfd)
        if kind is EntryKind.DIRECTORY:
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                os.unlink(name, dir_fd=pfd)
                existing = None
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=pfd)
            self.dirs[entry.path] = entry  # mode and time once its children are in
            return
        if kind is EntryKind.HARDLINK:
            self._link(pfd, name, entry, existing)
            return
        if existing is not None:
            _remove(name, pfd)
        if kind is EntryKind.REGULAR:
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=pfd)
            try:
                self._write(fd, entry, content)
                if self.owners:
                    os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.mode)  # after chown, which clears set-id bits
                os.utime(fd, ns=(_ns(entry.mtime), _ns(entry.mtime)))
            finally:
                os.close(fd)
            return
        if kind is EntryKind.SYMLINK:
            os.symlink(encode_name(entry.linkname), name, dir_fd=pfd)
            if self.owners:
                os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(name, ns=(_ns(entry.mtime), _ns(entry.mtime)), dir_fd=pfd, follow_symlinks=False)
            return
        if kind is EntryKind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            if os.geteuid() != 0:
                self._skip(entry, "device nodes can only be made as root")
                return
            type_bits = stat.S_IFCHR if kind is EntryKind.CHAR else stat.S_IFBLK
            try:
                os.mknod(name, type_bits | 0o600, os.makedev(entry.devmajor, entry.devminor), dir_fd=pfd)
            except PermissionError:
                self._skip(entry, "this process may not make device nodes")
                return
        # Just made exclusively by us in a directory opened without following links: the name is the node.
        if self.owners:
            os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        os.chmod(name, entry.mode, dir_fd=pfd)
        os.utime(name, ns=(_ns(entry.mtime), _ns(entry.mtime)), dir_fd=pfd, follow_symlinks=False)

    def _skip(self, entry: Entry, why: str) -> None:
        log.info("%s: %s %r skipped: %s", self.dest.what, entry.kind, entry.path, why)
        self.skipped.append(entry.path)

    def _write(self, fd: int, entry: Entry, content: BinaryIO | None) -> None:
        left = entry.size
        while left:
            data = content.read(min(CHUNK, left)) if content is not None else b""
            if not data:
                raise UnsafeArchiveError(
                    f"{self.dest.what}: the content of {entry.path!r} is shorter than its {entry.size} bytes."
                )
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            left -= len(data)
            self.bytes += len(data)

    def _link(self, pfd: int, name: bytes, entry: Entry, existing: os.stat_result | None) -> None:
        tparent, tname = split_path(entry.linkname)
        tfd = self.dest.open_dir(tparent, create=False)
        target = _lstat(encode_name(tname), tfd) if tfd is not None else None
        try:
            if target is None or stat.S_ISDIR(target.st_mode):
                raise UnsafeArchiveError(
                    f"{self.dest.what} holds the hard link {entry.path!r} to {entry.linkname!r}, which "
                    f"{'is a directory' if target is not None else 'is not extracted yet'}; "
                    "a hard link must point at a file extracted before it."
                )
            if existing is not None:
                if os.path.samestat(existing, target):
                    return
                _remove(name, pfd)
            assert tfd is not None
            os.link(encode_name(tname), name, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            if tfd is not None:
                os.close(tfd)

    def finish(self) -> None:
        # Deepest first, so that setting a directory's time is not undone by work in its children.
        for path in sorted(self.dirs, key=lambda p: p.count("/") + bool(p), reverse=True):
            entry = self.dirs[path]
            fd = self.dest.open_dir(path, create=False)
            if fd is None:  # replaced or whited out later in the same layer
                continue
            try:
                if self.owners:
                    os.fchown(fd, entry.uid, entry.gid)
                os.fchmod(fd, entry.mode)
                os.utime(fd, ns=(_ns(entry.mtime), _ns(entry.mtime)))
            finally:
                os.close(fd)


def extract(
    source: ByteStream | Iterable[tuple[Entry, Any]],
    dest_dir: str | os.PathLike[str],
    *,
    what: str = "the layer",
    owners: bool = False,
    max_size: int = DEFAULT_MAX_SIZE,
) -> ExtractReport:
    """Extract one layer (a tar stream, or ``(entry, content)`` pairs) into the existing ``dest_dir``.

    Extract several layers by calling this once per layer, lowest first, on the same directory: whiteouts
    and opaque markers then delete what the lower layers put there. Modes and mtimes are applied; owners only
    when ``owners`` is set and the process is root; device nodes only as root (otherwise skipped and listed
    in the report). Hard links may only point at files already extracted in ``dest_dir``.
    """
    dest = Path(dest_dir)
    if owners and os.geteuid() != 0:
        log.warning("%s: owners are not applied because this process is not root", what)
        owners = False
    items: Iterable[tuple[Entry, Any]]
    if hasattr(source, "read"):
        items = read_layer(source, what=what, max_size=max_size)  # type: ignore[arg-type]
    else:
        items = source  # type: ignore[assignment]
    destination = _Destination(dest, what)
    try:
        job = _Extraction(destination, owners)
        for entry, content in items:
            job.apply(entry, content)
        job.finish()
    finally:
        destination.close()
    return ExtractReport(job.entries, job.bytes, job.whiteouts, tuple(job.skipped))
