"""SGX measurement records (ECREATE, EADD, EEXTEND), the canonical SGXS stream they form, and MRENCLAVE.

An SGX CPU computes MRENCLAVE as SHA-256 over 64-byte records (Intel SDM Vol. 3D, "Enclave
Measurement"): one ECREATE, then per added page one EADD, and per measured 256-byte chunk of a page
one EEXTEND header followed by the chunk. The same records, written one after another in ascending
page order, are a canonical SGXS file (Fortanix's format), so ``sha256sum`` of the file is MRENCLAVE.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from sconify.errors import IntegrityError

PAGE_SIZE = 4096
CHUNK_SIZE = 256
RECORD_SIZE = 64
CHUNKS_PER_PAGE = PAGE_SIZE // CHUNK_SIZE
ALL_CHUNKS = (1 << CHUNKS_PER_PAGE) - 1

# SECINFO.FLAGS: permissions in bits 0..2, page type in bits 8..15 (SDM "SECINFO").
SECINFO_R = 0x1
SECINFO_W = 0x2
SECINFO_X = 0x4
PT_TCS = 1
PT_REG = 2
FLAGS_TCS = PT_TCS << 8
FLAGS_REG = PT_REG << 8
_SECINFO_PERMISSIONS = SECINFO_R | SECINFO_W | SECINFO_X
_SECINFO_PAGE_TYPE = 0xFF00

TAG_ECREATE = b"ECREATE\0"
TAG_EADD = b"EADD\0\0\0\0"
TAG_EEXTEND = b"EEXTEND\0"

_ECREATE = struct.Struct("<8sIQ44x")
_EADD = struct.Struct("<8sQQ40x")
_EEXTEND = struct.Struct("<8sQ48x")
_U64 = struct.Struct("<Q")
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_TAIL = bytes(48)

# EADD-only runs are produced a window of 4096 pages (16 MiB of address space) at a time: inside a
# window the page's offset bits live in bytes 1..2 of the offset field and the window in bytes 3..7,
# so moving to the next window rewrites five byte columns instead of 4096 records.
_WINDOW_PAGES = 4096
_MEASURED_BATCH = 256 * 1024


def ecreate_record(ssa_frame_size: int, size: int) -> bytes:
    """The ECREATE record: tag, SSAFRAMESIZE (u32, in pages), SIZE (u64, bytes), 44 zero bytes."""
    return _ECREATE.pack(TAG_ECREATE, ssa_frame_size, size)


def eadd_record(offset: int, flags: int) -> bytes:
    """The EADD record: tag, page offset in the enclave (u64), the first 48 bytes of SECINFO."""
    return _EADD.pack(TAG_EADD, offset, flags)


def eextend_record(offset: int) -> bytes:
    """The 64-byte EEXTEND header for the 256-byte chunk at ``offset``; the chunk itself follows it."""
    return _EEXTEND.pack(TAG_EEXTEND, offset)


def describe_flags(flags: int) -> str:
    """A short human form of SECINFO flags, such as ``REG r-x`` or ``TCS ---``."""
    page_type = {PT_TCS: "TCS", PT_REG: "REG"}.get((flags >> 8) & 0xFF, f"type{(flags >> 8) & 0xFF}")
    perms = "".join(c if flags & bit else "-" for c, bit in (("r", SECINFO_R), ("w", SECINFO_W),
                                                              ("x", SECINFO_X)))
    return f"{page_type} {perms}"


@dataclass(frozen=True)
class PageRange:
    """Consecutive enclave pages added with the same SECINFO flags.

    ``offset`` is the first page's offset from the enclave base; ``measured`` says whether every
    256-byte chunk is EEXTENDed. ``data`` holds the pages' initial contents (zero-padded to the
    range; ``None`` means all zero); it is measured when ``measured`` is true and must be zero
    otherwise, because the loader supplies unmeasured pages without any promise about their bytes.
    ``name`` says what the pages are for (``runtime``, ``tcs``, ``heap``).
    """

    offset: int
    pages: int
    flags: int
    measured: bool
    data: bytes | None = None
    name: str = ""

    @property
    def end(self) -> int:
        """The offset just after the range."""
        return self.offset + self.pages * PAGE_SIZE


def _measured_chunks(r: PageRange) -> Iterator[bytes]:
    """Records for a measured range: per page its EADD, then 16 EEXTEND headers each with its chunk."""
    data = r.data or b""
    batch: list[bytes] = []
    size = 0
    for page in range(r.pages):
        offset = r.offset + page * PAGE_SIZE
        content = data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        if len(content) < PAGE_SIZE:
            content = content + _ZERO_PAGE[len(content):]
        batch.append(_EADD.pack(TAG_EADD, offset, r.flags))
        for i in range(CHUNKS_PER_PAGE):
            batch.append(TAG_EEXTEND + _U64.pack(offset + i * CHUNK_SIZE) + _ZERO_TAIL)
            batch.append(content[i * CHUNK_SIZE:(i + 1) * CHUNK_SIZE])
        size += RECORD_SIZE + CHUNKS_PER_PAGE * (RECORD_SIZE + CHUNK_SIZE)
        if size >= _MEASURED_BATCH:
            yield b"".join(batch)
            batch.clear()
            size = 0
    if batch:
        yield b"".join(batch)


def _eadd_run(offset: int, pages: int, flags: int) -> Iterator[memoryview]:
    """EADD records for ``pages`` pages from ``offset``, in views of one reused buffer (see iter_sgxs)."""
    n = _WINDOW_PAGES
    buf = bytearray(n * RECORD_SIZE)
    for k, byte in enumerate(TAG_EADD):
        buf[k::RECORD_SIZE] = bytes([byte]) * n
    for k, byte in enumerate(_U64.pack(flags)):
        buf[16 + k::RECORD_SIZE] = bytes([byte]) * n
    buf[9::RECORD_SIZE] = bytes((j << 4) & 0xFF for j in range(n))
    buf[10::RECORD_SIZE] = bytes((j >> 4) & 0xFF for j in range(n))
    view = memoryview(buf)
    page = offset // PAGE_SIZE
    end = page + pages
    high = bytes(8)  # the offset bytes 3..7 currently in the buffer (all zero)
    while page < end:
        window = page // n
        new_high = _U64.pack(window << 24)
        for k in range(3, 8):
            if new_high[k] != high[k]:
                buf[8 + k::RECORD_SIZE] = bytes([new_high[k]]) * n
        high = new_high
        first = page - window * n
        last = min(n, end - window * n)
        yield view[first * RECORD_SIZE:last * RECORD_SIZE]
        page = window * n + last


def iter_sgxs(ssa_frame_size: int, size: int, ranges: Iterable[PageRange]) -> Iterator[bytes | memoryview]:
    """The canonical SGXS stream of an enclave, in chunks; their concatenation hashes to MRENCLAVE.

    ``ranges`` must be in ascending offset order without overlap. A chunk may be a view of a buffer
    that the next chunk overwrites: use (hash, write, copy) each chunk before asking for the next.
    """
    yield ecreate_record(ssa_frame_size, size)
    for r in ranges:
        if r.measured:
            yield from _measured_chunks(r)
        else:
            yield from _eadd_run(r.offset, r.pages, r.flags)


def sgxs_size(ranges: Iterable[PageRange]) -> int:
    """The length in bytes of the SGXS stream of these ranges (ECREATE included)."""
    total = RECORD_SIZE
    for r in ranges:
        total += r.pages * RECORD_SIZE
        if r.measured:
            total += r.pages * CHUNKS_PER_PAGE * (RECORD_SIZE + CHUNK_SIZE)
    return total


def mrenclave(chunks: Iterable[bytes | memoryview]) -> bytes:
    """SHA-256 of a measurement stream: the MRENCLAVE an SGX CPU computes for the same records."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


