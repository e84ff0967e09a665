"""Reading an FSPF volume: open the metadata with key and tag, then verify and decrypt files or byte ranges.

This module does not know where the stored bytes live: a file's content is read through a positional
read function (``pread_into(buffer, offset) -> bytes read``), so a directory, a tar member or a C runtime's
mapping all work the same. ``volume.py`` uses it for directories on disk.
"""

from __future__ import annotations

import enum
import hmac
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from sconify.errors import IntegrityError, KeyMaterialError, NotFoundError
from sconify.fspf.crypto import ChunkCipher, ChunkRejected, VolumeKey
from sconify.fspf.format import (
    CHUNK_ENTRY_SIZE,
    HEADER_SIZE,
    TAG_SIZE,
    Header,
    Record,
    RecordKind,
    RegionMode,
    RegionTable,
    decode_body,
    display_path,
    normalize_path,
)

BATCH_BYTES = 256 * 1024
"""How much is read and opened at a time (rounded to whole chunks)."""

PreadInto = Callable[[memoryview, int], int]
"""Read into the buffer from the given offset of the stored file; return the number of bytes read."""


class ProblemKind(enum.StrEnum):
    """What is wrong with one path of a protected region."""

    MISSING = "missing"
    UNEXPECTED = "unexpected"
    TYPE_CHANGED = "type-changed"
    TRUNCATED = "truncated"
    EXTENDED = "extended"
    TAMPERED_CHUNK = "tampered-chunk"
    LINK_CHANGED = "link-changed"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class Problem:
    """One failed check: the path, the kind of failure and a sentence about it."""

    path: bytes
    kind: ProblemKind
    detail: str

    @property
    def message(self) -> str:
        return f"{display_path(self.path)}: {self.detail}"


class WrongKeyError(KeyMaterialError):
    """The key is not the one the volume was protected with."""


class MetadataTamperedError(IntegrityError):
    """The metadata file does not authenticate under the key: corrupted or changed."""


class StateMismatchError(IntegrityError):
    """The metadata is authentic but has another tag: an older or newer state (rollback) or a wrong tag."""


