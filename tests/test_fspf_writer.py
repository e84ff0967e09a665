"""The streaming writer as the converter uses it: layer entries in, a protected layer out.

Also: the same key and input give the same bytes, nonces never repeat for different data under one
key, misuse by the caller is refused, and memory does not grow with file size.
"""

from __future__ import annotations

import io
import os
import tracemalloc
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sconify.errors import ConversionError, UsageError
from sconify.fspf import DirectoryVolume, RegionTable, VolumeKey, VolumeResult, VolumeWriter, protect_directory
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, extract, read_layer

CHUNK = 4096
MTIME = Decimal("1700000000.5")


def _source_entries() -> list[tuple[Entry, bytes | None]]:
    big = os.urandom(5 * CHUNK + 3)
    return [
        (Entry.directory("app", mtime=MTIME), None),
        (Entry.file("app/main.py", 23, mtime=MTIME), b"print('hello, enclave')\n"[:23]),
        (Entry.file("app/big.bin", len(big), mode=0o600, uid=1000, gid=1000, mtime=MTIME), big),
        (Entry.file("app/empty", 0, mtime=MTIME), None),
        # a hard link's header carries its file's attributes; it sorts after its file, as in a sorted walk
        (Entry.hardlink("app/big.bin.link", "app/big.bin", mode=0o600, uid=1000, gid=1000, mtime=MTIME), None),
        (Entry.symlink("app/current", "main.py", mtime=MTIME), None),
        (Entry.directory("usr", mtime=MTIME), None),
        (Entry.directory("usr/lib", mtime=MTIME), None),
        (Entry.file("usr/lib/libc.so", 3 * CHUNK, mtime=MTIME), os.urandom(3 * CHUNK)),
        (Entry("usr/lib/pipe", EntryKind.FIFO, mtime=MTIME), None),
        (Entry.directory("etc", mtime=MTIME), None),
        (Entry.file("etc/hostname", 9, mtime=MTIME), b"enclave1\n"),
    ]


