"""Streaming blob I/O: digest and size verification, compression detection, (de)compression, DiffIDs.

Every byte sconify reads from an image passes through a ``VerifyingReader``; compression is detected from
the bytes, never trusted from a media type; memory stays bounded whatever the blob size.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import BinaryIO, Protocol

import zstandard
from isal import isal_zlib

from sconify.errors import IntegrityError, UnsupportedError
from sconify.image import mediatypes as mt
from sconify.image.model import BlobSource, Descriptor, Writable

log = logging.getLogger(__name__)

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# gzip level for the layers sconify writes: ISA-L's level 1 is faster than zlib's level 1 and smaller.
GZIP_LEVEL = 1


def detect_compression(head: bytes) -> str:
    """The compression of a layer blob from its first bytes: ``gzip``, ``zstd`` or ``none`` (plain tar)."""
    if head.startswith(GZIP_MAGIC):
        return mt.GZIP
    if head.startswith(ZSTD_MAGIC):
        return mt.ZSTD
    if head.startswith(b"BZh") or head.startswith(b"\xfd7zXZ\x00"):
        raise UnsupportedError(
            "a layer is compressed with bzip2 or xz, which the OCI image spec does not allow; "
            "re-push the image with gzip or zstd layers."
        )
    return mt.NONE


def _hasher(digest: str) -> hashlib._Hash:
    algorithm = digest.split(":", 1)[0]
    return hashlib.sha512() if algorithm == "sha512" else hashlib.sha256()


def is_seekable(stream: object) -> bool:
    """Whether ``stream`` says it can seek (a local file or archive member, not a network body)."""
    try:
        return bool(stream.seekable())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False


class ReadStream(io.RawIOBase):
    """A read-only stream defined by its ``read``; ``readinto`` copies from it (for callers that use either)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class VerifyingReader(ReadStream):
    """A read-only stream that checks the bytes it passes against an expected digest and size.

    A blob longer than its size fails as soon as the excess arrives; a wrong digest or a short blob fails at
    the end of the stream. Optional ``observers`` see every chunk (e.g. to check a DiffID on the side).
    """

    def __init__(
        self,
        raw: BinaryIO,
        digest: str,
        size: int | None,
        what: str,
        observers: tuple[Callable[[bytes], None], ...] = (),
        at_end: tuple[Callable[[], None], ...] = (),
    ) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._what = what
        self._hash = _hasher(digest)
        self._count = 0
        self._done = False
        self._observers = observers
        self._at_end = at_end
        self.head = b""  # the first bytes seen, for compression detection after the fact

    def read(self, n: int | None = -1) -> bytes:
        if self._done:
            return b""
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        data = self._raw.read(n) if n else b""
        if n and not data:
            self._finish()
            return b""
        self._count += len(data)
        if self._size is not None and self._count > self._size:
            raise IntegrityError(
                f"{self._what} is larger than the {self._size} bytes its descriptor declares; "
                "the source is corrupt or was tampered with."
            )
        if len(self.head) < 16:
            self.head += data[: 16 - len(self.head)]
        self._hash.update(data)
        for observe in self._observers:
            observe(data)
        return data

    def _finish(self) -> None:
        self._done = True
        if self._size is not None and self._count != self._size:
            raise IntegrityError(
                f"{self._what} has {self._count} bytes but its descriptor declares {self._size}; "
                "the source is truncated or corrupt."
            )
        actual = f"{self._digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self._digest:
            raise IntegrityError(
                f"{self._what} has digest {actual} but {self._digest} was expected; "
                "the source is corrupt or was tampered with."
            )
        for finish in self._at_end:
            finish()

    @property
    def bytes_read(self) -> int:
        return self._count

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class _GzipPush:
    """Push-style multi-member gzip decompressor that hands output to a sink in bounded pieces."""

    def __init__(self, sink: Callable[[bytes], None], what: str) -> None:
        self._sink = sink
        self._what = what
        self._d = isal_zlib.decompressobj(31)
        self._in_member = False

    def feed(self, data: bytes) -> None:
        while data:
            if not self._in_member:
                if not data.strip(b"\0"):  # zero padding after the last member is tolerated, as gzip does
                    return
                self._in_member = True
            try:
                out = self._d.decompress(data, CHUNK)
                while out:
                    self._sink(out)
                    out = self._d.decompress(self._d.unconsumed_tail, CHUNK) if self._d.unconsumed_tail else b""
            except isal_zlib.error as exc:  # type: ignore[misc]
                raise IntegrityError(f"{self._what} is not a valid gzip stream ({exc}).") from None
            if self._d.eof:
                data = self._d.unused_data
                self._d = isal_zlib.decompressobj(31)
                self._in_member = False
            else:
                data = b""

    def finish(self) -> None:
        if self._in_member:
            raise IntegrityError(f"{self._what} is a truncated gzip stream; the source is corrupt.")


