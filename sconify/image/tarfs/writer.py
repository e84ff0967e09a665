"""Deterministic PAX tar writer for the layers sconify makes: the same entries give the same bytes.

Headers are ustar with a PAX extended header only where a value does not fit (long or non-ASCII names,
big numbers, sub-second times, xattrs, other records); PAX records come in a fixed order; there is no
atime, ctime or hdrcharset (names are written as their exact bytes, as GNU tar and Go do); the archive
ends with two zero blocks and no record padding (as Go's archive/tar).
"""

from __future__ import annotations

import io
from decimal import Decimal
from typing import BinaryIO, Protocol

from sconify.errors import IntegrityError
from sconify.image.tarfs.entry import XATTR_PREFIX, Entry, EntryKind, encode_name

BLOCK = 512
CHUNK = 1 << 20
# Incompressible content pieces at least this long bypass the compressor; shorter ones are not worth a flush.
INCOMPRESSIBLE_MIN = 4096
_TYPEFLAGS = {
    EntryKind.REGULAR: b"0",
    EntryKind.HARDLINK: b"1",
    EntryKind.SYMLINK: b"2",
    EntryKind.CHAR: b"3",
    EntryKind.BLOCK: b"4",
    EntryKind.DIRECTORY: b"5",
    EntryKind.FIFO: b"6",
}
_PAX_NAME = b"././@PaxHeader"
_MAX_OCTAL_7 = 8**7
_MAX_OCTAL_11 = 8**11


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def _octal(value: int, width: int) -> bytes:
    """A numeric header field: zero-padded octal digits and a NUL, ``width`` bytes in all."""
    return b"%0*o\0" % (width - 1, value)


def _field(value: bytes, width: int) -> bytes:
    return value[:width].ljust(width, b"\0")


def _fits(value: bytes, width: int) -> bool:
    return len(value) <= width and value.isascii()


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"LEN KEY=VALUE\\n"`` record, where LEN counts the whole record including its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    if len(str(length)) > len(str(len(body))):
        length += 1
    return b"%d" % length + body


def ustar_header(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes = b"",
    uname: bytes = b"",
    gname: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
) -> bytes:
    """A 512-byte POSIX ustar header block with its checksum."""
    block = b"".join(
        (
            _field(name, 100),
            _octal(mode, 8),
            _octal(uid, 8),
            _octal(gid, 8),
            _octal(size, 12),
            _octal(mtime, 12),
            b" " * 8,
            typeflag,
            _field(linkname, 100),
            b"ustar\x0000",
            _field(uname, 32),
            _field(gname, 32),
            _octal(devmajor, 8),
            _octal(devminor, 8),
            bytes(155 + 12),
        )
    )
    checksum = b"%06o\0 " % sum(block)
    return block[:148] + checksum + block[156:]


