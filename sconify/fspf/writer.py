"""The streaming FSPF writer: layer entries in, protected entries plus metadata, key and tag out.

The input is what ``sconify.image.tarfs.read_layer`` yields, ``(Entry, content)`` pairs, and the output
goes straight into ``LayerWriter.add``: the entry is unchanged (protected files keep their size), only the
content stream differs. A caller (the image converter, or ``volume.protect_directory``) feeds entries one
at a time. Each protected
regular file comes back as a stream of the same length whose bytes are sealed chunk by chunk while it is
read, so memory stays at one batch of chunks per stream whatever the file size. The metadata (one record
per protected entry) is the only thing kept for the whole tree.
"""

from __future__ import annotations

import io
import stat
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import BinaryIO, cast

from sconify.errors import ConversionError, UsageError
from sconify.fspf.crypto import ChunkCipher, VolumeKey
from sconify.fspf.format import (
    CHUNK_ENTRY_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_METADATA_PATH,
    FORMAT_VERSION,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SUITE_HMAC_SIV_AES256GCM,
    TAG_SIZE,
    Header,
    Record,
    RecordKind,
    RegionMode,
    RegionTable,
    display_path,
    encode_body,
    is_below,
    normalize_path,
    parent_paths,
    valid_chunk_size,
)
from sconify.image.tarfs import Entry, EntryKind, decode_name, encode_name

BATCH_BYTES = 1024 * 1024
"""How much a sealing stream reads and seals at a time (rounded to whole chunks)."""

_TYPE_BITS = {
    EntryKind.REGULAR: stat.S_IFREG,
    EntryKind.DIRECTORY: stat.S_IFDIR,
    EntryKind.SYMLINK: stat.S_IFLNK,
    EntryKind.HARDLINK: stat.S_IFREG,
    EntryKind.CHAR: stat.S_IFCHR,
    EntryKind.BLOCK: stat.S_IFBLK,
    EntryKind.FIFO: stat.S_IFIFO,
}
_RECORD_KINDS = {
    EntryKind.DIRECTORY: RecordKind.DIRECTORY,
    EntryKind.SYMLINK: RecordKind.SYMLINK,
    EntryKind.HARDLINK: RecordKind.HARDLINK,
}


def volume_path(layer_path: str) -> bytes:
    """The volume path (``/app/main.py``) of a layer entry path (``app/main.py``; the root is "")."""
    raw = encode_name(layer_path)
    # Already normal (the common case: no empty, "." or ".." component, no NUL): only the leading "/" is missing.
    if raw and raw[0] != 47 and raw[-1] != 47 and b"//" not in raw and b"/." not in raw and raw[0] != 46 \
            and b"\0" not in raw:
        return b"/" + raw
    return normalize_path(raw)


def layer_path(path: bytes) -> str:
    """The layer entry path (``app/main.py``) of a volume path (``/app/main.py``)."""
    return decode_name(path[1:])


def mtime_ns(mtime: Decimal) -> int:
    """An entry's mtime in whole nanoseconds (rounded down), as the metadata stores it."""
    return int((Decimal(mtime) * 1_000_000_000).to_integral_value(rounding=ROUND_FLOOR))


def st_mode(entry: Entry) -> int:
    """The ``stat``-style mode (type and permission bits) of an entry."""
    return _TYPE_BITS[entry.kind] | (entry.mode & 0o7777)


@dataclass(frozen=True)
class ProtectedEntry:
    """What goes into the output layer for one input entry.

    ``entry`` is the input entry, unchanged: protected files keep their size, so the header stays valid.
    ``content`` is the stream to store for a regular file: sealed bytes for a protected file, the input
    stream itself otherwise. ``protection`` is the mode of the entry's region.
    """

    entry: Entry
    content: BinaryIO | None
    protection: RegionMode