class _ZstdPush:
    """Push-style zstd decompressor (all frames) with bounded output pieces."""

    class _Sink:
        def __init__(self, sink: Callable[[bytes], None]) -> None:
            self._sink = sink

        def write(self, data: bytes) -> int:
            self._sink(bytes(data))
            return len(data)

    def __init__(self, sink: Callable[[bytes], None], what: str) -> None:
        self._what = what
        self._w = zstandard.ZstdDecompressor().stream_writer(
            self._Sink(sink),  # type: ignore[arg-type]
            write_size=CHUNK,
            write_return_read=True,
            closefd=False,
        )
        self._fed = 0

    def feed(self, data: bytes) -> None:
        try:
            self._w.write(data)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self._what} is not a valid zstd stream ({exc}).") from None
        self._fed += len(data)

    def finish(self) -> None:
        try:
            self._w.flush()
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{self._what} is a truncated zstd stream ({exc}).") from None


class _PlainPush:
    def __init__(self, sink: Callable[[bytes], None], what: str) -> None:
        self._sink = sink

    def feed(self, data: bytes) -> None:
        self._sink(data)

    def finish(self) -> None:
        pass


def push_decompressor(compression: str, sink: Callable[[bytes], None], what: str) -> _GzipPush | _ZstdPush | _PlainPush:
    """A decompressor that takes compressed chunks with ``feed`` and pushes plain chunks into ``sink``."""
    if compression == mt.GZIP:
        return _GzipPush(sink, what)
    if compression == mt.ZSTD:
        return _ZstdPush(sink, what)
    return _PlainPush(sink, what)


