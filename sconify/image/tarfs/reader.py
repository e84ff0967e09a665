"""Streaming, defensive reader of layer tars: one header parser for every format a layer comes in.

It reads POSIX ustar, PAX (local extended headers; global ones are ignored as Docker and containerd do),
GNU (``././@LongLink`` names, base-256 numbers) and old v7 headers from a non-seekable stream, never holding a
file's content in memory, and it stops untrusted archives at the first unsafe or malformed member.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Protocol

from sconify.errors import IntegrityError, UnsafeArchiveError, UnsupportedError
from sconify.image.tarfs.entry import (
    PAX_FIELD_KEYWORDS,
    SPARSE_PREFIX,
    XATTR_PREFIX,
    Entry,
    EntryKind,
    decode_name,
    path_problem,
)

log = logging.getLogger(__name__)

BLOCK = 512
CHUNK = 1 << 20
SEEK_BLOCK = 16 << 10  # the read size on a stream that can skip by seeking (headers, small files)
# After seeking past a file that a whole block would not have covered, the next member is likely as large: read
# its header and the start of its content (Linux's 256-byte "#!" window) rather than a block of content that
# will be skipped.
SEEK_AFTER_LARGE = 1 << 10
LARGE_SKIP = SEEK_BLOCK
DEFAULT_MAX_SIZE = 64 << 30
# Extended headers and GNU long names are read into memory, so they get their own, much smaller limit.
DEFAULT_MAX_METADATA = 8 << 20
_ZERO_BLOCK = bytes(BLOCK)

_KINDS = {
    b"0": EntryKind.REGULAR,
    b"\0": EntryKind.REGULAR,
    b"7": EntryKind.REGULAR,  # contiguous file: a regular file everywhere that matters
    b"1": EntryKind.HARDLINK,
    b"2": EntryKind.SYMLINK,
    b"3": EntryKind.CHAR,
    b"4": EntryKind.BLOCK,
    b"5": EntryKind.DIRECTORY,
    b"6": EntryKind.FIFO,
}
_MTIME_RE = re.compile(rb"-?[0-9]+(\.[0-9]+)?")
_SPARSE = SPARSE_PREFIX.encode()
_XATTR = XATTR_PREFIX.encode()
_DIGITS_RE = re.compile(rb"[0-9]+")


class ByteStream(Protocol):
    """Anything to read bytes from: a file, a socket file, a verifying or decompressing stream."""

    def read(self, n: int = -1, /) -> bytes | None: ...


class EntryContent(io.RawIOBase):
    """The content of one regular entry, readable in bounded pieces until the reader moves to the next entry."""

    def __init__(self, reader: _LayerReader, entry: Entry) -> None:
        super().__init__()
        self._reader = reader
        self._left = entry.size
        self._valid = True
        self.entry = entry
        self.offset = reader._input.offset  # where the content starts in the uncompressed tar stream

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def remaining(self) -> int:
        """Bytes not read yet."""
        return self._left

    def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes (all that is left for ``n`` < 0; the caller then holds the whole file)."""
        if self.closed:
            raise ValueError(f"the content of {self.entry.path!r} is closed")
        if not self._valid:
            raise ValueError(
                f"the content of {self.entry.path!r} was read after the layer reader moved on; read it before "
                "asking for the next entry"
            )
        if n is None or n < 0:
            parts = []
            while self._left:
                parts.append(self.read(CHUNK))
            return b"".join(parts)
        n = min(n, self._left)
        if n == 0:
            return b""
        data = self._reader._input.read(n)
        if not data:
            raise self._reader._truncated(self.entry.path)
        self._left -= len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _invalidate(self) -> int:
        self._valid = False
        return self._left