@dataclass(frozen=True)
class VolumeResult:
    """The outcome of protecting a tree: the metadata file, where it goes, and the policy's key and tag."""

    key: VolumeKey
    tag: bytes
    metadata: bytes
    metadata_path: bytes
    regions: RegionTable
    chunk_size: int
    files: int
    total_bytes: int
    metadata_mtime: Decimal = Decimal(0)
    missing_parents: tuple[bytes, ...] = ()
    """The metadata file's parent directories that the input did not have, outermost first."""

    def entries(self) -> list[tuple[Entry, bytes | None]]:
        """The ``(entry, content)`` pairs to add to the output: missing parents, then the metadata file."""
        out: list[tuple[Entry, bytes | None]] = [
            (Entry.directory(layer_path(p), mode=0o755, mtime=self.metadata_mtime), None) for p in self.missing_parents
        ]
        meta = Entry.file(layer_path(self.metadata_path), len(self.metadata), mode=0o644, mtime=self.metadata_mtime)
        out.append((meta, self.metadata))
        return out


class VolumeWriter:
    """Builds one protected volume from a sequence of layer entries.

    For every ``(entry, content)`` call :meth:`protect` and read the returned content to its end before the
    next call; then :meth:`finish`. Paths must be unique; a hard link must come after the file it links
    to, as in a tar stream. Without ``key`` a random key is made.
    """

    def __init__(
        self,
        regions: RegionTable,
        key: VolumeKey | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        metadata_path: bytes | str = DEFAULT_METADATA_PATH,
        metadata_mtime: int | Decimal = 0,
    ) -> None:
        if not valid_chunk_size(chunk_size):
            raise UsageError(
                f"The chunk size {chunk_size} is not a power of two between {MIN_CHUNK_SIZE} and "
                f"{MAX_CHUNK_SIZE}; use e.g. 65536."
            )
        self.regions = regions
        self.key = key if key is not None else VolumeKey.generate()
        self.chunk_size = chunk_size
        self.metadata_path = normalize_path(metadata_path, what="metadata path")
        if self.metadata_path == b"/":
            raise UsageError("The metadata path must name a file, e.g. /.sconify/fspf/volume.fspf.")
        self.metadata_mtime = Decimal(metadata_mtime)
        self._metadata_parents = set(parent_paths(self.metadata_path)) - {b"/"}
        self._records: dict[bytes, Record] = {}
        self._pending: dict[bytes, Entry] = {}
        self._seen: set[bytes] = set()
        self._open_stream: SealingStream | None = None
        self._files = 0
        self._bytes = 0
        self._finished = False

    # -- the streaming interface --------------------------------------------------------------------

    def protect(self, entry: Entry, content: BinaryIO | None = None) -> ProtectedEntry:
        """Admit one entry and return what to store for it (read its content before the next call)."""
        mode = self.admit(entry)
        if entry.kind is not EntryKind.REGULAR or not mode.protected:
            return ProtectedEntry(entry, content, mode)
        path = volume_path(entry.path)
        if content is None and entry.size:
            raise UsageError(f"The file entry {display_path(path)} has {entry.size} bytes but no content stream.")
        stream = SealingStream(self, path, entry.size, content, self.cipher_for(path, mode))
        self._open_stream = stream
        return ProtectedEntry(entry, cast(BinaryIO, stream), mode)

    def finish(self) -> VolumeResult:
        """Seal the metadata; returns the metadata file, its path, the key and the tag."""
        self._check_stream_done()
        if self._pending:
            first = display_path(next(iter(self._pending)))
            raise RuntimeError(f"{len(self._pending)} protected files were never sealed, e.g. {first}")
        body = encode_body(self.regions, self._records.values(), self.chunk_size)
        header = Header(FORMAT_VERSION, SUITE_HMAC_SIV_AES256GCM, self.chunk_size, len(body), self.key.key_id)
        metadata, tag = self.key.seal_metadata(header, body)
        self._finished = True
        return VolumeResult(
            key=self.key,
            tag=tag,
            metadata=metadata,
            metadata_path=self.metadata_path,
            regions=self.regions,
            chunk_size=self.chunk_size,
            files=self._files,
            total_bytes=self._bytes,
            metadata_mtime=self.metadata_mtime,
            missing_parents=tuple(sorted(self._metadata_parents - self._seen)),
        )

    # -- the interface for sources that seal files themselves (volume.protect_directory) -----------

    def admit(self, entry: Entry) -> RegionMode:
        """Check an entry, record it if it is protected and not a regular file, and return its mode.

        A protected regular file is only reserved here; :meth:`record_file` completes it after sealing.
        """
        self._check_stream_done()
        if self._finished:
            raise RuntimeError("the volume is already finished")
        if entry.is_overlay_marker:
            # layer bookkeeping for the overlay, never a file the application sees: stored as it is
            return RegionMode.NOT_PROTECTED
        path = volume_path(entry.path)
        if is_below(path, self.metadata_path):
            raise ConversionError(
                f"The input already has an entry at the metadata path {display_path(path)}; remove it or "
                "choose another metadata path."
            )
        if path in self._metadata_parents and entry.kind is not EntryKind.DIRECTORY:
            raise ConversionError(
                f"The input has a {entry.kind.value} at {display_path(path)}, where the metadata file "
                f"{display_path(self.metadata_path)} needs a directory; choose another metadata path."
            )
        if path in self._seen:
            raise ConversionError(f"The input has two entries for {display_path(path)}; keep one of them.")
        mode = self.regions.mode_for(path)
        link = volume_path(entry.linkname) if entry.kind is EntryKind.HARDLINK else encode_name(entry.linkname)
        if entry.kind is EntryKind.HARDLINK:
            self._admit_hardlink(path, link, mode)
        self._seen.add(path)
        if not mode.protected or path == b"/":
            return mode
        if entry.kind is EntryKind.REGULAR:
            self._pending[path] = entry
            return mode
        self._records[path] = Record(
            path=path,
            kind=_RECORD_KINDS.get(entry.kind, RecordKind.SPECIAL),
            protection=mode,
            st_mode=st_mode(entry),
            uid=entry.uid,
            gid=entry.gid,
            mtime_ns=mtime_ns(entry.mtime),
            xattrs=_xattrs(entry),
            target=link,
            devmajor=entry.devmajor if entry.kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
            devminor=entry.devminor if entry.kind in (EntryKind.CHAR, EntryKind.BLOCK) else 0,
        )
        return mode

    def cipher_for(self, path: bytes, mode: RegionMode) -> ChunkCipher:
        """The chunk cipher of the protected file at volume path ``path``."""
        return self.key.chunk_cipher(path, mode, self.chunk_size)

    def record_file(self, path: bytes, size: int, chunks: bytes) -> None:
        """Complete the record of a protected regular file admitted earlier, after sealing its content."""
        entry = self._pending.pop(path)
        if size != entry.size:
            raise ConversionError(
                f"The content of {display_path(path)} is {size} bytes but its entry says {entry.size}; the "
                "input changed while it was read or is malformed."
            )
        if len(chunks) != -(-size // self.chunk_size) * CHUNK_ENTRY_SIZE:
            raise RuntimeError(f"wrong number of chunk entries for {display_path(path)}")
        self._records[path] = Record(
            path=path,
            kind=RecordKind.FILE,
            protection=self.regions.mode_for(path),
            st_mode=st_mode(entry),
            uid=entry.uid,
            gid=entry.gid,
            mtime_ns=mtime_ns(entry.mtime),
            xattrs=_xattrs(entry),
            size=size,
            chunks=chunks,
        )
        self._files += 1
        self._bytes += size

    # -- internals -----------------------------------------------------------------------------------

    def _admit_hardlink(self, path: bytes, target: bytes, mode: RegionMode) -> None:
        target_mode = self.regions.mode_for(target)
        if target_mode != mode:
            raise ConversionError(
                f"The hard link {display_path(path)} ({mode.label}) and its file {display_path(target)} "
                f"({target_mode.label}) are in regions of different protection; put both in the same region "
                "or replace the link by a copy."
            )
        if not mode.protected:
            return
        record = self._records.get(target)
        if target not in self._pending and (record is None or record.kind is not RecordKind.FILE):
            raise ConversionError(
                f"The hard link {display_path(path)} names {display_path(target)}, which is not a regular file "
                "that comes before it in the input; a hard link must follow the file it links to."
            )

    def _check_stream_done(self) -> None:
        stream = self._open_stream
        if stream is not None and not stream.done:
            raise RuntimeError(
                f"the content of {display_path(stream.path)} must be read to the end before the next entry"
            )
        self._open_stream = None


def _xattrs(entry: Entry) -> tuple[tuple[bytes, bytes], ...]:
    return tuple(sorted((encode_name(name), bytes(value)) for name, value in entry.xattrs.items()))


class SealingStream(io.RawIOBase):
    """A readable stream of a protected file's stored bytes, sealed batch by batch as it is read."""

    def __init__(
        self, writer: VolumeWriter, path: bytes, size: int, source: BinaryIO | None, cipher: ChunkCipher
    ) -> None:
        super().__init__()
        self.path = path
        self._writer = writer
        self._source = source
        self._cipher = cipher
        self._size = size
        self._remaining = size
        self._index = 0
        chunk_size = cipher.chunk_size
        batch = min(max(chunk_size, BATCH_BYTES // chunk_size * chunk_size), -(-size // chunk_size) * chunk_size)
        self._in = bytearray(batch)
        self._out = bytearray(batch + TAG_SIZE) if cipher.encrypted else self._in
        self._entries = bytearray(batch // chunk_size * CHUNK_ENTRY_SIZE)
        self._chunks = bytearray()
        self._view = memoryview(b"")
        self.done = False
        if size == 0:
            self._complete()

    def readable(self) -> bool:
        return True

    @property
    def incompressible(self) -> bool:
        """Whether the stored bytes are ciphertext (a layer writer then stores them without compressing)."""
        return self._cipher.encrypted

    def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` stored bytes, copied once out of the sealed batch."""
        if n is None or n < 0:
            return self.readall()
        if not self._view:
            if self.done:
                return b""
            self._fill()
        data = bytes(self._view[:n])
        self._view = self._view[len(data) :]
        if not self._view and self._remaining == 0 and not self.done:
            self._complete()
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self._view:
            if self.done:
                return 0
            self._fill()
        n = min(len(buffer), len(self._view))
        buffer[:n] = self._view[:n]
        self._view = self._view[n:]
        if not self._view and self._remaining == 0 and not self.done:
            self._complete()
        return n

    def _fill(self) -> None:
        assert self._source is not None
        want = min(self._remaining, len(self._in))
        got = 0
        view = memoryview(self._in)
        # A source that hands over a whole batch in one read is sealed from its bytes, without a copy.
        first = self._source.read(want) if hasattr(self._source, "read") else b""
        if len(first) == want and want:
            self._seal(memoryview(first), want)
            return
        if first:
            view[: len(first)] = first
            got = len(first)
        while got < want:
            n = _read_into(self._source, view[got:want])
            if not n:
                done = self._size - self._remaining + got
                raise ConversionError(
                    f"The content of {display_path(self.path)} ended after {done} bytes, before the "
                    f"{self._size} bytes its entry announces; the input is truncated."
                )
            got += n
        self._seal(view, got)

    def _seal(self, data: memoryview, got: int) -> None:
        chunks = -(-got // self._cipher.chunk_size)
        entries = memoryview(self._entries)[: chunks * CHUNK_ENTRY_SIZE]
        out = memoryview(self._out) if self._cipher.encrypted else None
        self._cipher.seal(self._index, data[:got], out, entries)
        self._chunks += entries
        self._index += chunks
        self._remaining -= got
        # Authenticated content is stored as it is: the batch itself (``data``), not a copy.
        self._view = (out if out is not None else data)[:got]

    def _complete(self) -> None:
        self.done = True
        self._writer.record_file(self.path, self._size - self._remaining, bytes(self._chunks))


def _read_into(source: BinaryIO, view: memoryview) -> int:
    """``readinto`` where the stream has it, ``read`` and a copy where it does not."""
    readinto = getattr(source, "readinto", None)
    if readinto is not None:
        return readinto(view) or 0
    data = source.read(len(view))
    view[: len(data)] = data
    return len(data)