class _Prepended(ReadStream):
    """``head`` followed by the rest of ``raw``: lets a pull decompressor start from bytes already read."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        super().__init__()
        self._head = head
        self._raw = raw

    def read(self, n: int | None = -1) -> bytes:
        if self._head:
            size = len(self._head) if n is None or n < 0 else n
            out, self._head = self._head[:size], self._head[size:]
            return out
        return self._raw.read(-1 if n is None else n)


class DecompressingReader(ReadStream):
    """Pull-style reader of the uncompressed bytes of a (gzip, zstd or plain) stream, detected from its bytes.

    Output is produced only as it is read, at most ``CHUNK`` bytes ahead: a small blob that inflates to
    gigabytes never fills memory.
    """

    def __init__(self, raw: BinaryIO, what: str, verify: tuple[str, str] | None = None) -> None:
        super().__init__()
        self._raw = raw
        self._what = what
        self._piece = b""
        self._offset = 0
        head = raw.read(CHUNK)
        self.compression = detect_compression(head)
        self._eof = False
        self._hash = _hasher(verify[0]) if verify else None
        self._expect = verify
        self._count = 0
        if self.compression == mt.GZIP:
            self._pieces: Iterator[bytes] = self._gzip_pieces(head)
        elif self.compression == mt.ZSTD:
            self._pieces = self._zstd_pieces(head)
        else:
            self._pieces = self._plain_pieces(head)

    def _plain_pieces(self, head: bytes) -> Iterator[bytes]:
        data = head
        while data:
            yield data
            data = self._raw.read(CHUNK)

    def _gzip_pieces(self, head: bytes) -> Iterator[bytes]:
        d = isal_zlib.decompressobj(31)
        in_member = False
        data = head
        while True:
            if not data:
                data = self._raw.read(CHUNK)
                if not data:
                    if in_member:
                        raise IntegrityError(f"{self._what} is a truncated gzip stream; the source is corrupt.")
                    return
            if not in_member:
                if not data.strip(b"\0"):  # zero padding after the last member is tolerated, as gzip does
                    data = b""
                    continue
                in_member = True
            try:
                out = d.decompress(data, CHUNK)
            except isal_zlib.error as exc:  # type: ignore[misc]
                raise IntegrityError(f"{self._what} is not a valid gzip stream ({exc}).") from None
            if out:
                yield out
            if d.eof:
                data = d.unused_data
                d = isal_zlib.decompressobj(31)
                in_member = False
            else:
                data = d.unconsumed_tail
                while not data and len(out) == CHUNK:  # output may still be pending for input already taken
                    out = d.decompress(b"", CHUNK)
                    if out:
                        yield out

    def _zstd_pieces(self, head: bytes) -> Iterator[bytes]:
        reader = zstandard.ZstdDecompressor().stream_reader(
            _Prepended(head, self._raw),  # type: ignore[arg-type]
            read_size=CHUNK, read_across_frames=True, closefd=False,
        )
        while True:
            try:
                out = reader.read(CHUNK)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{self._what} is not a valid zstd stream ({exc}).") from None
            if not out:
                return
            yield out

    def _end(self) -> None:
        self._eof = True
        if self._hash is not None and self._expect is not None:
            actual = f"{self._expect[0].split(':', 1)[0]}:{self._hash.hexdigest()}"
            if actual != self._expect[0]:
                raise IntegrityError(
                    f"{self._what} uncompresses to DiffID {actual} but the image config says {self._expect[0]}; "
                    "the image is corrupt or was tampered with."
                )

    def _next_piece(self) -> bool:
        """Make ``self._piece`` hold undelivered bytes; False at the end of the stream."""
        if self._eof:
            return False
        for piece in self._pieces:
            if piece:
                self._piece = piece
                self._offset = 0
                return True
        self._end()
        return False

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        if self._offset >= len(self._piece) and not self._next_piece():
            return b""
        # Whole pieces are handed on without a copy; only a partial read slices.
        if self._offset == 0 and len(self._piece) <= n:
            out = self._piece
            self._offset = len(out)
        else:
            out = self._piece[self._offset : self._offset + n]
            self._offset += len(out)
        if self._hash is not None:
            self._hash.update(out)
        self._count += len(out)
        return out

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def open_verified_blob(source: BlobSource, desc: Descriptor, diff_id: str | None = None) -> VerifyingReader:
    """Open a blob verified against its digest and size, and optionally its uncompressed DiffID on the side."""
    what = f"blob {desc.digest} from {source.name}"
    raw = source.open_blob(desc)
    if diff_id is None:
        return VerifyingReader(raw, desc.digest, desc.size, what)
    state: dict[str, object] = {}
    diff_hash = _hasher(diff_id)

    def observe(chunk: bytes) -> None:
        dec = state.get("dec")
        if dec is None:
            dec = push_decompressor(detect_compression(chunk), diff_hash.update, what)
            state["dec"] = dec
        dec.feed(chunk)  # type: ignore[attr-defined]

    def finish() -> None:
        dec = state.get("dec")
        if dec is not None:
            dec.finish()  # type: ignore[attr-defined]
        actual = f"{diff_id.split(':', 1)[0]}:{diff_hash.hexdigest()}"
        if actual != diff_id:
            raise IntegrityError(
                f"{what} uncompresses to DiffID {actual} but the image config says {diff_id}; "
                "the image is corrupt or was tampered with."
            )

    return VerifyingReader(raw, desc.digest, desc.size, what, observers=(observe,), at_end=(finish,))


def open_verified_tar(source: BlobSource, desc: Descriptor, diff_id: str) -> DecompressingReader:
    """Open a layer's uncompressed tar, verified against blob digest, size and DiffID as it streams."""
    return verified_tar(source.open_blob(desc), desc, diff_id, f"layer {desc.digest} from {source.name}")


def verified_tar(raw: BinaryIO, desc: Descriptor, diff_id: str, what: str) -> DecompressingReader:
    """The uncompressed tar of the layer blob ``raw`` (opened already), verified as ``open_verified_tar`` does."""
    blob = VerifyingReader(raw, desc.digest, desc.size, what)
    # An uncompressed layer's DiffID is its digest: the bytes are already hashed once by the blob reader.
    verify = None if desc.digest == diff_id else (diff_id, what)
    return DecompressingReader(blob, what, verify=verify)  # type: ignore[arg-type]


FINGERPRINT_KEY_SIZE = 32
_FINGERPRINT_IV = bytes(12)  # one fixed IV: the tags are only ever compared in memory, never shown or stored