class LayerWriter:
    """Writes entries, in exactly the order given, as a deterministic PAX tar stream into ``fileobj``.

    ``fixed_mtime`` replaces every entry's mtime; ``mtime_clamp`` lowers later mtimes to it (the
    ``SOURCE_DATE_EPOCH`` convention). Owners, names, modes, xattrs and other PAX records are written as
    given. ``close()`` writes the end-of-archive marker but does not close ``fileobj``.
    """

    def __init__(
        self,
        fileobj: BinaryIO | _Writable,
        *,
        fixed_mtime: int | Decimal | None = None,
        mtime_clamp: int | Decimal | None = None,
        what: str = "the new layer",
    ) -> None:
        if fixed_mtime is not None and mtime_clamp is not None:
            raise ValueError("give LayerWriter either fixed_mtime or mtime_clamp, not both")
        self._out = fileobj
        self._fixed = None if fixed_mtime is None else Decimal(fixed_mtime)
        self._clamp = None if mtime_clamp is None else Decimal(mtime_clamp)
        self._what = what
        self._buffer = bytearray()
        self._closed = False
        self.bytes_written = 0
        self.entries_written = 0

    def __enter__(self) -> LayerWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()

    def _emit(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._out.write(bytes(self._buffer))
            self.bytes_written += len(self._buffer)
            self._buffer.clear()

    def _mtime(self, entry: Entry) -> Decimal:
        if self._fixed is not None:
            return self._fixed
        if self._clamp is not None and entry.mtime > self._clamp:
            return self._clamp
        return entry.mtime

    def add(self, entry: Entry, content: bytes | _Readable | None = None) -> None:
        """Write one entry; a regular entry's ``content`` (bytes or a readable) must hold exactly ``entry.size``
        bytes and is streamed in bounded chunks."""
        if self._closed:
            raise ValueError("LayerWriter.add after close")
        if entry.kind is not EntryKind.REGULAR and content is not None:
            raise ValueError(f"entry {entry.path!r} of kind {entry.kind} cannot have content")
        if entry.size and content is None:
            raise ValueError(f"regular entry {entry.path!r} of {entry.size} bytes needs its content")
        self._emit(self._headers(entry))
        if content is not None:
            reader: _Readable = io.BytesIO(content) if isinstance(content, bytes | bytearray) else content
            self._copy(entry, reader)
        self.entries_written += 1

    def _copy(self, entry: Entry, reader: _Readable) -> None:
        left = entry.size
        # Content that says it does not compress (ciphertext) goes to a sink that can store it as it is.
        raw = None
        if getattr(reader, "incompressible", False) and getattr(self._out, "separates_incompressible", True):
            raw = getattr(self._out, "write_incompressible", None)
        while left:
            want = min(CHUNK, left)
            data = reader.read(want)
            if not data:
                raise IntegrityError(
                    f"the content given for {entry.path!r} in {self._what} ended after {entry.size - left} bytes "
                    f"but its entry declares {entry.size}; the source changed while it was read."
                )
            if len(data) > want:
                raise IntegrityError(
                    f"the content given for {entry.path!r} in {self._what} returned more bytes than asked for."
                )
            if raw is not None and len(data) >= INCOMPRESSIBLE_MIN:
                self._flush()
                raw(data)
                self.bytes_written += len(data)
            elif len(data) >= CHUNK // 2:
                self._flush()
                self._out.write(data)
                self.bytes_written += len(data)
            else:
                self._emit(data)
            left -= len(data)
        if reader.read(1):
            raise IntegrityError(
                f"the content given for {entry.path!r} in {self._what} is longer than the {entry.size} bytes its "
                "entry declares; the source changed while it was read."
            )
        pad = -entry.size % BLOCK
        if pad:
            self._emit(bytes(pad))

    def _headers(self, entry: Entry) -> bytes:
        kind = entry.kind
        records: list[tuple[bytes, bytes]] = []

        name = encode_name(entry.path)
        name = b"." if name == b"" else name
        if kind is EntryKind.DIRECTORY:
            name += b"/"
        if not _fits(name, 100):
            records.append((b"path", name))
        linkname = encode_name(entry.linkname)
        if not _fits(linkname, 100):
            records.append((b"linkpath", linkname))
        size = entry.size
        if size >= _MAX_OCTAL_11:
            records.append((b"size", b"%d" % size))
        for key, number in ((b"uid", entry.uid), (b"gid", entry.gid)):
            if number >= _MAX_OCTAL_7:
                records.append((key, b"%d" % number))
        uname, gname = encode_name(entry.uname), encode_name(entry.gname)
        for key, text in ((b"uname", uname), (b"gname", gname)):
            if not _fits(text, 32):
                records.append((key, text))
        mtime = self._mtime(entry)
        whole = int(mtime)  # toward zero; the header field only matters to readers that ignore PAX
        if mtime != whole or not 0 <= whole < _MAX_OCTAL_11:
            records.append((b"mtime", format(mtime, "f").encode()))
        for key, number in ((b"SCHILY.devmajor", entry.devmajor), (b"SCHILY.devminor", entry.devminor)):
            if number >= _MAX_OCTAL_7:
                records.append((key, b"%d" % number))
        for key, value in sorted((encode_name(k), encode_name(v)) for k, v in entry.pax.items()):
            records.append((key, value))
        for key, value in sorted((encode_name(k), bytes(v)) for k, v in entry.xattrs.items()):
            records.append((XATTR_PREFIX.encode() + key, value))

        header = ustar_header(
            _ascii(name),
            entry.mode,
            entry.uid if entry.uid < _MAX_OCTAL_7 else 0,
            entry.gid if entry.gid < _MAX_OCTAL_7 else 0,
            size if size < _MAX_OCTAL_11 else 0,
            whole if 0 <= whole < _MAX_OCTAL_11 else 0,
            _TYPEFLAGS[kind],
            _ascii(linkname),
            _ascii(uname)[:32],
            _ascii(gname)[:32],
            entry.devmajor if entry.devmajor < _MAX_OCTAL_7 else 0,
            entry.devminor if entry.devminor < _MAX_OCTAL_7 else 0,
        )
        if not records:
            return header
        data = b"".join(pax_record(key, value) for key, value in records)
        pax_header = ustar_header(_PAX_NAME, 0o644, 0, 0, len(data), 0, b"x")
        return pax_header + data + bytes(-len(data) % BLOCK) + header

    def close(self) -> None:
        """Write the end-of-archive marker (two zero blocks) and flush; the file object stays open."""
        if self._closed:
            return
        self._emit(bytes(2 * BLOCK))
        self._flush()
        self._closed = True


def _ascii(value: bytes) -> bytes:
    """A stand-in for a header field whose real value is in a PAX record: ASCII, at most 100 bytes."""
    if value.isascii():
        return value[:100]
    return bytes(b if b < 0x80 else 0x3F for b in value)[:100]
