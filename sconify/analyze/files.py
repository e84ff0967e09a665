"""Reading an image for analysis: one pass over every layer's tar headers to build the merged tree, then
batched fetches of the few file contents the analysis needs, each from the layer that supplied the file.

Every byte read is counted (compressed blob bytes, uncompressed tar bytes, content bytes looked at), and every
layer read runs to its end so that the blob's digest, size and DiffID are verified. A converter, which reads and
verifies every layer again before it writes anything, may defer that verification: an uncompressed layer stored
locally is then read in place and file contents are skipped by seeking (``defer_verification``).

In the header pass a few small files are captured on the way (passwd, group, ld.so.conf, os-release) together
with the first bytes of every executable file, which is enough to follow symlinks, shebangs and ELF identities
without another read.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from sconify.analyze.elf import ElfInfo, is_elf, parse_elf, scan_markers
from sconify.errors import SconifyError
from sconify.image.model import Image, Layer, Readable
from sconify.image.streams import (
    CHUNK,
    FINGERPRINT_KEY_SIZE,
    DecompressingReader,
    KeyedRangeHash,
    ReadStream,
    is_seekable,
    verified_tar,
)
from sconify.image.tarfs.entry import Entry, EntryKind
from sconify.image.tarfs.reader import EntryContent, read_layer
from sconify.image.tree import FileTree
from sconify.progress import SILENT, Progress, Task

log = logging.getLogger(__name__)

HEAD_BYTES = 256  # Linux reads this much of a file to find "#!" and its interpreter line (BINPRM_BUF_SIZE)
TEXT_LIMIT = 1 << 20  # scripts and configuration files larger than this are not read whole
MAX_HEADS = 200_000  # bound on the executable-file heads captured in the header pass
SCRIPT_PREFETCH = 64 << 10  # executable scripts up to this size are captured whole in the header pass ...
SCRIPT_BUDGET = 16 << 20  # ... until this many bytes of them are held
SPOOL_IN_MEMORY = 8 << 20  # ELF files larger than this are spooled to a temporary file for parsing

# Files captured whole in the header pass: they are small and nearly every analysis needs them.
PREFETCH_EXACT = frozenset({
    "etc/passwd", "etc/group", "etc/ld.so.conf", "etc/os-release", "usr/lib/os-release",
})
PREFETCH_GLOBS = ("etc/ld.so.conf.d/*", "etc/ld-musl-*.path")


@dataclass(frozen=True)
class FileContent:
    """What was read of one file: its first bytes, and either its text, its ELF facts, or neither."""

    size: int
    head: bytes
    text: bytes | None = None  # the whole file, when it is not an ELF and not larger than TEXT_LIMIT
    elf: ElfInfo | None = None  # when it is an ELF
    complete: bool = True  # False for a head captured in the header pass


@dataclass
class ReadStats:
    """Counters of what the analysis read (mutable while reading; copied into the Analysis at the end)."""

    layers: int = 0
    layer_reads: list[int] = field(default_factory=list)  # per layer: how many times its blob was streamed
    compressed_bytes: int = 0  # blob bytes read from the source
    uncompressed_bytes: int = 0  # tar bytes streamed out of the decompressor
    header_pass_compressed: int = 0
    header_pass_uncompressed: int = 0
    content_bytes: int = 0  # file content bytes the analysis looked at (heads, texts, ELF files)
    files_fetched: int = 0
    rounds: int = 0  # fetch rounds after the header pass


@dataclass(frozen=True)
class LayerCounts:
    """Per-layer counts from the header pass."""

    entries: int
    whiteouts: int
    regular_bytes: int


class _CountingReader(ReadStream):
    """A read-only stream that adds the size of every read to a counter."""

    def __init__(self, raw: Readable, add: Callable[[int], None]) -> None:
        super().__init__()
        self._raw = raw
        self._add = add

    def read(self, n: int | None = -1) -> bytes:
        data = self._raw.read(n if n is not None else -1)
        if data:
            self._add(len(data))
        return data

    def close(self) -> None:
        try:
            close = getattr(self._raw, "close", None)
            if close is not None:
                close()
        finally:
            super().close()


@dataclass(frozen=True)
class ReadFingerprint:
    """What one unverified read of a blob saw: the byte ranges it read, in order, and a keyed hash of their bytes
    (``KeyedRangeHash`` under ``key``, a random key of the reader's that never leaves the process).

    A later verified read of the whole blob hashes the same ranges (``sconify.image.streams.RangeCheck``): equal
    hashes prove that the unverified read saw the verified bytes, so what was learnt from it stands.
    """

    ranges: tuple[tuple[int, int], ...]  # (offset, length), ascending, adjacent ranges merged
    key: bytes = field(repr=False)
    tag: bytes


class _InPlace(ReadStream):
    """A local layer blob read in place without verification, at most its declared size: an uncompressed layer
    whose file contents are skipped by seeking, or a compressed one that a decompressor reads from start to end.

    Only for readers whose every layer read this way is verified in full later, before anything that depends
    on it is written (``LayerReader.unverified`` names them); the ranges read and their keyed hash are handed to
    ``done`` on close as a ``ReadFingerprint`` for that check.
    """

    def __init__(
        self,
        raw: BinaryIO,
        size: int,
        add: Callable[[int], None],
        skipped: Callable[[int], None],
        done: Callable[[ReadFingerprint], None],
        key: bytes,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._left = size
        self._add = add
        self._skipped = skipped
        self._done = done
        self._pos = 0
        self._ranges: list[list[int]] = []
        self._key = key
        self._hash = KeyedRangeHash(key)

    def read(self, n: int | None = -1) -> bytes:
        want = self._left if n is None or n < 0 else min(n, self._left)
        data = self._raw.read(want) if want else b""
        if data:
            self._hash.update(data)
            if self._ranges and self._ranges[-1][0] + self._ranges[-1][1] == self._pos:
                self._ranges[-1][1] += len(data)
            else:
                self._ranges.append([self._pos, len(data)])
            self._pos += len(data)
            self._left -= len(data)
            self._add(len(data))
        return data

    def skip(self, n: int) -> int:
        """Move ``n`` bytes ahead (fewer at the end of the blob); returns how many."""
        n = min(n, self._left)
        self._raw.seek(n, io.SEEK_CUR)
        self._pos += n
        self._left -= n
        self._skipped(n)
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._raw.close()
        finally:
            super().close()
            self._done(ReadFingerprint(tuple((a, b) for a, b in self._ranges), self._key, self._hash.digest()))


def _is_prefetched(path: str) -> bool:
    return path in PREFETCH_EXACT or any(fnmatch.fnmatchcase(path, g) for g in PREFETCH_GLOBS)


def _read_content(content: EntryContent | BinaryIO, size: int, what: str, stats: ReadStats) -> FileContent:
    """Read a file for analysis: text up to TEXT_LIMIT, or an ELF parsed from a spool; the rest is skipped."""
    head = content.read(HEAD_BYTES)
    stats.content_bytes += len(head)
    if is_elf(head):
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            spool.write(head)

            def chunks() -> Iterator[bytes]:
                yield head
                while chunk := content.read(CHUNK):
                    stats.content_bytes += len(chunk)
                    spool.write(chunk)
                    yield chunk

            markers = scan_markers(chunks())
            spool.seek(0)
            info = parse_elf(spool, what, markers)  # type: ignore[arg-type]
        return FileContent(size, head, None, info)
    if size <= TEXT_LIMIT:
        rest = content.read(size - len(head)) if size > len(head) else b""
        stats.content_bytes += len(rest)
        return FileContent(size, head, head + rest)
    return FileContent(size, head)


HEADER_THREADS = 2


@dataclass(frozen=True)
class LayerHeaders:
    """What one read of a layer's headers yields: its entries, the small contents captured, its counts."""

    entries: tuple[Entry, ...]
    captured: dict[str, FileContent]
    counts: LayerCounts


class HeaderCache(Protocol):
    """Where header scans of layers are kept between runs, by blob digest."""

    def get(self, digest: str) -> LayerHeaders | None: ...

    def put(self, digest: str, headers: LayerHeaders) -> None: ...


class LayerReader:
    """Streams the layers of one image, counting bytes and verifying every blob to its end."""

    def __init__(
        self,
        image: Image,
        stats: ReadStats | None = None,
        progress: Progress = SILENT,
        cache: HeaderCache | None = None,
        defer_verification: bool = False,
    ) -> None:
        self.image = image
        self.cache = cache
        self.defer_verification = defer_verification
        # Layers read without verification (``defer_verification``): the caller must verify each in full and
        # check that every unverified read saw the verified bytes (``fingerprints``).
        self.unverified: set[int] = set()
        self.fingerprints: dict[int, list[ReadFingerprint]] = {}
        self._key = os.urandom(FINGERPRINT_KEY_SIZE)  # for the fingerprints of unverified reads; never stored
        self.headers: list[LayerHeaders] = []
        self._lock = threading.Lock()
        self.layers: tuple[Layer, ...] = image.layers
        self.progress = progress
        self._task: Task | None = None
        self.stats = stats or ReadStats()
        self.stats.layers = len(self.layers)
        self.stats.layer_reads = [0] * len(self.layers)

    def _what(self, index: int) -> str:
        return f"layer {index} ({self.layers[index].descriptor.digest}) of {self.image.name or 'the image'}"

    def _add_compressed(self, n: int) -> None:
        with self._lock:
            self.stats.compressed_bytes += n
            if self._task is not None:
                self._task.update(n)

    def _add_uncompressed(self, n: int) -> None:
        with self._lock:
            self.stats.uncompressed_bytes += n

    def _add_skipped(self, n: int) -> None:
        with self._lock:
            if self._task is not None:
                self._task.update(n)

    def _add_local(self, n: int) -> None:
        self._add_compressed(n)
        self._add_uncompressed(n)

    def open_tar(self, index: int, *, verified: bool = False) -> BinaryIO:
        layer = self.layers[index]
        with self._lock:
            self.stats.layer_reads[index] += 1
        # A blob stored locally can be read in place, unverified: an uncompressed one (its digest is its DiffID)
        # skipping file contents by seeking, a compressed one inflated without hashing.
        raw = layer.source.open_blob(layer.descriptor)
        # (Not a registry blob kept in the conversion's spool: its download verified it already.)
        holds = getattr(layer.source, "holds", None)
        if (self.defer_verification and not verified and is_seekable(raw)
                and not (holds is not None and holds(layer.descriptor.digest))):
            with self._lock:
                self.unverified.add(index)

            def done(fingerprint: ReadFingerprint) -> None:
                with self._lock:
                    self.fingerprints.setdefault(index, []).append(fingerprint)

            size = layer.descriptor.size
            if layer.descriptor.digest == layer.diff_id:
                return _InPlace(raw, size, self._add_local, self._add_skipped, done, self._key)  # type: ignore[return-value]
            blob = _InPlace(raw, size, self._add_compressed, self._add_skipped, done, self._key)
            return _CountingReader(DecompressingReader(blob, self._what(index)), self._add_uncompressed)  # type: ignore[return-value, arg-type]
        what = f"layer {layer.descriptor.digest} from {layer.source.name}"
        tar = verified_tar(_CountingReader(raw, self._add_compressed), layer.descriptor, layer.diff_id, what)  # type: ignore[arg-type]
        return _CountingReader(tar, self._add_uncompressed)  # type: ignore[return-value]

    def scan_layer(self, index: int) -> LayerHeaders:
        """One layer's entries, the contents captured on the way, and its counts (one read of the blob)."""
        try:
            return self._scan_layer(index, verified=False)
        except SconifyError:
            with self._lock:
                if index not in self.unverified:
                    raise
                self.unverified.discard(index)
                self.fingerprints.pop(index, None)
            # Read unverified, the layer did not parse: a verified read tells a tampered blob from a bad one.
            return self._scan_layer(index, verified=True)

    def _scan_layer(self, index: int, *, verified: bool) -> LayerHeaders:
        captured: dict[str, FileContent] = {}
        entries: list[Entry] = []
        heads = script_bytes = 0
        n = whiteouts = regular = 0

        def wanted(entry: Entry) -> bool:
            if entry.kind is not EntryKind.REGULAR or entry.size == 0:
                return False
            return _is_prefetched(entry.path) or (bool(entry.mode & 0o111) and heads < MAX_HEADS)

        stats = ReadStats()  # per layer, added to the reader's under the lock (layers are read in parallel)
        with closing(self.open_tar(index, verified=verified)) as stream:
            for entry, content in read_layer(stream, what=self._what(index), needed=wanted):
                n += 1
                entries.append(entry)
                if entry.is_overlay_marker and not entry.is_whiteout_meta:
                    whiteouts += 1
                elif entry.kind is EntryKind.REGULAR:
                    regular += entry.size
                if content is None:
                    continue
                if _is_prefetched(entry.path):
                    captured[entry.path] = _read_content(content, entry.size, entry.path, stats)
                    continue
                head = content.read(HEAD_BYTES)
                stats.content_bytes += len(head)
                heads += 1
                if (head.startswith(b"#!") and entry.size <= SCRIPT_PREFETCH
                        and script_bytes + entry.size <= SCRIPT_BUDGET):
                    # Scripts are small and the analysis reads the ones it meets whole (wrappers).
                    rest = content.read(entry.size - len(head))
                    stats.content_bytes += len(rest)
                    script_bytes += entry.size
                    captured[entry.path] = FileContent(entry.size, head, head + rest)
                else:
                    captured[entry.path] = FileContent(entry.size, head, complete=False)
        with self._lock:
            self.stats.content_bytes += stats.content_bytes
        return LayerHeaders(tuple(entries), captured, LayerCounts(n, whiteouts, regular))

    def header_pass(self) -> tuple[FileTree, dict[tuple[int, str], FileContent], list[LayerCounts]]:
        """The merged tree, the contents captured on the way (keyed by layer and member path), layer counts.

        Layers are read in parallel; with a ``cache``, a layer whose headers were read before (same blob
        digest) is not read again. The per-layer results stay in ``self.headers`` for the converter.
        """
        total = sum(layer.descriptor.size for layer in self.layers)

        def one(index: int) -> LayerHeaders:
            digest = self.layers[index].descriptor.digest
            cached = self.cache.get(digest) if self.cache is not None else None
            if cached is not None:
                return cached
            headers = self.scan_layer(index)
            if self.cache is not None and index not in self.unverified:  # only verified scans are kept
                self.cache.put(digest, headers)
            return headers

        with self.progress.task("reading layer headers", total=total) as task:  # type: ignore[attr-defined]
            self._task = task
            try:
                # Threads help while a layer is inflated or downloaded (the GIL is free then); uncompressed layers
                # read in place are pure Python parsing, which two threads only slow down.
                in_place = self.defer_verification and all(la.descriptor.digest == la.diff_id for la in self.layers)
                workers = 1 if in_place else max(1, min(HEADER_THREADS, len(self.layers)))
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    self.headers = list(pool.map(one, range(len(self.layers))))
            finally:
                self._task = None
        tree = FileTree()
        captured: dict[tuple[int, str], FileContent] = {}
        for index, headers in enumerate(self.headers):
            tree.add_layer(headers.entries)
            for path, content in headers.captured.items():
                captured[(index, path)] = content
        self.stats.header_pass_compressed = self.stats.compressed_bytes
        self.stats.header_pass_uncompressed = self.stats.uncompressed_bytes
        return tree, captured, [h.counts for h in self.headers]

    def fetch(self, members: Iterable[tuple[int, str]]) -> dict[tuple[int, str], FileContent]:
        """Read the given (layer, member path) files, reading each layer involved once, in layer order."""
        by_layer: dict[int, set[str]] = {}
        for index, path in members:
            by_layer.setdefault(index, set()).add(path)
        out: dict[tuple[int, str], FileContent] = {}
        for index in sorted(by_layer):
            paths = by_layer[index]
            try:
                found = self._fetch_from(index, paths, verified=False)
            except SconifyError:
                if index not in self.unverified:
                    raise
                # It stays listed: the failed read's fingerprint must match the verified bytes (it cannot, if
                # the blob changed between the reads, and then the conversion stops).
                found = self._fetch_from(index, paths, verified=True)
            out.update(found)
            for path in paths:
                if (index, path) not in out:
                    log.debug("%s has no content for %s", self._what(index), path)
        return out

    def _fetch_from(self, index: int, paths: set[str], *, verified: bool) -> dict[tuple[int, str], FileContent]:
        out: dict[tuple[int, str], FileContent] = {}
        with closing(self.open_tar(index, verified=verified)) as stream:
            for entry, content in read_layer(stream, what=self._what(index), needed=lambda e: e.path in paths):
                if content is not None:
                    # A later member of the same path in one layer replaces the earlier one, as in the tree.
                    out[(index, entry.path)] = _read_content(content, entry.size, entry.path, self.stats)
                    self.stats.files_fetched += 1
        return out