def _layer(entries: list[tuple[Entry, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with LayerWriter(out) as tar:
        for entry, content in entries:
            tar.add(entry, content)
    return out.getvalue()


def _protect_layer(layer: bytes, writer: VolumeWriter) -> tuple[bytes, VolumeResult]:
    """What the converter does: read a layer, protect every entry, write the new layer plus the metadata."""
    out = io.BytesIO()
    with LayerWriter(out) as tar:
        for entry, content in read_layer(io.BytesIO(layer)):
            protected = writer.protect(entry, content)
            tar.add(protected.entry, protected.content)
        result = writer.finish()
        for entry, content in result.entries():
            tar.add(entry, content)
    return out.getvalue(), result


REGIONS = RegionTable.of(["encrypted:/app", "authenticated:/usr/lib"])


def test_a_protected_layer_extracts_to_a_volume_that_verifies_and_decrypts(tmp_path: Path) -> None:
    entries = _source_entries()
    key = VolumeKey.generate()
    protected, result = _protect_layer(_layer(entries), VolumeWriter(REGIONS, key, chunk_size=CHUNK))
    assert (result.files, result.total_bytes) == (4, 23 + 5 * CHUNK + 3 + 3 * CHUNK)
    (tmp_path / "vol").mkdir()
    extract(io.BytesIO(protected), tmp_path / "vol", owners=True)
    with DirectoryVolume(tmp_path / "vol", key, result.tag) as volume:
        assert volume.verify().ok
        for entry, content in entries:
            if entry.kind is EntryKind.REGULAR and entry.path.startswith(("app", "usr/lib")):
                assert volume.read_file("/" + entry.path) == (content or b"")
        assert volume.read_file("/app/big.bin.link") == entries[2][1]
        record = volume.volume.record("/app/big.bin")
        assert (record.uid, record.gid, record.st_mode & 0o777) == (1000, 1000, 0o600)
        assert record.mtime_ns == 1_700_000_000_500_000_000
        volume.decrypt_to(tmp_path / "plain")
    assert (tmp_path / "vol/app/big.bin").read_bytes() != entries[2][1]
    assert (tmp_path / "vol/usr/lib/libc.so").read_bytes() == entries[8][1]
    assert (tmp_path / "vol/etc/hostname").read_bytes() == b"enclave1\n"
    assert (tmp_path / "plain/app/big.bin").read_bytes() == entries[2][1]
    assert os.readlink(tmp_path / "plain/app/current") == "main.py"
    assert (tmp_path / "plain/app/big.bin.link").stat().st_ino == (tmp_path / "plain/app/big.bin").stat().st_ino


def test_the_streaming_writer_and_the_directory_protector_agree(tmp_path: Path) -> None:
    layer = _layer(_source_entries())
    key = VolumeKey.generate()
    _, streamed = _protect_layer(layer, VolumeWriter(REGIONS, key, chunk_size=CHUNK))
    (tmp_path / "src").mkdir()
    extract(io.BytesIO(layer), tmp_path / "src", owners=True)
    from_directory = protect_directory(tmp_path / "src", tmp_path / "out", REGIONS, key, chunk_size=CHUNK)
    assert from_directory.tag == streamed.tag
    assert from_directory.metadata == streamed.metadata


def test_the_same_key_and_tree_give_byte_identical_output(tmp_path: Path) -> None:
    layer = _layer(_source_entries())
    key = VolumeKey.generate()
    assert _protect_layer(layer, VolumeWriter(REGIONS, key)) == _protect_layer(layer, VolumeWriter(REGIONS, key))
    (tmp_path / "src").mkdir()
    extract(io.BytesIO(layer), tmp_path / "src", owners=True)
    first = protect_directory(tmp_path / "src", tmp_path / "one", REGIONS, key, workers=1)
    second = protect_directory(tmp_path / "src", tmp_path / "two", REGIONS, key, workers=2)
    assert first.tag == second.tag
    compared = 0
    for path in (tmp_path / "one").rglob("*"):
        twin = tmp_path / "two" / path.relative_to(tmp_path / "one")
        if path.is_file() and not path.is_symlink():
            assert path.read_bytes() == twin.read_bytes(), path
            compared += 1
    assert compared == 7
    # without a key, every run draws a new one
    a, b = VolumeWriter(REGIONS), VolumeWriter(REGIONS)
    assert a.key != b.key
    assert _protect_layer(layer, a)[0] != _protect_layer(layer, b)[0]


def _chunk_entries(metadata_dir: Path, key: VolumeKey, tag: bytes, path: str) -> list[bytes]:
    with DirectoryVolume(metadata_dir, key, tag) as volume:
        record = volume.volume.record(path)
    return [record.chunks[i : i + 28] for i in range(0, len(record.chunks), 28)]


def test_nonces_follow_the_data_when_a_key_is_reused(tmp_path: Path) -> None:
    key = VolumeKey.generate()
    regions = RegionTable.of(["encrypted:/"])
    src = tmp_path / "src"
    src.mkdir()
    same = os.urandom(CHUNK)
    (src / "f").write_bytes(same + same + os.urandom(CHUNK))  # two equal chunks
    (src / "g").write_bytes(same)  # the same chunk in another file
    v1 = protect_directory(src, tmp_path / "v1", regions, key, chunk_size=CHUNK)
    with open(src / "f", "r+b") as handle:  # change chunk 2 only
        handle.seek(2 * CHUNK)
        handle.write(os.urandom(CHUNK))
    v2 = protect_directory(src, tmp_path / "v2", regions, key, chunk_size=CHUNK)

    one = _chunk_entries(tmp_path / "v1", key, v1.tag, "/f")
    two = _chunk_entries(tmp_path / "v2", key, v2.tag, "/f")
    assert one[0] == two[0] and one[1] == two[1]  # unchanged data: same nonce, same tag
    assert one[2][:12] != two[2][:12]  # changed data under the same key: a new nonce
    assert one[0][:12] != one[1][:12]  # equal chunks at different indices: different nonces
    stored = (tmp_path / "v1" / "f").read_bytes()
    assert stored[:CHUNK] != stored[CHUNK : 2 * CHUNK]
    assert (tmp_path / "v1" / "g").read_bytes() != stored[:CHUNK]  # other path, other key
    assert (tmp_path / "v2" / "f").read_bytes()[: 2 * CHUNK] == stored[: 2 * CHUNK]
    nonces = [e[:12] for e in one + two[2:] + _chunk_entries(tmp_path / "v1", key, v1.tag, "/g")]
    assert len(set(nonces)) == len(nonces)


def test_content_must_be_read_before_the_next_entry() -> None:
    writer = VolumeWriter(REGIONS)
    writer.protect(Entry.file("app/a", 5), io.BytesIO(b"hello"))
    with pytest.raises(RuntimeError, match="/app/a"):
        writer.protect(Entry.file("app/b", 1), io.BytesIO(b"x"))


def test_content_shorter_than_its_entry_is_refused() -> None:
    writer = VolumeWriter(REGIONS)
    out = writer.protect(Entry.file("app/a", 10), io.BytesIO(b"hello"))
    assert out.content is not None
    with pytest.raises(ConversionError, match="ended after 5 bytes"):
        out.content.read()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry.file("app/a", 0), Entry.file("app/a", 0)], "two entries"),
        ([Entry.file("etc/a", 0), Entry.hardlink("app/b", "etc/a")], "different protection"),
        ([Entry.hardlink("app/b", "app/a")], "comes before it"),
        ([Entry.directory("app/d"), Entry.hardlink("app/b", "app/d")], "regular file"),
        ([Entry.file(".sconify/fspf/volume.fspf", 0)], "metadata path"),
        ([Entry.file(".sconify", 0)], "needs a directory"),
    ],
)
def test_inputs_the_volume_cannot_hold_are_refused(entries: list[Entry], message: str) -> None:
    writer = VolumeWriter(REGIONS)
    with pytest.raises(ConversionError, match=message):
        for entry in entries:
            out = writer.protect(entry, io.BytesIO(b"") if entry.kind is EntryKind.REGULAR else None)
            if out.content is not None:
                out.content.read()