class FileIntegrityError(IntegrityError):
    """A protected file failed a check while being read; ``problem`` says which file and how."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(f"{problem.message}; the protected volume was tampered with or damaged.")
        self.problem = problem


def chunk_problem(path: bytes, index: int, chunk_size: int, size: int) -> Problem:
    start = index * chunk_size
    end = min(size, start + chunk_size) - 1
    return Problem(
        path,
        ProblemKind.TAMPERED_CHUNK,
        f"chunk {index} (bytes {start}-{end}) fails authentication: its bytes were changed, or it was moved "
        "from another position or another file",
    )


def size_problem(path: bytes, actual: int, expected: int) -> Problem:
    kind = ProblemKind.TRUNCATED if actual < expected else ProblemKind.EXTENDED
    return Problem(path, kind, f"is {actual} bytes, expected {expected} ({kind.value})")


@dataclass(frozen=True)
class Volume:
    """The authenticated metadata of a volume: header, regions and records, with the key to read files."""

    header: Header
    regions: RegionTable
    records: tuple[Record, ...]
    tag: bytes
    key: VolumeKey = field(repr=False)
    by_path: dict[bytes, Record] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_path", {r.path: r for r in self.records})

    @property
    def chunk_size(self) -> int:
        return self.header.chunk_size

    def record(self, path: bytes | str) -> Record:
        """The record of a protected path; NotFoundError if the metadata has none."""
        norm = normalize_path(path)
        record = self.by_path.get(norm)
        if record is None:
            mode = self.regions.mode_for(norm)
            where = "is in a not-protected region" if not mode.protected else "is not in the volume"
            raise NotFoundError(f"{display_path(norm)} {where}; list the protected files with `sconify fs show`.")
        return record

    def content_record(self, record: Record) -> Record:
        """The FILE record that holds the content of ``record`` (itself, or a hard link's file)."""
        if record.kind is RecordKind.HARDLINK:
            return self.by_path[record.target]
        if record.kind is not RecordKind.FILE:
            raise NotFoundError(f"{display_path(record.path)} is a {record.kind.label}, not a regular file.")
        return record

    def cipher(self, content: Record) -> ChunkCipher:
        return self.key.chunk_cipher(content.path, content.protection, self.chunk_size)

    @property
    def files(self) -> int:
        return sum(1 for r in self.records if r.kind is RecordKind.FILE)

    @property
    def protected_bytes(self) -> int:
        return sum(r.size for r in self.records if r.kind is RecordKind.FILE)


def open_volume(metadata: bytes, key: VolumeKey, tag: bytes | None, *, where: str = "the metadata file") -> Volume:
    """Authenticate and parse a metadata file.

    ``tag`` is the expected volume tag from the policy; None skips that check (``fs show``), which then
    proves only that the metadata was written with this key, not that it is the current state.
    """
    header = Header.decode(metadata, where=where)
    if not hmac.compare_digest(header.key_id, key.key_id):
        raise WrongKeyError(
            f"The key does not open {where}: the volume was protected with another key (key id "
            f"{header.key_id.hex()}, the given key has id {key.key_id.hex()}); give the key printed when it was "
            "protected."
        )
    stored_tag = metadata[-TAG_SIZE:]
    try:
        body = key.open_metadata(metadata[:HEADER_SIZE], header.nonce, metadata[HEADER_SIZE:])
    except InvalidTag:
        raise MetadataTamperedError(
            f"{where} fails authentication under the right key: it was corrupted or tampered with (e.g. a "
            "region, a size or a chunk tag in it was changed); restore the volume from a trusted copy."
        ) from None
    if tag is not None and not hmac.compare_digest(stored_tag, tag):
        raise StateMismatchError(
            f"{where} is authentic but describes another state of the volume (tag {stored_tag.hex()}, expected "
            f"{tag.hex()}): it is an older or newer protection of the tree (a rollback), or the wrong tag was "
            "given; use the tag printed when this state was protected."
        )
    body_parsed = decode_body(body, header.chunk_size, where=where)
    return Volume(header, body_parsed.regions, body_parsed.records, stored_tag, key)


class ContentReader:
    """Verifies (and decrypts) chunk ranges of files, with buffers reused across calls; one per thread."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        size = volume.chunk_size
        self.batch = max(size, BATCH_BYTES // size * size)
        self._in = bytearray(self.batch + TAG_SIZE)
        self._out = bytearray(self.batch)

    def check(
        self,
        content: Record,
        pread_into: PreadInto,
        *,
        first_chunk: int = 0,
        end_chunk: int | None = None,
        cipher: ChunkCipher | None = None,
        sink: Callable[[int, memoryview], None] | None = None,
        shown_path: bytes | None = None,
    ) -> Problem | None:
        """Verify chunks ``[first_chunk, end_chunk)`` of a file whose stored size was already checked.

        ``sink(offset, plaintext)`` receives the verified plaintext batch by batch. Returns the first
        problem (a short read or a chunk that fails authentication) or None.
        """
        chunk_size = self.volume.chunk_size
        total = content.chunk_count(chunk_size)
        end = total if end_chunk is None else min(end_chunk, total)
        cipher = cipher or self.volume.cipher(content)
        encrypted = content.protection is RegionMode.ENCRYPTED
        path = shown_path or content.path
        data = memoryview(self._in)
        out = memoryview(self._out)
        per_batch = self.batch // chunk_size
        index = first_chunk
        while index < end:
            count = min(per_batch, end - index)
            offset = index * chunk_size
            length = min(count * chunk_size, content.size - offset)
            got = 0
            while got < length:
                n = pread_into(data[got:length], offset + got)
                if not n:
                    return size_problem(path, offset + got, content.size)
                got += n
            entries = content.chunks[index * CHUNK_ENTRY_SIZE : (index + count) * CHUNK_ENTRY_SIZE]
            try:
                cipher.open(index, data, length, entries, out if encrypted else None)
            except ChunkRejected as exc:
                return chunk_problem(path, exc.index, chunk_size, content.size)
            if sink is not None:
                sink(offset, (out if encrypted else data)[:length])
            index += count
        return None

    def read_range(self, record: Record, pread_into: PreadInto, offset: int, length: int) -> bytes:
        """Verified plaintext of ``length`` bytes from ``offset`` (shorter at the end of the file)."""
        content = self.volume.content_record(record)
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = min(content.size, offset + length)
        if end <= offset:
            return b""
        chunk_size = self.volume.chunk_size
        first = offset // chunk_size
        last = -(-end // chunk_size)
        result = bytearray()

        def take(at: int, plain: memoryview) -> None:
            lo = max(offset, at)
            hi = min(end, at + len(plain))
            if lo < hi:
                result.extend(plain[lo - at : hi - at])

        problem = self.check(content, pread_into, first_chunk=first, end_chunk=last, sink=take, shown_path=record.path)
        if problem is not None:
            raise FileIntegrityError(problem)
        return bytes(result)


class ProtectedFile(io.RawIOBase):
    """A protected file opened for reading: seekable, and every byte returned has been verified.

    The last batch of verified plaintext is kept, so small sequential reads do not verify a chunk twice.
    """

    def __init__(
        self,
        volume: Volume,
        record: Record,
        pread_into: PreadInto,
        stored_size: int,
        *,
        closer: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._content = volume.content_record(record)
        self._closer = closer
        if stored_size != self._content.size:
            self.close()
            raise FileIntegrityError(size_problem(record.path, stored_size, self._content.size))
        self._record = record
        self._reader = ContentReader(volume)
        self._chunk_size = volume.chunk_size
        self._pread = pread_into
        self._pos = 0
        self._cache_at = 0
        self._cache = b""
        self.size = self._content.size

    def close(self) -> None:
        if not self.closed and self._closer is not None:
            self._closer()
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= self.size or not len(buffer):
            return 0
        if not self._cache_at <= self._pos < self._cache_at + len(self._cache):
            aligned = self._pos - self._pos % self._chunk_size
            self._cache = self._reader.read_range(self._record, self._pread, aligned, self._reader.batch)
            self._cache_at = aligned
        start = self._pos - self._cache_at
        n = min(len(buffer), len(self._cache) - start)
        buffer[:n] = self._cache[start : start + n]
        self._pos += n
        return n

    def readall(self) -> bytes:
        data = self._reader.read_range(self._record, self._pread, self._pos, max(0, self.size - self._pos))
        self._pos += len(data)
        return data
