"""Reading an image for analysis: one pass over every layer's tar headers to build the merged tree, then
batched fetches of the few file contents the analysis needs, each from the layer that supplied the file.

Every byte read is counted (compressed blob bytes, uncompressed tar bytes, content bytes looked at), and every
layer read runs to its end so that the blob's digest, size and DiffID are verified. In the header pass a few
small files are captured on the way (passwd, group, ld.so.conf, os-release) together with the first bytes of
every executable file, which is enough to follow symlinks, shebangs and ELF identities without another read.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from sconify.analyze.elf import ElfInfo, is_elf, parse_elf, scan_markers
from sconify.image.model import BlobSource, Descriptor, Image, Layer, Readable
from sconify.image.streams import CHUNK
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


class _CountingReader(io.RawIOBase):
    """A read-only stream that adds the size of every read to a counter."""

    def __init__(self, raw: Readable, add: Callable[[int], None]) -> None:
        super().__init__()
        self._raw = raw
        self._add = add

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        data = self._raw.read(n if n is not None else -1)
        if data:
            self._add(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        try:
            close = getattr(self._raw, "close", None)
            if close is not None:
                close()
        finally:
            super().close()


class _CountingSource:
    """A BlobSource that counts the raw (compressed) bytes read from another one."""

    def __init__(self, inner: BlobSource, add: Callable[[int], None]) -> None:
        self._inner = inner
        self._add = add
        self.name = inner.name

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return _CountingReader(self._inner.open_blob(desc), self._add)  # type: ignore[return-value]


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
    ) -> None:
        self.image = image
        self.cache = cache
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

    def open_tar(self, index: int) -> BinaryIO:
        layer = self.layers[index]
        with self._lock:
            self.stats.layer_reads[index] += 1
        counted = Layer(layer.descriptor, layer.diff_id, _CountingSource(layer.source, self._add_compressed))
        return _CountingReader(counted.open_tar(), self._add_uncompressed)  # type: ignore[return-value]

    def scan_layer(self, index: int) -> LayerHeaders:
        """One layer's entries, the contents captured on the way, and its counts (one read of the blob)."""
        captured: dict[str, FileContent] = {}
        entries: list[Entry] = []
        heads = script_bytes = 0
        n = whiteouts = regular = 0

        def wanted(entry: Entry) -> bool:
            if entry.kind is not EntryKind.REGULAR or entry.size == 0:
                return False
            return _is_prefetched(entry.path) or (bool(entry.mode & 0o111) and heads < MAX_HEADS)

        stats = ReadStats()  # per layer, added to the reader's under the lock (layers are read in parallel)
        with closing(self.open_tar(index)) as stream:
            for entry, content in read_layer(stream, what=self._what(index), needed=wanted):
                n += 1
                entries.append(entry)
                if entry.is_whiteout or entry.is_opaque:
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
            if self.cache is not None:
                self.cache.put(digest, headers)
            return headers

        with self.progress.task("reading layer headers", total=total) as task:  # type: ignore[attr-defined]
            self._task = task
            try:
                with ThreadPoolExecutor(max_workers=max(1, min(HEADER_THREADS, len(self.layers)))) as pool:
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
            with closing(self.open_tar(index)) as stream:
                for entry, content in read_layer(stream, what=self._what(index),
                                                 needed=lambda e, p=paths: e.path in p):  # type: ignore[misc]
                    if content is not None:
                        # A later member of the same path in one layer replaces the earlier one, as in the tree.
                        out[(index, entry.path)] = _read_content(content, entry.size, entry.path, self.stats)
                        self.stats.files_fetched += 1
            for path in paths:
                if (index, path) not in out:
                    log.debug("%s has no content for %s", self._what(index), path)
        return out
