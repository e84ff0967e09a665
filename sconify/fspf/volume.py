"""FSPF volumes as directories on disk: protect a tree into one, verify one, decrypt one, read files from one.

Protected files keep their paths and sizes; the metadata file sits at the metadata path inside the
directory. Large files are split into segments of whole chunks that a thread pool seals or verifies
independently (hashing, AES and file I/O release the GIL), so two workers give close to twice the
throughput and memory stays at one batch per worker whatever the file sizes.

Paths inside a volume are walked one component at a time with ``O_NOFOLLOW``: a symlink planted where a
directory should be is reported, never followed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

from sconify.errors import (
    ConversionError,
    DestinationError,
    IntegrityError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from sconify.fspf.crypto import ChunkCipher, VolumeKey
from sconify.fspf.format import (
    CHUNK_ENTRY_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_METADATA_PATH,
    TAG_SIZE,
    Record,
    RecordKind,
    RegionTable,
    describe_mode,
    display_path,
    kind_of_mode,
    normalize_path,
    parent_paths,
)
from sconify.fspf.reader import (
    ContentReader,
    FileIntegrityError,
    Problem,
    ProblemKind,
    ProtectedFile,
    Volume,
    open_volume,
    size_problem,
)
from sconify.fspf.writer import VolumeResult, VolumeWriter, layer_path, mtime_ns
from sconify.image.tarfs import Entry, EntryKind
from sconify.progress import SILENT, Progress

log = logging.getLogger(__name__)

SEGMENT_BYTES = 16 * 1024 * 1024
"""Files are sealed and verified in independent segments of this many bytes (whole chunks)."""
BATCH_BYTES = 256 * 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_PROBLEMS_SHOWN = 5


def _ns_to_decimal(ns: int) -> Decimal:
    return Decimal(ns) / 1_000_000_000


def _pread_into(fd: int) -> Callable[[memoryview, int], int]:
    def pread_into(view: memoryview, offset: int) -> int:
        return os.preadv(fd, [view], offset)

    return pread_into


def _write_at(fd: int, offset: int, data: memoryview) -> None:
    _pwrite_all(fd, data, offset)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


# -- walking a tree without following links ----------------------------------------------------------


class _Beneath:
    """A directory held open, with lookups that walk each path one component at a time, never following
    a symlink. The parent directory of the last lookup is cached (records come sorted, so it often repeats)."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.fd = os.open(root, _DIR_FLAGS)
        self._cached: tuple[bytes, int] | None = None

    def close(self) -> None:
        self._drop_cache()
        os.close(self.fd)

    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def parent(self, path: bytes) -> tuple[int, bytes] | None:
        """(fd of the parent directory, last component) of ``path``, or None when a parent is missing or is
        not a directory. The fd belongs to this object; do not close it."""
        head, _, name = path.rpartition(b"/")
        head = head or b"/"
        if head == b"/":
            return self.fd, name
        if self._cached is not None and self._cached[0] == head:
            return self._cached[1], name
        fd = os.dup(self.fd)
        try:
            for part in head[1:].split(b"/"):
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        os.close(fd)
                        return None
                    raise
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        self._drop_cache()
        self._cached = (head, fd)
        return fd, name

    def lstat(self, path: bytes) -> os.stat_result | None:
        located = self.parent(path)
        if located is None:
            return None
        try:
            return os.stat(located[1], dir_fd=located[0], follow_symlinks=False)
        except FileNotFoundError:
            return None

    def open_file(self, path: bytes) -> int:
        located = self.parent(path)
        if located is None:
            raise FileNotFoundError(errno.ENOENT, "missing", display_path(path))
        return os.open(located[1], _READ_FLAGS, dir_fd=located[0])

    def readlink(self, path: bytes) -> bytes:
        located = self.parent(path)
        if located is None:
            raise FileNotFoundError(errno.ENOENT, "missing", display_path(path))
        return os.readlink(located[1], dir_fd=located[0])


def _walk(root: bytes, prune: Callable[[bytes], bool] | None = None) -> Iterator[tuple[bytes, os.stat_result]]:
    """Every path below ``root`` as (volume path, lstat), depth first, names sorted by bytes; directories
    come before their contents. Symlinks are not followed; ``prune(path)`` skips a directory's contents."""
    stack: list[bytes] = [b"/"]
    while stack:
        directory = stack.pop()
        on_disk = root + (directory if directory != b"/" else b"")
        try:
            with os.scandir(on_disk) as it:
                names = sorted(e.name for e in it)
        except FileNotFoundError:
            continue
        subdirs = []
        for name in names:
            path = (directory if directory != b"/" else b"") + b"/" + name
            st = os.lstat(root + path)
            yield path, st
            if stat.S_ISDIR(st.st_mode) and not (prune and prune(path)):
                subdirs.append(path)
        stack.extend(reversed(subdirs))