class KeyedRangeHash:
    """GMAC (AES-256-GCM over additional data only) under a key that never leaves the process: a hash of bytes
    that nobody without the key can match with other bytes (GHASH is almost-universal: two different inputs of
    up to L 16-byte blocks collide with probability about L / 2**128 over the key). It runs at memory speed,
    more than ten times faster than SHA-256, which is why it fingerprints what a read saw."""

    __slots__ = ("_gmac",)

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._gmac = Cipher(algorithms.AES(key), modes.GCM(_FINGERPRINT_IV)).encryptor()

    def update(self, data: bytes | memoryview) -> None:
        self._gmac.authenticate_additional_data(data)  # type: ignore[attr-defined]

    def digest(self) -> bytes:
        """The tag; call once, at the end."""
        self._gmac.finalize()
        return bytes(self._gmac.tag)  # type: ignore[attr-defined]


class RangeFingerprint(Protocol):
    """Byte ranges of a blob, (offset, length) in ascending order, and the keyed hash of their bytes
    (``KeyedRangeHash`` under ``key``)."""

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def key(self) -> bytes: ...

    @property
    def tag(self) -> bytes: ...


class RangeCheck(ReadStream):
    """Passes a blob's bytes through and, at its end, checks that the given ranges hold the bytes an earlier,
    unverified read saw there (their keyed hash). Under a verifying reader this proves the earlier read saw
    verified bytes; a difference raises IntegrityError: the blob changed between the two reads."""

    def __init__(self, raw: BinaryIO, prints: Sequence[RangeFingerprint], what: str) -> None:
        super().__init__()
        self._raw = raw
        self._what = what
        self._pos = 0
        self._checked = False
        # Per fingerprint: its ranges, the index of the next range, and a running hash.
        self._states = [(p, [0], KeyedRangeHash(p.key)) for p in prints]

    def read(self, n: int | None = -1) -> bytes:
        data = self._raw.read(-1 if n is None else n)
        if not data:
            self._check()
            return data
        start, end = self._pos, self._pos + len(data)
        view = memoryview(data)
        for fingerprint, at, hasher in self._states:
            ranges = fingerprint.ranges
            while at[0] < len(ranges):
                offset, length = ranges[at[0]]
                if offset >= end:
                    break
                lo, hi = max(offset, start), min(offset + length, end)
                if lo < hi:
                    hasher.update(view[lo - start : hi - start])
                if offset + length > end:
                    break
                at[0] += 1
        self._pos = end
        return data

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        for fingerprint, at, hasher in self._states:
            if at[0] != len(fingerprint.ranges) or not hmac.compare_digest(hasher.digest(), fingerprint.tag):
                raise IntegrityError(
                    f"{self._what} read differently during the analysis than during the conversion; it changed "
                    "while sconify read it. Convert it again from a source nobody is writing to."
                )

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


class CheckedSource:
    """A BlobSource whose blobs are read through ``RangeCheck`` against the fingerprints given per digest."""

    def __init__(self, inner: BlobSource, prints: Mapping[str, Sequence[RangeFingerprint]]) -> None:
        self._inner = inner
        self._prints = prints
        self.name = inner.name

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        raw = self._inner.open_blob(desc)
        prints = self._prints.get(desc.digest)
        if not prints:
            return raw
        return RangeCheck(raw, prints, f"blob {desc.digest} from {self.name}")  # type: ignore[return-value]


