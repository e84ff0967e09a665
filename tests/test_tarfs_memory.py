"""Bounded memory (promise 6): a 300 MB layer streams through read_layer and LayerWriter in constant memory."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator

import psutil

from sconify.image.tarfs import LayerWriter, read_layer

MB = 1 << 20
# One 200 MiB file (anything holding a whole file would blow the bound) and ten of 10 MiB: 300 MiB.
SIZES = [200 * MB] + [10 * MB] * 10
PATTERN = hashlib.sha256(b"sconify").digest() * (MB // 32)  # 1 MiB of repeated bytes


def _tar_pieces() -> Iterator[bytes]:
    """A PAX tar made on the fly by Python's tarfile headers; never more than 1 MiB at a time."""
    for index, size in enumerate(SIZES):
        info = tarfile.TarInfo(f"data/{index:03d}/" + "long-name-" * 12 + ".bin")
        info.size = size + 7
        info.pax_headers = {"mtime": f"1700000000.{index:09d}"}
        yield info.tobuf(tarfile.PAX_FORMAT)
        for _ in range(size // MB):
            yield PATTERN
        yield b"7 bytes" + bytes(-(size + 7) % 512)
        small = tarfile.TarInfo(f"small/{index}")
        small.size = 100
        yield small.tobuf(tarfile.PAX_FORMAT) + b"s" * 100 + bytes(412)
    yield bytes(1024)


class _Generated(io.RawIOBase):
    """A non-seekable stream over generated pieces, like a network download."""

    def __init__(self) -> None:
        self._pieces = _tar_pieces()
        self._current = b""
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._current:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._current = piece
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        self.produced += n
        return n


class _Sink:
    def __init__(self, check: callable) -> None:  # type: ignore[valid-type]
        self.size = 0
        self._check = check
        self._since = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        self._since += len(data)
        if self._since >= 8 * MB:
            self._since = 0
            self._check()
        return len(data)


def test_300_mb_layer_streams_in_bounded_memory() -> None:
    process = psutil.Process()
    source = _Generated()
    baseline = process.memory_info().rss
    peak = baseline

    def check() -> None:
        nonlocal peak
        peak = max(peak, process.memory_info().rss)

    sink = _Sink(check)
    entries = 0
    content_bytes = 0
    with LayerWriter(sink) as writer:  # type: ignore[arg-type]
        for entry, content in read_layer(source):  # type: ignore[arg-type]
            entries += 1
            content_bytes += entry.size
            writer.add(entry, content)
            check()
    check()
    assert entries == 2 * len(SIZES)
    assert content_bytes == sum(SIZES) + len(SIZES) * (7 + 100)
    assert sink.size > sum(SIZES)
    assert source.produced > sum(SIZES)
    growth = peak - baseline
    assert growth < 50 * MB, f"peak RSS grew by {growth / MB:.1f} MiB while streaming 300 MB"