def _read_xattrs(path: bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def _entry_for(path: bytes, st: os.stat_result, on_disk: bytes, link_to: bytes | None) -> Entry:
    """The layer entry that describes ``on_disk`` (``link_to``: the earlier path of the same inode)."""
    mode = st.st_mode
    common: dict[str, Any] = {
        "mode": stat.S_IMODE(mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": _ns_to_decimal(st.st_mtime_ns),
        "xattrs": _read_xattrs(on_disk) if not stat.S_ISLNK(mode) else {},
    }
    lpath = layer_path(path)
    if link_to is not None:
        return Entry(lpath, EntryKind.HARDLINK, linkname=layer_path(link_to), **common)
    if stat.S_ISREG(mode):
        return Entry(lpath, EntryKind.REGULAR, size=st.st_size, **common)
    if stat.S_ISDIR(mode):
        return Entry(lpath, EntryKind.DIRECTORY, **common)
    if stat.S_ISLNK(mode):
        target = os.readlink(on_disk).decode("utf-8", "surrogateescape")
        return Entry(lpath, EntryKind.SYMLINK, linkname=target, **common)
    kinds = {stat.S_IFCHR: EntryKind.CHAR, stat.S_IFBLK: EntryKind.BLOCK, stat.S_IFIFO: EntryKind.FIFO}
    kind = kinds.get(stat.S_IFMT(mode))
    if kind is None:
        raise UnsupportedError(
            f"{display_path(on_disk)} is {describe_mode(mode)}, which a volume cannot hold; remove it first."
        )
    dev = st.st_rdev if kind is not EntryKind.FIFO else 0
    return Entry(lpath, kind, devmajor=os.major(dev), devminor=os.minor(dev), **common)


# -- a small pool with bounded work in flight ------------------------------------------------------------


class _Pool:
    """Runs tasks inline (one worker) or on threads, keeping at most a few batches per worker in flight.

    Small tasks are grouped into batches of at least ``SEGMENT_BYTES`` of work: a thread hand-off costs
    tens of microseconds, more than verifying a small file.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise UsageError(f"The number of workers must be at least 1, not {workers}.")
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fspf") if workers > 1 else None
        self._limit = 2 * workers
        self._in_flight: set[Future[Any]] = set()
        self._callbacks: dict[Future[Any], list[Callable[[Any], None]]] = {}
        self._batch: list[tuple[Callable[[], Any], Callable[[Any], None]]] = []
        self._batch_bytes = 0

    def submit(self, fn: Callable[[], Any], done: Callable[[Any], None], size: int = SEGMENT_BYTES) -> None:
        """Run ``fn`` (about ``size`` bytes of work) and later call ``done`` with its result, in this thread."""
        if self._executor is None:
            done(fn())
            return
        self._batch.append((fn, done))
        self._batch_bytes += max(size, 64 * 1024)
        if self._batch_bytes >= SEGMENT_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        assert self._executor is not None
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        future = self._executor.submit(_run_batch, [fn for fn, _ in batch])
        self._in_flight.add(future)
        self._callbacks[future] = [done for _, done in batch]
        while len(self._in_flight) >= self._limit:
            self._collect()

    def _collect(self) -> None:
        finished, self._in_flight = wait(self._in_flight, return_when=FIRST_COMPLETED)
        for future in finished:
            for done, result in zip(self._callbacks.pop(future), future.result(), strict=True):
                done(result)

    def drain(self) -> None:
        """Wait for everything submitted so far."""
        self._flush()
        while self._in_flight:
            self._collect()

    def close(self) -> None:
        if self._executor is not None:
            for future in self._in_flight:
                future.cancel()
            self._executor.shutdown(wait=True)


def _run_batch(tasks: list[Callable[[], Any]]) -> list[Any]:
    return [task() for task in tasks]


def _segments(size: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``[first, end)`` chunk ranges covering a file of ``size`` bytes."""
    per = max(1, SEGMENT_BYTES // chunk_size)
    total = -(-size // chunk_size)
    for first in range(0, total, per):
        yield first, min(total, first + per)


# -- protecting a directory ------------------------------------------------------------------------------


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.size = 0
        self.data = bytearray()
        self.out = bytearray()


@dataclass
class _SealJob:
    """One protected file being sealed: where it is read and written, its chunk entries, segments left."""

    path: bytes
    entry: Entry
    source: bytes
    target: bytes
    cipher: ChunkCipher
    chunks: bytearray
    left: int
    sealed: int = 0


def _seal_segment(job: _SealJob, first: int, end: int, buffers: _Buffers) -> int:
    """Seal chunks ``[first, end)`` of one file; descriptors are held only while this runs."""
    try:
        source_fd = os.open(job.source, _READ_FLAGS)
    except OSError as exc:
        raise ConversionError(
            f"Cannot read {display_path(job.source)} ({exc.strerror}); make it readable or leave it out of the tree."
        ) from None
    try:
        if os.fstat(source_fd).st_size != job.entry.size:
            raise ConversionError(
                f"{display_path(job.source)} changed size while it was protected; protect a tree that nothing "
                "else is writing to."
            )
        target_fd = os.open(job.target, _WRITE_FLAGS)
        try:
            return _seal_range(job, source_fd, target_fd, first, end, buffers)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def _seal_range(job: _SealJob, source_fd: int, target_fd: int, first: int, end: int, buffers: _Buffers) -> int:
    chunk_size = job.cipher.chunk_size
    batch = max(chunk_size, BATCH_BYTES // chunk_size * chunk_size)
    if buffers.size != batch:
        buffers.size = batch
        buffers.data = bytearray(batch)
        buffers.out = bytearray(batch + TAG_SIZE)
    data = memoryview(buffers.data)
    out = memoryview(buffers.out)
    size = job.entry.size
    index = first
    done = 0
    while index < end:
        count = min(batch // chunk_size, end - index)
        offset = index * chunk_size
        length = min(count * chunk_size, size - offset)
        got = 0
        while got < length:
            n = os.preadv(source_fd, [data[got:length]], offset + got)
            if not n:
                raise ConversionError(
                    f"{display_path(job.source)} became shorter while it was protected; protect a tree that "
                    "nothing else is writing to."
                )
            got += n
        entries = memoryview(job.chunks)[index * CHUNK_ENTRY_SIZE : (index + count) * CHUNK_ENTRY_SIZE]
        if job.cipher.encrypted:
            job.cipher.seal(index, data[:length], out, entries)
            _pwrite_all(target_fd, out[:length], offset)
        else:
            job.cipher.seal(index, data[:length], None, entries)
            _pwrite_all(target_fd, data[:length], offset)
        index += count
        done += length
    return done


def _apply_attributes(path: bytes, mode: int, uid: int, gid: int, mtime_ns: int, *, is_link: bool = False) -> None:
    if os.geteuid() == 0:
        os.chown(path, uid, gid, follow_symlinks=False)
    if not is_link:
        os.chmod(path, stat.S_IMODE(mode))
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _set_xattrs(path: bytes, xattrs: Any) -> None:
    for name, value in xattrs:
        try:
            os.setxattr(path, name, value, follow_symlinks=False)
        except OSError as exc:  # e.g. security.* without root, or a file system without xattrs
            log.info("cannot restore xattr %r on %s: %s", name, display_path(path), exc.strerror)


def _make_special(path: bytes, mode: int, devmajor: int, devminor: int) -> None:
    try:
        if stat.S_ISFIFO(mode):
            os.mkfifo(path, 0o600)
        else:
            os.mknod(path, stat.S_IFMT(mode) | 0o600, os.makedev(devmajor, devminor))
    except PermissionError:
        raise UnsupportedError(
            f"Cannot create the device {display_path(path)} without root; run as root or remove it from the tree."
        ) from None


class _Staging:
    """An output directory built next to its final place and renamed there only when complete."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise DestinationError(f"The output {out} already exists and is not empty; choose a new directory.")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = out.parent / f".{out.name}.fspf-tmp-{os.getpid()}"
            if self.tmp.exists():
                _remove_tree(self.tmp)
            self.tmp.mkdir(mode=0o700)
        except OSError as exc:
            raise DestinationError(
                f"Cannot create the output {out} ({exc.strerror}); choose a writable place."
            ) from None
        self.root = os.fsencode(self.tmp)

    def commit(self) -> None:
        if self.out.exists():
            self.out.rmdir()
        os.rename(self.tmp, self.out)

    def abort(self) -> None:
        _remove_tree(self.tmp)


def _remove_tree(path: Path) -> None:
    """Remove a staging tree, first making its directories writable (some get read-only modes)."""
    if not path.exists():
        return
    os.chmod(path, 0o700)
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path)


def _check_apart(a: Path, b: Path, what: str) -> None:
    a, b = a.resolve(), b.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UsageError(f"The {what} directories {a} and {b} overlap; choose an output outside the input.")


def protect_directory(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    regions: RegionTable,
    key: VolumeKey | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    metadata_path: bytes | str = DEFAULT_METADATA_PATH,
    metadata_mtime: int | Decimal = 0,
    workers: int = 1,
    progress: Progress = SILENT,
) -> VolumeResult:
    """Protect the tree at ``source`` into the new directory ``output``; returns key, tag and metadata.

    Regular files in protected regions are sealed, everything else is copied as it is; modes, owners
    (when run as root), mtimes, xattrs, symlinks and hard links are kept. ``output`` appears only when
    complete. The same key and tree give byte-identical output.
    """
    src = Path(source)
    if not src.is_dir():
        raise NotFoundError(f"The source {src} is not a directory; give the tree to protect.")
    out = Path(output)
    _check_apart(src, out, "source and output")
    writer = VolumeWriter(
        regions, key, chunk_size=chunk_size, metadata_path=metadata_path, metadata_mtime=metadata_mtime
    )
    src_root = os.fsencode(src)
    staging = _Staging(out)
    pool = _Pool(workers)
    try:
        with progress.task("protecting", total=None) as bar:  # type: ignore[attr-defined]
            sealer = _Sealer(writer, pool, bar.update)
            directories = _protect_tree(src_root, staging.root, sealer)
            pool.drain()
        result = writer.finish()
        _write_metadata(staging.root, result)
        for path, entry in reversed(directories):
            _apply_attributes(staging.root + path, entry.mode, entry.uid, entry.gid, _entry_ns(entry))
        root_st = os.stat(src_root)
        _apply_attributes(staging.root, root_st.st_mode, root_st.st_uid, root_st.st_gid, root_st.st_mtime_ns)
        staging.commit()
    except BaseException:
        pool.close()
        staging.abort()
        raise
    pool.close()
    return result


def _entry_ns(entry: Entry) -> int:
    return mtime_ns(entry.mtime)


def _protect_tree(src_root: bytes, dst_root: bytes, sealer: _Sealer) -> list[tuple[bytes, Entry]]:
    """Walk the source, create the output tree and start sealing; returns the directories, whose
    attributes are set last (children first)."""
    writer, pool = sealer.writer, sealer.pool
    inodes: dict[tuple[int, int], bytes] = {}
    directories: list[tuple[bytes, Entry]] = []
    links: list[tuple[bytes, Entry]] = []
    for path, st in _walk(src_root):
        on_disk = src_root + path
        link_to = None
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            link_to = inodes.setdefault((st.st_dev, st.st_ino), path)
            if link_to == path:
                link_to = None
        entry = _entry_for(path, st, on_disk, link_to)
        mode = writer.admit(entry)
        target = dst_root + path
        if entry.kind is EntryKind.DIRECTORY:
            os.mkdir(target, 0o700)
            _set_xattrs(target, sorted(entry.xattrs.items()))
            directories.append((path, entry))
        elif entry.kind is EntryKind.SYMLINK:
            os.symlink(entry.linkname.encode("utf-8", "surrogateescape"), target)
            _apply_attributes(target, entry.mode, entry.uid, entry.gid, _entry_ns(entry), is_link=True)
        elif entry.kind is EntryKind.HARDLINK:
            links.append((path, entry))
        elif entry.kind is EntryKind.REGULAR:
            if mode.protected:
                sealer.start(path, entry, on_disk, target)
            else:
                pool.submit(partial(_copy_plain, on_disk, target, entry), sealer.advance, entry.size)
        else:
            _make_special(target, st.st_mode, entry.devmajor, entry.devminor)
            _set_xattrs(target, sorted(entry.xattrs.items()))
            _apply_attributes(target, entry.mode, entry.uid, entry.gid, _entry_ns(entry))
    pool.drain()
    for path, entry in links:
        os.link(dst_root + normalize_path(entry.linkname), dst_root + path, follow_symlinks=False)
    return directories


def _copy_plain(source: bytes, target: bytes, entry: Entry) -> int:
    shutil.copyfile(source, target, follow_symlinks=False)
    _set_xattrs(target, sorted(entry.xattrs.items()))
    _apply_attributes(target, entry.mode, entry.uid, entry.gid, _entry_ns(entry))
    return entry.size


class _Sealer:
    """Starts the sealing of protected files on the pool and completes each when its last segment is done."""

    def __init__(self, writer: VolumeWriter, pool: _Pool, advance: Callable[[int], None]) -> None:
        self.writer = writer
        self.pool = pool
        self.advance = advance
        self.buffers = _Buffers()

    def start(self, path: bytes, entry: Entry, on_disk: bytes, target: bytes) -> None:
        writer = self.writer
        os.close(os.open(target, _CREATE_FLAGS, 0o600))  # segments write into it in any order
        job = _SealJob(
            path=path,
            entry=entry,
            source=on_disk,
            target=target,
            cipher=writer.cipher_for(path, writer.regions.mode_for(path)),
            chunks=bytearray(-(-entry.size // writer.chunk_size) * CHUNK_ENTRY_SIZE),
            left=0,
        )
        segments = list(_segments(entry.size, writer.chunk_size))
        job.left = len(segments)

        def finished(done: int) -> None:
            job.sealed += done
            job.left -= 1
            self.advance(done)
            if job.left == 0:
                self._finish(job)

        if not segments:
            if os.stat(on_disk).st_size:
                raise ConversionError(
                    f"{display_path(on_disk)} changed size while it was protected; protect a tree that nothing "
                    "else is writing to."
                )
            self._finish(job)
        for first, end in segments:
            task = partial(_seal_segment, job, first, end, self.buffers)
            self.pool.submit(task, finished, (end - first) * writer.chunk_size)

    def _finish(self, job: _SealJob) -> None:
        self.writer.record_file(job.path, job.sealed, bytes(job.chunks))
        entry = job.entry
        _set_xattrs(job.target, sorted(entry.xattrs.items()))
        _apply_attributes(job.target, entry.mode, entry.uid, entry.gid, _entry_ns(entry))


def _write_metadata(root: bytes, result: VolumeResult) -> None:
    for entry, content in result.entries():
        target = root + normalize_path(entry.path)
        if entry.kind is EntryKind.DIRECTORY:
            os.mkdir(target, 0o755)
        else:
            assert content is not None
            fd = os.open(target, _CREATE_FLAGS, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
        os.utime(target, ns=(_entry_ns(entry), _entry_ns(entry)))


# -- reading a directory volume ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of checking every protected path of a volume."""

    tag: bytes
    records: int
    files: int
    total_bytes: int
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def failure(self) -> str:
        """One sentence naming the first problems, for an error."""
        shown = "; ".join(p.message for p in self.problems[:_MAX_PROBLEMS_SHOWN])
        more = len(self.problems) - _MAX_PROBLEMS_SHOWN
        tail = f" (and {more} more)" if more > 0 else ""
        return f"{len(self.problems)} protected paths failed verification: {shown}{tail}"


@dataclass
class _CheckJob:
    """One file whose content is being checked (and, when decrypting, written to ``out_path``)."""

    record: Record
    content: Record
    out_path: bytes | None
    problems: list[Problem] = field(default_factory=list)


class _WorkerState(threading.local):
    """Per thread: a reader with its buffers and a walker of the volume with its own descriptors."""

    beneath: _Beneath | None = None
    reader: ContentReader | None = None


class DirectoryVolume:
    """A protected volume in a directory, opened with its key and the expected tag.

    Opening authenticates the metadata (raising WrongKeyError, MetadataTamperedError or
    StateMismatchError); :meth:`verify`, :meth:`decrypt_to`, :meth:`open` and :meth:`read_range` then check
    every byte they touch against it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        key: VolumeKey,
        tag: bytes | None,
        *,
        metadata_path: bytes | str = DEFAULT_METADATA_PATH,
    ) -> None:
        self.root_path = Path(root)
        if not self.root_path.is_dir():
            raise NotFoundError(f"The volume {self.root_path} is not a directory; give the output of `fs protect`.")
        self.metadata_path = normalize_path(metadata_path, what="metadata path")
        self._beneath = _Beneath(os.fsencode(self.root_path))
        self._lock = threading.Lock()
        where = f"the metadata file {display_path(self.metadata_path)} of {self.root_path}"
        try:
            fd = self._beneath.open_file(self.metadata_path)
        except OSError:
            self._beneath.close()
            raise NotFoundError(
                f"{self.root_path} has no metadata file at {display_path(self.metadata_path)}; give the output "
                "of `sconify fs protect` (or its --metadata-path)."
            ) from None
        try:
            with os.fdopen(fd, "rb") as handle:
                metadata = handle.read()
            self.volume: Volume = open_volume(metadata, key, tag, where=where)
        except BaseException:
            self._beneath.close()
            raise

    def close(self) -> None:
        self._beneath.close()

    def __enter__(self) -> DirectoryVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- single files ------------------------------------------------------------------------------------

    def open(self, path: bytes | str) -> ProtectedFile:
        """A protected file for reading; every byte read is verified (FileIntegrityError otherwise)."""
        record = self.volume.record(path)
        content = self.volume.content_record(record)
        problem, fd = self._open_stored(record, content)
        if problem is not None:
            raise FileIntegrityError(problem)
        assert fd is not None
        return ProtectedFile(self.volume, record, _pread_into(fd), os.fstat(fd).st_size, closer=lambda: os.close(fd))

    def read_file(self, path: bytes | str) -> bytes:
        """The verified plaintext of one protected file."""
        with self.open(path) as handle:
            return handle.read()

    def read_range(self, path: bytes | str, offset: int, length: int) -> bytes:
        """Verified plaintext of ``length`` bytes at ``offset``, reading only the chunks that hold them."""
        record = self.volume.record(path)
        content = self.volume.content_record(record)
        problem, fd = self._open_stored(record, content)
        if problem is not None:
            raise FileIntegrityError(problem)
        assert fd is not None
        try:
            return ContentReader(self.volume).read_range(record, _pread_into(fd), offset, length)
        finally:
            os.close(fd)

    def _stored_problem(self, record: Record, content: Record) -> Problem | None:
        """What is wrong with the type or size of the stored file of a FILE or HARDLINK record, if anything."""
        with self._lock:
            st = self._beneath.lstat(record.path)
        if st is None:
            return _missing(record.path)
        if not stat.S_ISREG(st.st_mode):
            return _type_changed(record.path, st.st_mode, "a regular file")
        if st.st_size != content.size:
            return size_problem(record.path, st.st_size, content.size)
        return None

    def _open_stored(self, record: Record, content: Record) -> tuple[Problem | None, int | None]:
        """Open the stored file of a FILE or HARDLINK record after checking its type and size."""
        problem = self._stored_problem(record, content)
        if problem is not None:
            return problem, None
        try:
            with self._lock:
                return None, self._beneath.open_file(record.path)
        except OSError as exc:
            return Problem(record.path, ProblemKind.UNREADABLE, f"cannot be read ({exc.strerror})"), None

    # -- the whole tree ----------------------------------------------------------------------------------

    def verify(self, *, workers: int = 1, progress: Progress = SILENT) -> VerifyReport:
        """Check every protected path: presence, type, size, link targets, every chunk, and that nothing
        was added to a protected region. Problems are reported, not raised."""
        return self._check(None, workers, progress)

    def decrypt_to(
        self, output: str | os.PathLike[str], *, workers: int = 1, progress: Progress = SILENT
    ) -> VerifyReport:
        """Write the plaintext tree to the new directory ``output`` (protected paths verified, not-protected
        ones copied as they are). Raises IntegrityError, leaving no output, if any check fails."""
        out = Path(output)
        _check_apart(self.root_path, out, "volume and output")
        staging = _Staging(out)
        try:
            report = self._check(staging.root, workers, progress)
            if not report.ok:
                raise IntegrityError(f"{report.failure()}; nothing was decrypted.")
            staging.commit()
        except BaseException:
            staging.abort()
            raise
        return report

    def _check(self, output: bytes | None, workers: int, progress: Progress) -> VerifyReport:
        volume = self.volume
        problems: list[Problem] = []
        pool = _Pool(workers)
        state = _WorkerState()
        walkers: list[_Beneath] = []
        files = total = 0
        jobs: list[_CheckJob] = []

        def worker_state() -> tuple[_Beneath, ContentReader]:
            if state.beneath is None or state.reader is None:
                state.reader = ContentReader(volume)
                state.beneath = _Beneath(self._beneath.root)
                with self._lock:
                    walkers.append(state.beneath)
            return state.beneath, state.reader

        try:
            what = "verifying" if output is None else "decrypting"
            with progress.task(what, total=volume.protected_bytes) as bar:  # type: ignore[attr-defined]
                for record in volume.records:
                    if record.kind in (RecordKind.FILE, RecordKind.HARDLINK):
                        job = self._start_check(record, output, problems)
                        if job is None:
                            continue
                        jobs.append(job)
                        files += 1
                        total += job.content.size
                        self._submit_check(job, pool, worker_state, bar.update)
                    else:
                        problem = self._check_other(record, output)
                        if problem is not None:
                            problems.append(problem)
                pool.drain()
            for job in jobs:
                problems.extend(job.problems)
            problems.extend(self._unexpected(output))
            if output is not None and not problems:
                self._finish_output(output)
        finally:
            pool.close()
            for walker in walkers:
                walker.close()
        problems.sort(key=lambda p: (p.path, p.kind))
        return VerifyReport(volume.tag, len(volume.records), files, total, tuple(problems))

    def _start_check(self, record: Record, output: bytes | None, problems: list[Problem]) -> _CheckJob | None:
        content = self.volume.content_record(record)
        problem = self._stored_problem(record, content)
        if problem is not None:
            problems.append(problem)
            return None
        out_path = None
        if output is not None and record.kind is RecordKind.FILE:
            out_path = output + record.path
            _make_parents(output, record.path)
            fd = os.open(out_path, _CREATE_FLAGS, 0o600)
            try:
                os.ftruncate(fd, content.size)
            finally:
                os.close(fd)
        return _CheckJob(record, content, out_path)

    def _submit_check(
        self,
        job: _CheckJob,
        pool: _Pool,
        worker_state: Callable[[], tuple[_Beneath, ContentReader]],
        advance: Callable[[int], None],
    ) -> None:
        chunk_size = self.volume.chunk_size
        cipher = self.volume.cipher(job.content)
        path = job.record.path

        def task(first: int, end: int) -> tuple[Problem | None, int]:
            """Check one segment; the stored file (and the decrypted one) are open only meanwhile."""
            size = min(job.content.size, end * chunk_size) - first * chunk_size
            beneath, reader = worker_state()
            try:
                fd = beneath.open_file(path)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    return _missing(path), size
                return Problem(path, ProblemKind.UNREADABLE, f"cannot be read ({exc.strerror})"), size
            out_fd = None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return _type_changed(path, st.st_mode, "a regular file"), size
                if st.st_size != job.content.size:
                    return size_problem(path, st.st_size, job.content.size), size
                sink = None
                if job.out_path is not None:
                    out_fd = os.open(job.out_path, _WRITE_FLAGS)
                    sink = partial(_write_at, out_fd)
                problem = reader.check(
                    job.content,
                    _pread_into(fd),
                    first_chunk=first,
                    end_chunk=end,
                    cipher=cipher,
                    sink=sink,
                    shown_path=path,
                )
                return problem, size
            finally:
                os.close(fd)
                if out_fd is not None:
                    os.close(out_fd)

        def finished(outcome: tuple[Problem | None, int]) -> None:
            problem, size = outcome
            advance(size)
            if problem is not None and not job.problems:
                job.problems.append(problem)

        for first, end in _segments(job.content.size, chunk_size):
            pool.submit(partial(task, first, end), finished, (end - first) * chunk_size)

    def _check_other(self, record: Record, output: bytes | None) -> Problem | None:
        """Check a directory, symlink or special file record (and recreate it when decrypting)."""
        with self._lock:
            st = self._beneath.lstat(record.path)
            if st is None:
                return _missing(record.path)
            expected = {RecordKind.DIRECTORY: "a directory", RecordKind.SYMLINK: "a symlink"}.get(record.kind)
            if record.kind is RecordKind.SPECIAL:
                if stat.S_IFMT(st.st_mode) != stat.S_IFMT(record.st_mode):
                    return _type_changed(record.path, st.st_mode, describe_mode(record.st_mode))
                if not stat.S_ISFIFO(record.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
                    record.devmajor,
                    record.devminor,
                ):
                    return Problem(
                        record.path,
                        ProblemKind.LINK_CHANGED,
                        f"has device {os.major(st.st_rdev)},{os.minor(st.st_rdev)}, expected "
                        f"{record.devmajor},{record.devminor}",
                    )
            elif kind_of_mode(st.st_mode) is not record.kind:
                return _type_changed(record.path, st.st_mode, expected or record.kind.label)
            if record.kind is RecordKind.SYMLINK:
                target = self._beneath.readlink(record.path)
                if target != record.target:
                    return Problem(
                        record.path,
                        ProblemKind.LINK_CHANGED,
                        f"points to {display_path(target)}, expected {display_path(record.target)}",
                    )
        if output is not None:
            _make_parents(output, record.path)
            target_path = output + record.path
            if record.kind is RecordKind.DIRECTORY:
                os.mkdir(target_path, 0o700)
            elif record.kind is RecordKind.SPECIAL:
                _make_special(target_path, record.st_mode, record.devmajor, record.devminor)
        return None

    def _unexpected(self, output: bytes | None) -> list[Problem]:
        """Paths in protected regions that the metadata does not list; when decrypting, also copy the
        not-protected paths."""
        regions = self.volume.regions
        records = self.volume.by_path
        exempt = {self.metadata_path, *parent_paths(self.metadata_path)}
        # parents of recorded paths that a layer left implicit: they exist on disk without a record, and
        # cannot have been added (the recorded paths below them already need them)
        implied = {parent for path in records for parent in parent_paths(path)}
        root = self._beneath.root
        problems = []
        inodes: dict[tuple[int, int], bytes] = {}
        copied_dirs: list[tuple[bytes, os.stat_result]] = []

        def prune(path: bytes) -> bool:
            return output is None and not regions.protected_at_or_below(path)

        for path, st in _walk(root, prune):
            if path in records:
                continue
            region = regions.region_for(path)
            if region.mode.protected:
                if path not in exempt and not (path in implied and stat.S_ISDIR(st.st_mode)):
                    problems.append(
                        Problem(
                            path,
                            ProblemKind.UNEXPECTED,
                            f"is {describe_mode(st.st_mode)} in the {region} region but not in the metadata: it "
                            "was added, or renamed from another path",
                        )
                    )
                continue
            if output is None or path == self.metadata_path:
                continue
            copied = _copy_unprotected(root + path, output, path, st, inodes)
            if copied:
                copied_dirs.append((path, st))
        if output is not None:
            for path, st in reversed(copied_dirs):
                _apply_attributes(output + path, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        return problems

    def _finish_output(self, output: bytes) -> None:
        """Hard links, symlinks and attributes of the decrypted tree, then the metadata's empty parents."""
        volume = self.volume
        for record in volume.records:
            target = output + record.path
            if record.kind is RecordKind.HARDLINK:
                os.link(output + record.target, target)
            elif record.kind is RecordKind.SYMLINK:
                _make_parents(output, record.path)
                os.symlink(record.target, target)
                _apply_attributes(target, record.st_mode, record.uid, record.gid, record.mtime_ns, is_link=True)
        for record in volume.records:
            if record.kind in (RecordKind.FILE, RecordKind.SPECIAL):
                _set_xattrs(output + record.path, record.xattrs)
                _apply_attributes(output + record.path, record.st_mode, record.uid, record.gid, record.mtime_ns)
        for record in reversed(volume.records):
            if record.kind is RecordKind.DIRECTORY:
                _set_xattrs(output + record.path, record.xattrs)
                _apply_attributes(output + record.path, record.st_mode, record.uid, record.gid, record.mtime_ns)
        for parent in parent_paths(self.metadata_path):
            if parent == b"/" or parent in volume.by_path:
                break
            try:
                os.rmdir(output + parent)
            except OSError:
                break
        root_st = os.stat(self._beneath.root)
        _apply_attributes(output, root_st.st_mode, root_st.st_uid, root_st.st_gid, root_st.st_mtime_ns)


def _copy_unprotected(
    source: bytes, output: bytes, path: bytes, st: os.stat_result, inodes: dict[tuple[int, int], bytes]
) -> bool:
    """Copy one not-protected path into the decrypted tree; True for directories (attributes come later)."""
    target = output + path
    _make_parents(output, path)
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        if not os.path.isdir(target):
            os.mkdir(target, 0o700)
        return True
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        first = inodes.setdefault((st.st_dev, st.st_ino), path)
        if first != path:
            os.link(output + first, target)
            return False
    if stat.S_ISLNK(mode):
        os.symlink(os.readlink(source), target)
        _apply_attributes(target, mode, st.st_uid, st.st_gid, st.st_mtime_ns, is_link=True)
        return False
    if stat.S_ISREG(mode):
        shutil.copyfile(source, target, follow_symlinks=False)
    else:
        _make_special(target, mode, os.major(st.st_rdev), os.minor(st.st_rdev))
    _set_xattrs(target, sorted(_read_xattrs(source).items()))
    _apply_attributes(target, mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return False


def _make_parents(output: bytes, path: bytes) -> None:
    """Create the parents of ``path`` in the output (recorded ones get their modes at the end)."""
    parent = path.rpartition(b"/")[0]
    if parent and not os.path.isdir(output + parent):
        os.makedirs(output + parent, 0o755, exist_ok=True)


def _missing(path: bytes) -> Problem:
    return Problem(path, ProblemKind.MISSING, "is missing: it was removed or renamed (or a parent directory was)")


def _type_changed(path: bytes, st_mode: int, expected: str) -> Problem:
    return Problem(path, ProblemKind.TYPE_CHANGED, f"is {describe_mode(st_mode)}, expected {expected}")


def verify_directory(
    root: str | os.PathLike[str],
    key: VolumeKey,
    tag: bytes,
    *,
    metadata_path: bytes | str = DEFAULT_METADATA_PATH,
    workers: int = 1,
    progress: Progress = SILENT,
) -> VerifyReport:
    """Open and verify a directory volume in one call."""
    with DirectoryVolume(root, key, tag, metadata_path=metadata_path) as volume:
        return volume.verify(workers=workers, progress=progress)