class _Input:
    """A byte source over a stream that may return short reads; counts the offset for messages."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._buf = b""
        self._pos = 0
        self.offset = 0
        # A stream that can skip by seeking is read in small blocks: what is not needed is never read.
        self._seek = getattr(stream, "skip", None)
        self._block = SEEK_BLOCK if self._seek is not None else CHUNK
        self._next_block = self._block

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; b"" only at the end of the stream."""
        if self._pos >= len(self._buf):
            if n >= self._block:
                data = self._stream.read(n) or b""
                self.offset += len(data)
                return data
            block, self._next_block = max(n, self._next_block), self._block
            self._buf = self._stream.read(block) or b""
            self._pos = 0
            if not self._buf:
                return b""
        if self._pos == 0 and n >= len(self._buf):
            data = self._buf
        else:
            data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        self.offset += len(data)
        return data

    def read_exact(self, n: int) -> bytes:
        """``n`` bytes, or fewer only if the stream ends first."""
        data = self.read(n)
        if len(data) == n or not data:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = self.read(n - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Discard ``n`` bytes; returns how many there were. A stream with a ``skip`` method of its own (one that
        can seek) is moved ahead instead of read when the rest of the buffer does not cover ``n``."""
        done = 0
        if self._seek is not None and n > len(self._buf) - self._pos:
            done = max(0, len(self._buf) - self._pos)
            self._pos = len(self._buf)
            self.offset += done
            moved = self._seek(n - done)
            self.offset += moved
            if moved >= LARGE_SKIP:
                self._next_block = SEEK_AFTER_LARGE
            return done + moved
        while done < n:
            data = self.read(min(CHUNK, n - done))
            if not data:
                break
            done += len(data)
        return done

    def drain(self) -> tuple[int, bool]:
        """Read to the end of the stream; returns the byte count and whether any byte was non-zero."""
        count = 0
        nonzero = False
        while data := self.read(CHUNK):
            count += len(data)
            if not nonzero and data.count(0) != len(data):
                nonzero = True
        return count, nonzero


def _nts(field: bytes) -> bytes:
    """A NUL-terminated string field."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


class _LayerReader:
    def __init__(
        self,
        stream: ByteStream,
        what: str,
        max_size: int,
        max_metadata: int,
        needed: Callable[[Entry], bool] | None,
    ) -> None:
        self._input = _Input(stream)
        self._what = what
        self._max_size = max_size
        self._max_metadata = max_metadata
        self._needed = needed
        self._warned_absolute = False
        self._header_offset = 0
        self._times: dict[bytes | int, Decimal] = {}

    # -- error sentences -------------------------------------------------------------------------------------

    def _invalid(self, detail: str) -> IntegrityError:
        return IntegrityError(
            f"{self._what} is not a valid tar archive: {detail} (at byte {self._header_offset}); "
            "the layer is corrupt or was not made by a tar tool."
        )

    def _truncated(self, path: str) -> IntegrityError:
        return self._invalid(f"it ends in the middle of {path!r}")

    def _unsafe(self, path: str, detail: str, way_out: str = "rebuild the image without it") -> UnsafeArchiveError:
        return UnsafeArchiveError(
            f"{self._what} holds the member {path!r}, which {detail}; sconify refuses to read this layer, {way_out}."
        )

    # -- header fields ---------------------------------------------------------------------------------------

    def _number(self, field: bytes, name: str) -> int:
        if field[0] & 0x80:
            # GNU base-256: 0x80 introduces a positive and 0xff a negative big-endian two's complement number
            if field[0] == 0xFF:
                return int.from_bytes(field, "big", signed=True)
            return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        text = _nts(field).strip(b" ")
        if not text:
            return 0
        if text.strip(b"01234567"):
            raise self._invalid(f"the {name} field {field!r} is not an octal number")
        return int(text, 8)

    def _read_metadata(self, size: int, what: str) -> bytes:
        if size > self._max_metadata:
            raise UnsafeArchiveError(
                f"{self._what} holds {what} of {size} bytes at byte {self._header_offset}, more than the limit of "
                f"{self._max_metadata} bytes for metadata; sconify refuses to read this layer, raise the limit if "
                "the layer is genuine."
            )
        data = self._input.read_exact(size)
        if len(data) < size:
            raise self._truncated(what)
        self._skip_padding(size, what)
        return data

    def _skip_padding(self, size: int, path: str) -> None:
        pad = -size % BLOCK
        if pad and self._input.skip(pad) < pad:
            raise self._truncated(path)

    def _parse_pax(self, data: bytes, records: dict[bytes, bytes]) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            if data[pos] == 0:  # some writers pad the record block with NULs
                break
            space = data.find(b" ", pos, pos + 21)
            length_text = data[pos:space] if space > 0 else b""
            if not _DIGITS_RE.fullmatch(length_text):
                raise self._invalid("a PAX extended header has a malformed record length")
            length = int(length_text)
            record = data[pos : pos + length]
            if length <= len(length_text) + 1 or len(record) != length or not record.endswith(b"\n"):
                raise self._invalid("a PAX extended header has a record that does not fit its length")
            body = record[len(length_text) + 1 : -1]
            key, eq, value = body.partition(b"=")
            if not eq or not key:
                raise self._invalid("a PAX extended header has a record without a keyword")
            if value or key.startswith(_XATTR):
                records[key] = value
            else:  # an empty value removes the keyword (POSIX); an empty xattr is a real, empty xattr
                records.pop(key, None)
            pos += length

    def _decimal(self, value: bytes | int) -> Decimal:
        # Members of a layer share few distinct times; sharing their (immutable) Decimals saves memory.
        cached = self._times.get(value)
        if cached is None:
            if len(self._times) >= 4096:
                self._times.clear()
            cached = self._times[value] = Decimal(value.decode() if isinstance(value, bytes) else value)
        return cached

    def _pax_int(self, records: dict[bytes, bytes], key: bytes, default: int, path: str) -> int:
        value = records.get(key)
        if value is None:
            return default
        if not _DIGITS_RE.fullmatch(value):
            raise self._invalid(f"the PAX record {key.decode()}={value!r} of {path!r} is not a number")
        return int(value)

    def _normalize(self, raw: bytes, what: str, member: str) -> str:
        text = decode_name(raw)
        # Already normal (the common case): no empty or "."-led component, no leading or trailing "/", no NUL.
        if text and text[0] != "/" and text[-1] != "/" and "//" not in text and "/." not in text \
                and text[0] != "." and "\0" not in text:
            return text
        if "\0" in text:
            raise self._unsafe(member, f"has a NUL character in its {what}")
        absolute = text.startswith("/")
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if ".." in parts:
            if what == "name":
                raise self._unsafe(member, "has a '..' component that could reach outside the image root")
            raise self._unsafe(member, f"is a hard link to {text!r}, whose '..' could reach outside the image root")
        path = "/".join(parts)
        if absolute:
            if not self._warned_absolute:
                log.warning(
                    "%s holds absolute %ss such as %r; they are read relative to the image root, as Docker does",
                    self._what, what, text,
                )
                self._warned_absolute = True
            else:
                log.debug("%s: absolute %s %r read as %r", self._what, what, text, path)
        return path

    # -- the walk --------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Entry, EntryContent | None]]:
        records: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            self._header_offset = self._input.offset
            block = self._input.read_exact(BLOCK)
            if len(block) < BLOCK:
                if block or records or long_name is not None or long_link is not None:
                    raise self._invalid("it ends in the middle of a header")
                log.warning("%s has no end-of-archive marker; it is read as complete", self._what)
                return
            if block == _ZERO_BLOCK:
                if records or long_name is not None or long_link is not None:
                    raise self._invalid("an extended header is followed by the end of the archive")
                self._finish()
                return
            self._check_checksum(block)
            typeflag = block[156:157]
            size = self._number(block[124:136], "size")
            if size < 0:
                raise self._invalid(f"a header declares the negative size {size}")
            if typeflag in (b"x", b"X"):
                self._parse_pax(self._read_metadata(size, "a PAX extended header"), records)
                continue
            if typeflag == b"g":
                # Global headers are ignored, as Docker and containerd do; they never change a member.
                log.debug("%s: a PAX global header was ignored", self._what)
                self._read_metadata(size, "a PAX global header")
                continue
            if typeflag == b"L":
                long_name = _nts(self._read_metadata(size, "a GNU long name"))
                continue
            if typeflag == b"K":
                long_link = _nts(self._read_metadata(size, "a GNU long link name"))
                continue
            entry = self._entry(block, typeflag, size, records, long_name, long_link)
            records = {}
            long_name = long_link = None
            if entry.kind is EntryKind.REGULAR:
                if entry.size > self._max_size:
                    raise self._unsafe(
                        entry.path,
                        f"declares {entry.size} bytes, more than the limit of {self._max_size} bytes",
                        "raise the size limit if the file is genuine",
                    )
                if entry.size and (self._needed is None or self._needed(entry)):
                    content = EntryContent(self, entry)
                    yield entry, content
                    left = content._invalidate()
                else:
                    yield entry, None
                    left = entry.size
                if self._input.skip(left) < left:
                    raise self._truncated(entry.path)
                self._skip_padding(entry.size, entry.path)
            else:
                # Header-only kinds carry no data whatever their size field says (as in Go's and Python's tar).
                yield entry, None

    def _check_checksum(self, block: bytes) -> None:
        stored = _nts(block[148:156]).strip(b" ")
        if not stored or stored.strip(b"01234567"):
            raise self._invalid("a header has no valid checksum, so it is not a tar header")
        unsigned = sum(block) - sum(block[148:156]) + 8 * 0x20
        if int(stored, 8) == unsigned:
            return
        high = sum(1 for b in block[:148] if b >= 0x80) + sum(1 for b in block[156:] if b >= 0x80)
        signed = unsigned - 256 * high
        if int(stored, 8) != signed:  # a few historic tars summed signed chars
            raise self._invalid("a header has a wrong checksum")

    def _entry(
        self,
        block: bytes,
        typeflag: bytes,
        size: int,
        records: dict[bytes, bytes],
        long_name: bytes | None,
        long_link: bytes | None,
    ) -> Entry:
        magic = block[257:263]
        name = _nts(block[0:100])
        if magic == b"ustar\0":  # POSIX: a 155-byte prefix extends the name; GNU uses that area for times
            prefix = _nts(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        name = records.get(b"path", name)
        linkname = records.get(b"linkpath", long_link if long_link is not None else _nts(block[157:257]))
        shown = decode_name(name)
        kind = _KINDS.get(typeflag)
        if kind is None or (records and any(key.startswith(_SPARSE) for key in records)):
            what = "a GNU sparse file" if typeflag == b"S" or kind is not None else f"of tar type {typeflag!r}"
            raise UnsupportedError(
                f"{self._what} holds {shown!r}, {what}, which container runtimes do not unpack; "
                "rebuild the layer with a tar that writes plain files (no --sparse)."
            )
        if kind is EntryKind.REGULAR and typeflag == b"\0" and name.endswith(b"/"):
            kind = EntryKind.DIRECTORY  # old tars marked directories only by the trailing slash
        path = self._normalize(name, "name", shown)
        if kind is EntryKind.REGULAR:
            size = self._pax_int(records, b"size", size, shown)
        else:
            size = 0
        link = ""
        if kind is EntryKind.HARDLINK:
            link = self._normalize(linkname, "hard link target", shown)
            if not link:
                raise self._unsafe(shown, "is a hard link to the image root")
        elif kind is EntryKind.SYMLINK:
            link = decode_name(linkname)  # data, never followed here: kept exactly
            if "\0" in link:
                raise self._unsafe(shown, "has a NUL character in its link target")
            if not link:
                raise self._invalid(f"the symbolic link {shown!r} has an empty target")
        if path == "" and kind is not EntryKind.DIRECTORY:
            raise self._unsafe(shown, f"stands for the image root but is a {kind}, not a directory")
        if path.startswith(".wh.") or "/.wh." in path:
            problem = path_problem(path)  # the normalisation above leaves only whiteout names to check
            if problem:
                raise self._unsafe(shown, problem)
        mtime_raw = records.get(b"mtime")
        if mtime_raw is not None:
            if not _MTIME_RE.fullmatch(mtime_raw):
                raise self._invalid(f"the PAX mtime {mtime_raw!r} of {shown!r} is not a time")
            mtime = self._decimal(mtime_raw)
        else:
            mtime = self._decimal(self._number(block[136:148], "mtime"))
        devmajor = devminor = 0
        if kind in (EntryKind.CHAR, EntryKind.BLOCK):
            devmajor = self._pax_int(records, b"SCHILY.devmajor", self._number(block[329:337], "devmajor"), shown)
            devminor = self._pax_int(records, b"SCHILY.devminor", self._number(block[337:345], "devminor"), shown)
        uid = self._pax_int(records, b"uid", self._number(block[108:116], "uid"), shown)
        gid = self._pax_int(records, b"gid", self._number(block[116:124], "gid"), shown)
        mode = self._number(block[100:108], "mode")
        if mode < 0:
            raise self._invalid(f"the mode of {shown!r} is negative")
        ustar = magic[:5] == b"ustar"
        xattrs: dict[str, bytes] = {}
        pax: dict[str, str] = {}
        for key, value in records.items():
            text = decode_name(key)
            if text.startswith(XATTR_PREFIX):
                xattr = text[len(XATTR_PREFIX):]
                if not xattr or "\0" in xattr:
                    raise self._invalid(f"{shown!r} has a malformed xattr record")
                xattrs[xattr] = value
            elif text not in PAX_FIELD_KEYWORDS:
                pax[text] = decode_name(value)
        try:
            return Entry(
                path=path,
                kind=kind,
                mode=mode & 0o7777,
                uid=uid,
                gid=gid,
                # Owner names repeat across a layer: one shared string each keeps a big tree small.
                uname=sys.intern(decode_name(records.get(b"uname", _nts(block[265:297]) if ustar else b""))),
                gname=sys.intern(decode_name(records.get(b"gname", _nts(block[297:329]) if ustar else b""))),
                mtime=mtime,
                size=size,
                linkname=link,
                devmajor=devmajor,
                devminor=devminor,
                xattrs=xattrs,
                pax=pax,
            )
        except ValueError as exc:  # anything the checks above did not name explicitly
            raise self._invalid(f"the member {shown!r} is malformed ({exc})") from None

    def _finish(self) -> None:
        # The end is two zero blocks; a zero block followed by a header is malformed (Go's archive/tar, which
        # Docker and containerd use, refuses it too), so nothing can hide behind a lone zero block.
        second = self._input.read_exact(BLOCK)
        if second and second != _ZERO_BLOCK and len(second) == BLOCK:
            self._header_offset += BLOCK
            raise self._invalid("a single zero block is followed by more data instead of the end of the archive")
        # Read to the end so that a verifying stream underneath checks its digest and size.
        count, nonzero = self._input.drain()
        nonzero = nonzero or (second.count(0) != len(second))
        if nonzero:
            log.warning("%s has %d bytes after its end-of-archive marker; they are ignored", self._what, count)


def read_layer(
    stream: ByteStream,
    *,
    what: str = "the layer",
    max_size: int = DEFAULT_MAX_SIZE,
    max_metadata: int = DEFAULT_MAX_METADATA,
    needed: Callable[[Entry], bool] | None = None,
) -> Iterator[tuple[Entry, EntryContent | None]]:
    """Walk an uncompressed layer tar as ``(entry, content)`` pairs, streaming and checking as it goes.

    ``content`` is a file-like object for regular files with data (valid until the next pair is asked for)
    and None otherwise, or when ``needed(entry)`` says the caller does not want it (then it is skipped).
    ``what`` names the layer in error sentences. Unsafe members (``..``, NUL, sizes over ``max_size``, hard
    links out of the root) raise UnsafeArchiveError, malformed or truncated archives IntegrityError. Absolute
    names are read relative to the root. After the end-of-archive marker the stream is read to its end so
    that digest checks underneath run; a caller that stops iterating early gets no such check.
    """
    return iter(_LayerReader(stream, what, max_size, max_metadata, needed))