def test_not_protected_entries_pass_through_untouched() -> None:
    writer = VolumeWriter(REGIONS)
    stream = io.BytesIO(b"plain")
    out = writer.protect(Entry.file("etc/a", 5), stream)
    assert out.content is stream and out.protection.label == "not-protected"
    result = writer.finish()
    assert result.files == 0
    assert [e.path for e, _ in result.entries()] == [".sconify", ".sconify/fspf", ".sconify/fspf/volume.fspf"]


def test_whiteouts_and_opaque_markers_pass_through_unprotected() -> None:
    writer = VolumeWriter(REGIONS)
    for entry in (Entry.whiteout("app/old.py"), Entry.opaque("app/cache")):
        out = writer.protect(entry, None)
        assert out.entry is entry and out.content is None and out.protection.label == "not-protected"
    assert writer.finish().files == 0


@pytest.mark.parametrize("size", [0, 1000, 3 * 1024 * 1024])
def test_a_chunk_size_that_is_not_a_power_of_two_in_range_is_refused(size: int) -> None:
    with pytest.raises(UsageError, match="power of two"):
        VolumeWriter(REGIONS, chunk_size=size)


class _Zeros:
    """A 128 MiB content stream that never exists in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.left, 256 * 1024)
        view[:n] = bytes(n)
        self.left -= n
        return n


def test_memory_does_not_grow_with_the_file_size() -> None:
    size = 128 * 1024 * 1024
    writer = VolumeWriter(REGIONS)
    tracemalloc.start()
    try:
        out = writer.protect(Entry.file("app/huge", size), _Zeros(size))  # type: ignore[arg-type]
        assert out.content is not None
        total = 0
        while piece := out.content.read(1024 * 1024):
            total += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    # one 1 MiB batch in and out, one read buffer, and 28 bytes per 64 KiB chunk of metadata (56 KiB)
    assert peak < 6 * 1024 * 1024, peak


def test_a_layer_without_directory_entries_verifies_after_extraction(tmp_path: Path) -> None:
    """Parents that a layer leaves implicit exist on disk without a record; they are not 'added'."""
    key = VolumeKey.generate()
    layer = _layer([(Entry.file("app/deep/er/main.py", 5, mtime=MTIME), b"hello")])
    protected, result = _protect_layer(layer, VolumeWriter(REGIONS, key, chunk_size=CHUNK))
    (tmp_path / "vol").mkdir()
    extract(io.BytesIO(protected), tmp_path / "vol")
    with DirectoryVolume(tmp_path / "vol", key, result.tag) as volume:
        assert volume.verify().ok
        (tmp_path / "vol/app/deep/added").mkdir()
        assert [(p.path, p.kind.value) for p in volume.verify().problems] == [(b"/app/deep/added", "unexpected")]
        (tmp_path / "vol/app/deep/added").rmdir()
        volume.decrypt_to(tmp_path / "plain")
    assert (tmp_path / "plain/app/deep/er/main.py").read_bytes() == b"hello"


@given(st.lists(st.sampled_from(["a", "b.c", ".", "..", "", ".x", "x.", "..y", "\udcff", "é", "\0"]),
                max_size=6).map("/".join))
@settings(max_examples=500, deadline=None)
def test_the_volume_path_shortcut_agrees_with_full_normalisation(path: str) -> None:
    from sconify.errors import UnsafeArchiveError
    from sconify.fspf.format import normalize_path
    from sconify.fspf.writer import volume_path
    from sconify.image.tarfs import encode_name

    for candidate in (path, "/" + path, path + "/"):
        try:
            expected: bytes | type[Exception] = normalize_path(encode_name(candidate))
        except UnsafeArchiveError:
            expected = UnsafeArchiveError
        try:
            got: bytes | type[Exception] = volume_path(candidate)
        except UnsafeArchiveError:
            got = UnsafeArchiveError
        assert got == expected, candidate