@dataclass(frozen=True)
class SgxsPages:
    """Consecutive pages of a parsed SGXS stream with the same SECINFO flags and the same measured chunks.

    ``chunks`` is a 16-bit mask of the 256-byte chunks EEXTENDed in each page (``0xffff``: all).
    """

    offset: int
    pages: int
    flags: int
    chunks: int


@dataclass(frozen=True)
class SgxsSummary:
    """What a canonical SGXS stream says: its hash (MRENCLAVE), the ECREATE values and the added pages."""

    mrenclave: bytes
    ssa_frame_size: int
    size: int
    length: int
    ranges: tuple[SgxsPages, ...]

    @property
    def pages(self) -> int:
        """Number of EADDed pages."""
        return sum(r.pages for r in self.ranges)

    @property
    def measured_chunks(self) -> int:
        """Number of EEXTEND records."""
        return sum(r.pages * bin(r.chunks).count("1") for r in self.ranges)


class _SgxsParser:
    """Checks an SGXS stream record by record against the canonical rules while hashing it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.size: int | None = None
        self.ssa_frame_size = 0
        self.page: int | None = None  # offset of the current (last EADDed) page
        self.page_flags = 0
        self.page_chunks = 0
        self.ranges: list[list[int]] = []  # [offset, pages, flags, chunks]

    def fail(self, position: int, why: str) -> IntegrityError:
        return IntegrityError(
            f"{self.name} is not a valid SGXS stream: {why} (at byte {position}); "
            "export it again with `sconify enclave measure --sgxs FILE`."
        )

    def close_page(self) -> None:
        if self.page is None:
            return
        last = self.ranges[-1] if self.ranges else None
        if (last is not None and last[2] == self.page_flags and last[3] == self.page_chunks
                and last[0] + last[1] * PAGE_SIZE == self.page):
            last[1] += 1
        else:
            self.ranges.append([self.page, 1, self.page_flags, self.page_chunks])

    def ecreate(self, record: bytes, position: int) -> None:
        if position != 0:
            raise self.fail(position, "a second ECREATE record")
        _, ssa, size = _ECREATE.unpack(record)
        if any(record[20:]):
            raise self.fail(position, "non-zero reserved bytes in the ECREATE record")
        if ssa == 0:
            raise self.fail(position, "ECREATE declares an SSA frame size of 0 pages")
        if size < 2 * PAGE_SIZE or size & (size - 1):
            raise self.fail(position, f"ECREATE declares an enclave size {size:#x} that is not a power of two")
        self.ssa_frame_size, self.size = ssa, size

    def check_eadd(self, record: bytes, position: int) -> tuple[int, int]:
        _, offset, flags = _EADD.unpack(record)
        if any(record[24:]):
            raise self.fail(position, "non-zero reserved SECINFO bytes in an EADD record")
        if offset % PAGE_SIZE:
            raise self.fail(position, f"EADD offset {offset:#x} is not page-aligned")
        if self.page is not None and offset <= self.page:
            raise self.fail(position, f"EADD offset {offset:#x} is not above the previous page {self.page:#x}")
        assert self.size is not None
        if offset + PAGE_SIZE > self.size:
            raise self.fail(position, f"EADD offset {offset:#x} is outside the enclave size {self.size:#x}")
        if flags & ~(_SECINFO_PERMISSIONS | _SECINFO_PAGE_TYPE):
            raise self.fail(position, f"EADD SECINFO flags {flags:#x} set reserved bits")
        page_type = (flags >> 8) & 0xFF
        if page_type not in (PT_TCS, PT_REG):
            raise self.fail(position, f"EADD page type {page_type} is neither TCS nor REG")
        if page_type == PT_TCS and flags & _SECINFO_PERMISSIONS:
            raise self.fail(position, "a TCS page with permission bits set")
        if flags & SECINFO_W and not flags & SECINFO_R:
            raise self.fail(position, "a page that is writable but not readable")
        return offset, flags

    def eadd(self, record: bytes, position: int) -> None:
        offset, flags = self.check_eadd(record, position)
        self.close_page()
        self.page, self.page_flags, self.page_chunks = offset, flags, 0

    def eextend(self, record: bytes, position: int) -> None:
        _, offset = _EEXTEND.unpack(record)
        if any(record[16:]):
            raise self.fail(position, "non-zero reserved bytes in an EEXTEND record")
        if offset % CHUNK_SIZE:
            raise self.fail(position, f"EEXTEND offset {offset:#x} is not a multiple of 256")
        if self.page is None or offset // PAGE_SIZE * PAGE_SIZE != self.page:
            raise self.fail(position, f"EEXTEND offset {offset:#x} is not in the page added just before")
        bit = 1 << ((offset % PAGE_SIZE) // CHUNK_SIZE)
        if self.page_chunks & bit:
            raise self.fail(position, f"EEXTEND of chunk {offset:#x} a second time")
        self.page_chunks |= bit


def _eadd_run_bytes(offset: int, pages: int, flags: int) -> bytes:
    if pages <= 256:
        return b"".join(_EADD.pack(TAG_EADD, offset + i * PAGE_SIZE, flags) for i in range(pages))
    return b"".join(bytes(c) for c in _eadd_run(offset, pages, flags))


def _matching_eadd_records(buf: bytes, pos: int, count: int, offset: int, flags: int) -> int:
    """How many of ``count`` records at ``pos`` equal the EADD run that starts at ``offset`` with ``flags``.

    Compares windows that double in size, so a short run costs little and a long one is compared
    at memory speed; inside the first window that differs, a binary search finds the first mismatch.
    """
    matched = 0
    window = 64
    while matched < count:
        n = min(window, count - matched)
        start = pos + matched * RECORD_SIZE
        expected = _eadd_run_bytes(offset + matched * PAGE_SIZE, n, flags)
        got = buf[start:start + n * RECORD_SIZE]
        if got == expected:
            matched += n
            window *= 2
            continue
        lo, hi = 0, n  # the first lo records match; one of records lo..hi-1 differs
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if got[:mid * RECORD_SIZE] == expected[:mid * RECORD_SIZE]:
                lo = mid
            else:
                hi = mid
        return matched + lo
    return matched


def parse_sgxs(source: bytes | BinaryIO, name: str = "the SGXS stream") -> SgxsSummary:
    """Check that ``source`` is a canonical SGXS stream and summarise it; hash it on the way (MRENCLAVE).

    Reads a file object in blocks, so a stream for a large heap needs little memory. Raises an
    IntegrityError that names the first rule broken and where.
    """
    stream: BinaryIO = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    parser = _SgxsParser(name)
    h = hashlib.sha256()
    block = 1 << 20
    buf = b""
    pos = 0
    consumed = 0  # stream bytes before buf[0]
    eof = False

    def fill(need: int) -> bool:
        nonlocal buf, pos, consumed, eof
        while len(buf) - pos < need and not eof:
            more = stream.read(block)
            if not more:
                eof = True
                break
            h.update(more)
            consumed += pos
            buf = buf[pos:] + more
            pos = 0
        return len(buf) - pos >= need

    while fill(RECORD_SIZE) or len(buf) > pos:
        position = consumed + pos
        if len(buf) - pos < RECORD_SIZE:
            raise parser.fail(position, f"a truncated record of {len(buf) - pos} bytes at the end")
        record = buf[pos:pos + RECORD_SIZE]
        tag = record[:8]
        if position == 0 and tag != TAG_ECREATE:
            raise parser.fail(0, "it does not start with an ECREATE record")
        if tag == TAG_ECREATE:
            parser.ecreate(record, position)
            pos += RECORD_SIZE
        elif tag == TAG_EADD:
            parser.eadd(record, position)
            pos += RECORD_SIZE
            # A run of EADD-only pages (a heap) is checked by comparison with the run it must be.
            assert parser.page is not None and parser.size is not None
            count = min((len(buf) - pos) // RECORD_SIZE, (parser.size - parser.page) // PAGE_SIZE - 1)
            if count > 1 and buf[pos:pos + 8] == TAG_EADD:
                run = _matching_eadd_records(buf, pos, count, parser.page + PAGE_SIZE, parser.page_flags)
                if run:
                    # The open page and the run's pages all have these flags and no measured chunk:
                    # the run joins the last range, and its final page becomes the open page.
                    parser.close_page()
                    parser.ranges[-1][1] += run - 1
                    parser.page += run * PAGE_SIZE
                    pos += run * RECORD_SIZE
        elif tag == TAG_EEXTEND:
            if not fill(RECORD_SIZE + CHUNK_SIZE):
                raise parser.fail(position, "an EEXTEND record without its 256 bytes of data")
            parser.eextend(buf[pos:pos + RECORD_SIZE], position)
            pos += RECORD_SIZE + CHUNK_SIZE
        else:
            raise parser.fail(position, f"an unknown record tag {bytes(tag)!r}")
    if parser.size is None:
        raise parser.fail(0, "it is empty")
    parser.close_page()
    ranges = tuple(SgxsPages(o, n, f, c) for o, n, f, c in parser.ranges)
    return SgxsSummary(h.digest(), parser.ssa_frame_size, parser.size, consumed + pos, ranges)
