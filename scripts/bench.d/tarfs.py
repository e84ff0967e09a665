"""Benchmark of layer tar handling: read_layer, LayerWriter (plain and gzip), merge; tarfile as a baseline.

Layers are generated on the fly (nothing touches the disk), so the figures are the cost of sconify's code.
Usage: scripts/bench tarfs [--big-mb N] [--small N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import resource
import tarfile
import time
import tracemalloc
from collections.abc import Iterator

from sconify.image.streams import GzipWriter
from sconify.image.tarfs import Entry, LayerWriter, read_layer
from sconify.image.tree import merge

MB = 1 << 20
PATTERN = hashlib.sha256(b"bench").digest() * (MB // 32)


class Generated(io.RawIOBase):
    """A non-seekable stream over generated pieces."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._current:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._current = memoryview(piece)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def big_files(total_mb: int, file_mb: int = 64) -> Iterator[bytes]:
    for index in range(total_mb // file_mb):
        info = tarfile.TarInfo(f"data/{index:04d}.bin")
        info.size = file_mb * MB
        yield info.tobuf(tarfile.PAX_FORMAT)
        for _ in range(file_mb):
            yield PATTERN
    yield bytes(1024)


def small_files(count: int, size: int = 1024) -> Iterator[bytes]:
    body = b"x" * size + bytes(-size % 512)
    for index in range(count):
        info = tarfile.TarInfo(f"usr/share/doc/pkg{index // 100:04d}/file{index % 100:02d}.txt")
        info.size = size
        info.mtime = 1700000000
        info.uname = info.gname = "root"
        yield info.tobuf(tarfile.PAX_FORMAT) + body
    yield bytes(1024)


class Null:
    def write(self, data: bytes) -> int:
        return len(data)


def timed(label: str, work: int, unit: str, run: object, repeat: int = 3) -> None:
    """Best of ``repeat`` runs (the first also warms the allocator up)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    print(f"{label:<52} {best:8.3f} s  {work / best:12,.0f} {unit}/s")


def drain_read_layer(pieces: Iterator[bytes]) -> int:
    total = 0
    for _, content in read_layer(Generated(pieces)):
        if content is not None:
            # Keep each chunk until the next arrives, as a copy loop does: dropping a 1 MiB chunk before
            # asking for the next lets glibc hand its pages back and fault them in again (3x slower).
            while chunk := content.read(MB):
                total += len(chunk)
    return total


def drain_tarfile(pieces: Iterator[bytes]) -> int:
    total = 0
    with tarfile.open(fileobj=Generated(pieces), mode="r|") as tar:
        for member in tar:
            handle = tar.extractfile(member)
            if handle is not None:
                while chunk := handle.read(MB):
                    total += len(chunk)
    return total


def rewrite(pieces: Iterator[bytes], gzip: bool = False) -> None:
    sink = GzipWriter(Null()) if gzip else Null()  # type: ignore[arg-type]
    with LayerWriter(sink) as writer:  # type: ignore[arg-type]
        for entry, content in read_layer(Generated(pieces)):
            writer.add(entry, content)
    if gzip:
        sink.close()  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big-mb", type=int, default=1024, help="MiB of content in 64 MiB files")
    parser.add_argument("--small", type=int, default=100_000, help="number of 1 KiB files")
    args = parser.parse_args()
    mb, small = args.big_mb, args.small

    print(f"# big files: {mb} MiB in 64 MiB files; small files: {small:,} x 1 KiB")
    timed("tarfile r| (baseline), big files", mb, "MiB", lambda: drain_tarfile(big_files(mb)))
    timed("read_layer, big files", mb, "MiB", lambda: drain_read_layer(big_files(mb)))
    timed("read_layer + LayerWriter, big files", mb, "MiB", lambda: rewrite(big_files(mb)))
    timed("read_layer + LayerWriter + gzip (ISA-L), big files", mb, "MiB", lambda: rewrite(big_files(mb), True))
    tar = b"".join(small_files(small))  # made once, so that making headers is not measured

    def pieces() -> Iterator[bytes]:
        view = memoryview(tar)
        for offset in range(0, len(tar), MB):
            yield view[offset : offset + MB]  # type: ignore[misc]

    timed("tarfile r| (baseline), small files", small, "entries", lambda: drain_tarfile(pieces()))
    timed("read_layer, small files", small, "entries", lambda: drain_read_layer(pieces()))
    timed("read_layer + LayerWriter, small files", small, "entries", lambda: rewrite(pieces()))

    layer = [e for e, _ in read_layer(Generated(pieces()), needed=lambda _: False)]
    whiteouts = [Entry.whiteout(e.path) for e in layer[::10]]
    timed("merge, 3 layers (entries, whiteouts, entries)", 2 * len(layer) + len(whiteouts), "entries",
          lambda: merge([layer, whiteouts, layer]))
    tracemalloc.start()
    tree = merge([layer])
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The entries themselves are shared with the layer list; this is the tree's own cost per path.
    print(f"{'merge: tree memory beyond the entries':<52} {size / len(tree):8.0f} bytes per path ({len(tree):,} paths)")
    print(f"{'peak RSS of this process':<52} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:8.0f} MiB")


if __name__ == "__main__":
    main()