class HashingWriter:
    """Wraps a writable file and records the digest and size of what passes through it."""

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        self._out.write(data)
        return len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class LayerSink:
    """The writing end of a new layer's blob: hashing, (optional) compression and the writes downstream,
    either inline or in a thread of their own fed through a small bounded queue, so that a layer's producer
    (tar parsing, sealing) and its consumer use two cores; the output is the same bytes either way.

    ``write`` takes ordinary bytes; ``write_incompressible`` takes bytes known not to compress (ciphertext),
    which a compressing sink stores instead of running them through the compressor.
    """

    QUEUE_CHUNKS = 2  # at most this many pending writes (about 2 MiB) per writer
    # Whether incompressible bytes are treated apart (a writer of tar layers batches small pieces of them with
    # the rest instead, so that many small files do not become many hand-overs to the writing thread).
    separates_incompressible = True

    def __init__(self, out: Writable, *, background: bool = False) -> None:
        self._out = out
        self.uncompressed_size = 0
        self._queue: queue.Queue[tuple[bytes, bool] | None] | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wanted = False  # set from any thread by ``go_background``; acted on by the producer's next write
        if background:
            self._start()

    def _start(self) -> None:
        self._queue = queue.Queue(self.QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._drain, name="layer-sink", daemon=True)
        self._thread.start()

    def go_background(self) -> None:
        """Move the rest of the work to a thread of its own, from the producer's next write on (callable from
        any thread; the bytes and their order do not change). For a sink that started inline because the
        cores were busy, and now has one to itself."""
        self._wanted = True

    def _consume(self, data: bytes, incompressible: bool) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._consume(*item)
                except BaseException as exc:  # handed to the producer at its next write or at close
                    self._error = exc

    def _put(self, data: bytes, incompressible: bool) -> int:
        self.uncompressed_size += len(data)
        if self._queue is None and self._wanted and not self._closed:
            self._start()
        if self._queue is None:
            self._consume(data, incompressible)
        else:
            if self._error is not None:
                raise self._error
            self._queue.put((bytes(data), incompressible))
        return len(data)

    def write(self, data: bytes) -> int:
        return self._put(data, False)

    def write_incompressible(self, data: bytes) -> int:
        return self._put(data, True)

    def close(self) -> None:
        self._closed = True
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None
            if self._error is not None:
                raise self._error
        self._finish()

    def abandon(self) -> None:
        """Stop the background thread after an error on the producer's side; nothing more is written."""
        self._closed = True
        if self._queue is not None and self._thread is not None:
            self._error = self._error or RuntimeError("abandoned")
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    @property
    def diff_id(self) -> str | None:
        """The DiffID of what was written, or None when it equals the blob digest (an uncompressed layer)."""
        raise NotImplementedError


# A deterministic gzip member header: deflate, no flags, no mtime, no extra flags, OS "unknown".
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_STORED_MAX = 0xFFFF  # the largest stored deflate block


class GzipWriter(LayerSink):
    """Deterministic streaming gzip (no name, no time) into a writable, with the DiffID of the input.

    Ordinary bytes go through ISA-L's deflate; incompressible bytes (``write_incompressible``) are written as
    stored deflate blocks after a full flush, which costs a few bytes instead of a compression pass that
    cannot shrink them. It is one ordinary gzip member that every inflater reads.
    """

    def __init__(self, out: Writable, level: int = GZIP_LEVEL, *, background: bool = False) -> None:
        self._c = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
        self._diff = hashlib.sha256()
        self._crc = 0
        self._pending = False  # bytes given to the compressor since its last flush
        self._started = False
        super().__init__(out, background=background)

    def _emit(self, data: bytes | bytearray) -> None:
        if not self._started:
            self._started = True
            data = _GZIP_HEADER + data
        if data:
            self._out.write(data)  # type: ignore[arg-type]

    def _consume(self, data: bytes, incompressible: bool) -> None:
        self._diff.update(data)
        self._crc = isal_zlib.crc32(data, self._crc)
        if not incompressible:
            self._pending = True
            self._emit(self._c.compress(data))
            return
        out = bytearray()
        if self._pending:  # end the compressed run on a byte boundary, with no references into what follows
            out += self._c.flush(isal_zlib.Z_FULL_FLUSH)
            self._pending = False
        view = memoryview(data)
        for at in range(0, len(view), _STORED_MAX):
            piece = view[at : at + _STORED_MAX]
            n = len(piece)
            out += bytes((0, n & 0xFF, n >> 8, ~n & 0xFF, (~n >> 8) & 0xFF))  # BFINAL=0, BTYPE=00, LEN, NLEN
            out += piece
        self._emit(out)

    def _finish(self) -> None:
        size = self.uncompressed_size & 0xFFFFFFFF
        self._emit(self._c.flush(isal_zlib.Z_FINISH) + self._crc.to_bytes(4, "little") + size.to_bytes(4, "little"))

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._diff.hexdigest()


class TarWriter(LayerSink):
    """An uncompressed layer: the bytes go downstream unchanged (the blob digest is the DiffID)."""

    separates_incompressible = False

    def _consume(self, data: bytes, incompressible: bool) -> None:
        self._out.write(data)

    def _finish(self) -> None:
        pass

    @property
    def diff_id(self) -> None:
        return None


def copy_stream(
    src: BinaryIO, dst: BinaryIO | HashingWriter | GzipWriter, progress: Callable[[int], None] | None = None
) -> int:
    """Copy a stream in bounded chunks; returns the byte count."""
    total = 0
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        total += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return total
