"""read_layer on tars made by Python's tarfile and by GNU tar, in PAX, GNU and ustar formats."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from sconify.errors import IntegrityError
from sconify.image.model import Descriptor, Layer
from sconify.image.streams import VerifyingReader
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, encode_name, read_layer

LONG_DIR = "d" * 70
LONG_NAME = f"{LONG_DIR}/{'n' * 90}"  # 161 bytes: needs a PAX path record or a GNU long name
LATIN1 = b"caf\xe9"  # not UTF-8: must come back byte for byte


def _entries(data: bytes | io.RawIOBase, **kw: object) -> list[tuple[Entry, bytes | None]]:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    return [(e, c.read() if c is not None else None) for e, c in read_layer(stream, **kw)]  # type: ignore[arg-type]


def _by_path(items: list[tuple[Entry, bytes | None]]) -> dict[str, tuple[Entry, bytes | None]]:
    return {e.path: (e, c) for e, c in items}


# -- Python's tarfile ------------------------------------------------------------------------------------------


def _tarfile_archive(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:

        def add(name: str, type_: bytes, data: bytes = b"", **attrs: object) -> None:
            info = tarfile.TarInfo(name)
            info.type = type_
            info.size = len(data)
            info.mtime = 1700000000
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("./", tarfile.DIRTYPE, mode=0o755)
        add("bin", tarfile.DIRTYPE, mode=0o755)
        add("bin/busybox", tarfile.REGTYPE, b"\x7fELF" + bytes(3000), mode=0o4755, uid=0, gid=0)
        add("bin/sh", tarfile.SYMTYPE, linkname="busybox", mode=0o777)
        add("bin/su", tarfile.LNKTYPE, linkname="bin/busybox", mode=0o4755)
        add(LONG_NAME, tarfile.REGTYPE, b"long", mode=0o640)
        add("etc/" + LATIN1.decode("utf-8", "surrogateescape"), tarfile.REGTYPE, b"latin", mode=0o600)
        add("etc/passwd-link", tarfile.SYMTYPE, linkname="/etc/" + "p" * 120)
        add("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        add("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0)
        add("run/fifo", tarfile.FIFOTYPE, mode=0o600)
        add("tmp", tarfile.DIRTYPE, mode=0o1777)
        add("srv", tarfile.DIRTYPE, mode=0o2775, uid=3000000, gid=4000000, uname="service-user", gname="svc")
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_reads_every_kind_from_python_tarfile(fmt: int) -> None:
    raw = _tarfile_archive(fmt)
    assert (b"././@LongLink" in raw) == (fmt == tarfile.GNU_FORMAT)
    items = _entries(raw)
    got = _by_path(items)
    assert [e.path for e, _ in items][:3] == ["", "bin", "bin/busybox"]
    root, _ = got[""]
    assert root.kind is EntryKind.DIRECTORY
    busybox, data = got["bin/busybox"]
    assert (busybox.kind, busybox.mode, busybox.size) == (EntryKind.REGULAR, 0o4755, 3004)
    assert data == b"\x7fELF" + bytes(3000)
    assert busybox.mtime == Decimal(1700000000)
    sh, data = got["bin/sh"]
    assert (sh.kind, sh.linkname, data) == (EntryKind.SYMLINK, "busybox", None)
    su, _ = got["bin/su"]
    assert (su.kind, su.linkname, su.size) == (EntryKind.HARDLINK, "bin/busybox", 0)
    assert got[LONG_NAME][1] == b"long"
    latin_path = "etc/" + LATIN1.decode("utf-8", "surrogateescape")
    assert got[latin_path][0].path_bytes == b"etc/" + LATIN1
    assert got[latin_path][1] == b"latin"
    assert got["etc/passwd-link"][0].linkname == "/etc/" + "p" * 120
    null, _ = got["dev/null"]
    assert (null.kind, null.devmajor, null.devminor, null.mode) == (EntryKind.CHAR, 1, 3, 0o666)
    sda, _ = got["dev/sda"]
    assert (sda.kind, sda.devmajor, sda.devminor) == (EntryKind.BLOCK, 8, 0)
    assert got["run/fifo"][0].kind is EntryKind.FIFO
    assert got["tmp"][0].mode == 0o1777
    srv, _ = got["srv"]
    assert (srv.mode, srv.uid, srv.gid, srv.uname, srv.gname) == (0o2775, 3000000, 4000000, "service-user", "svc")


def test_pax_records_subsecond_mtime_and_xattrs_from_tarfile() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("usr/bin/ping")
        info.size = 4
        info.pax_headers = {
            "mtime": "1700000000.123456789",
            "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
            "SCHILY.xattr.user.empty": "",
            "comment": "built by a test",
            "atime": "1700000001.5",
        }
        tar.addfile(info, io.BytesIO(b"ping"))
    (entry, data), = _entries(out.getvalue())
    assert entry.mtime == Decimal("1700000000.123456789")
    assert str(entry.mtime) == "1700000000.123456789"
    assert entry.xattrs == {"security.capability": b"\x01\x00\x00\x02", "user.empty": b""}
    assert entry.pax == {"comment": "built by a test"}  # atime is dropped, other records are kept
    assert data == b"ping"


def test_global_pax_headers_are_ignored() -> None:
    # git archive writes a global header with a comment; Docker and containerd ignore global headers.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "abc"}) as tar:
        info = tarfile.TarInfo("a")
        tar.addfile(info)
    (entry, _), = _entries(out.getvalue())
    assert entry.path == "a" and entry.pax == {}


def test_ustar_prefix_and_v7_directory_names() -> None:
    out = io.BytesIO()
    name = "p" * 120 + "/file"  # fits ustar by splitting into prefix and name
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (entry, data), = _entries(out.getvalue())
    assert (entry.path, data) == (name, b"x")
    assert out.getvalue()[345:345 + 120] == b"p" * 120  # it really used the prefix field

    # An old v7 archive marks a directory with type '\0' and a trailing slash.
    v7 = io.BytesIO()
    with tarfile.open(fileobj=v7, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("olddir/")
        info.type = tarfile.AREGTYPE
        tar.addfile(info)
    (entry, _), = _entries(v7.getvalue())
    assert (entry.path, entry.kind) == ("olddir", EntryKind.DIRECTORY)


def test_gnu_base256_numbers_and_negative_mtime() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("old")
        info.mtime = -86400
        info.uid = 8**8 + 5
        tar.addfile(info)
    (entry, _), = _entries(out.getvalue())
    assert entry.mtime == -86400 and entry.uid == 8**8 + 5


def test_content_streams_in_pieces_and_expires() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("one", "two"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    walk = read_layer(io.BytesIO(out.getvalue()))
    entry, content = next(walk)
    assert content is not None and content.remaining == len(data)
    first = content.read(1000)
    assert first == data[:1000] and content.remaining == len(data) - 1000
    entry, second = next(walk)  # the rest of "one" is skipped, not read into memory by us
    assert entry.path == "two"
    with pytest.raises(ValueError, match="after the layer reader moved on"):
        content.read(10)
    assert second is not None
    pieces = []
    while piece := second.read(70000):
        assert len(piece) <= 70000
        pieces.append(piece)
    assert b"".join(pieces) == data
    assert list(walk) == []


def test_needed_predicate_skips_content() -> None:
    data = _tarfile_archive(tarfile.PAX_FORMAT)
    asked: list[str] = []

    def needed(entry: Entry) -> bool:
        asked.append(entry.path)
        return entry.path == "bin/busybox"

    got = {e.path: c for e, c in read_layer(io.BytesIO(data), needed=needed)}
    assert got["bin/busybox"] is not None
    assert got[LONG_NAME] is None
    assert set(asked) == {"bin/busybox", LONG_NAME, "etc/" + LATIN1.decode("utf-8", "surrogateescape")}


def test_reads_to_the_end_so_that_the_digest_is_checked() -> None:
    raw = _tarfile_archive(tarfile.PAX_FORMAT)  # tarfile pads to 10 KiB records: bytes after the end marker
    good = "sha256:" + hashlib.sha256(raw).hexdigest()
    stream = VerifyingReader(io.BytesIO(raw), good, len(raw), "a test layer")
    assert len(_entries(stream)) == 13
    assert stream.bytes_read == len(raw)

    bad = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError, match="a test layer has digest"):
        _entries(VerifyingReader(io.BytesIO(raw), bad, len(raw), "a test layer"))


def test_archive_without_end_marker_and_empty_stream() -> None:
    raw = _tarfile_archive(tarfile.PAX_FORMAT)
    items = _entries(raw)
    # Cut right after the last member: Go's and Python's readers accept that, and so do we.
    last_end = raw.rfind(b"ustar") - 257 + 512
    assert len(_entries(raw[:last_end])) == len(items)
    assert _entries(b"") == []


# -- GNU tar -------------------------------------------------------------------------------------------------

NS = 1700000000_123456789


def _make_tree(root: Path) -> dict[str, os.stat_result]:
    """Files of every kind on disk; returns lstat results by archive path."""
    top = root / "top"
    top.mkdir()
    (top / "file").write_bytes(b"hello\n")
    os.chmod(top / "file", 0o4755)
    os.setxattr(top / "file", "user.comment", b"\x00\xffbinary")
    os.link(top / "file", top / "hard")
    (top / "abs").symlink_to("/etc/passwd")
    (top / "esc").symlink_to("../../etc")
    os.mkfifo(top / "fifo", 0o640)
    os.mkdir(top / LONG_DIR)
    (top / LONG_NAME).write_bytes(b"long\n")
    (top / os.fsdecode(LATIN1)).write_bytes(b"latin\n")
    sticky = top / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    if os.geteuid() == 0:
        os.mknod(top / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    for path in sorted(top.rglob("*"), reverse=True):
        os.utime(path, ns=(NS, NS), follow_symlinks=False)
    os.utime(top, ns=(NS, NS))
    out = {"top": os.lstat(top)}
    for path in top.rglob("*"):
        out[path.relative_to(root).as_posix()] = os.lstat(path)
    return out


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_reads_gnu_tar_archives(tmp_path: Path, fmt: str) -> None:
    on_disk = _make_tree(tmp_path)
    archive = tmp_path / "layer.tar"
    xattrs = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []  # --xattrs would force PAX
    subprocess.run(
        ["tar", f"--format={fmt}", *xattrs, "--sort=name", "--owner=alice:1234", "--group=staff:5678",
         "-C", str(tmp_path), "-cf", str(archive), "top"],
        check=True, capture_output=True,
    )
    raw = archive.read_bytes()
    assert (b"././@LongLink" in raw) == (fmt == "gnu")  # GNU long names, or PAX records
    items = _entries(raw)
    got = _by_path(items)
    assert set(got) == set(on_disk)
    links = {"top/file", "top/hard"}
    assert sum(1 for p in links if got[p][0].kind is EntryKind.HARDLINK) == 1  # GNU tar picks one to store
    for path, st in on_disk.items():
        entry, data = got[path]
        assert entry.uid == 1234 and entry.gid == 5678
        assert (entry.uname, entry.gname) == ("alice", "staff")
        assert entry.mode == stat.S_IMODE(st.st_mode), path
        expected_time = Decimal(NS) / 10**9 if fmt == "posix" else Decimal(NS // 10**9)
        assert entry.mtime == expected_time, path
        if stat.S_ISREG(st.st_mode) and entry.kind is EntryKind.REGULAR:
            assert data == (tmp_path / path).read_bytes()
            assert entry.size == st.st_size
        elif stat.S_ISLNK(st.st_mode):
            assert entry.kind is EntryKind.SYMLINK
            assert entry.linkname == os.readlink(tmp_path / path)
        elif stat.S_ISDIR(st.st_mode):
            assert entry.kind is EntryKind.DIRECTORY
        elif stat.S_ISFIFO(st.st_mode):
            assert entry.kind is EntryKind.FIFO
        elif stat.S_ISCHR(st.st_mode):
            assert (entry.kind, entry.devmajor, entry.devminor) == (EntryKind.CHAR, 1, 3)
    assert encode_name(got["top/" + os.fsdecode(LATIN1)][0].path) == b"top/" + LATIN1
    assert got["top/esc"][0].linkname == "../../etc"  # escaping symlink targets are data, kept as they are
    stored = next(got[p][0] for p in links if got[p][0].kind is EntryKind.REGULAR)
    if fmt == "posix":
        assert stored.xattrs == {"user.comment": b"\x00\xffbinary"}
        assert stored.pax == {}  # GNU tar's atime and ctime are dropped


# -- Go's archive/tar, through umoci (what Docker and containerd write too) ----------------------------------


class _LayoutBlobs:
    """Blobs of an OCI image layout directory."""

    name = "a test layout"

    def __init__(self, layout: Path) -> None:
        self.layout = layout

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return (self.layout / "blobs" / desc.algorithm / desc.hex).open("rb")


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_reads_layers_written_by_go_archive_tar(tmp_path: Path) -> None:
    on_disk = _make_tree(tmp_path)
    layout = tmp_path / "layout"
    for args in (["init", "--layout", str(layout)], ["new", "--image", f"{layout}:t"],
                 ["insert", "--image", f"{layout}:t", str(tmp_path / "top"), "/top"]):
        subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=120)
    index = json.loads((layout / "index.json").read_text())
    blobs = _LayoutBlobs(layout)
    manifest = json.loads(blobs.open_blob(Descriptor.from_json(index["manifests"][0])).read())
    config = json.loads(blobs.open_blob(Descriptor.from_json(manifest["config"])).read())
    layer = Layer(Descriptor.from_json(manifest["layers"][-1]), config["rootfs"]["diff_ids"][-1], blobs)
    with layer.open_tar() as stream:  # gzip, digest and DiffID verified as it streams
        items = _entries(stream)  # type: ignore[arg-type]
    got = {e.path: (e, c) for e, c in items if e.path.startswith("top")}
    assert set(got) == set(on_disk)
    for path, st in on_disk.items():
        entry, data = got[path]
        assert entry.mode == stat.S_IMODE(st.st_mode), path
        assert entry.mtime == NS // 10**9  # Go writes whole seconds unless asked otherwise
        if entry.kind is EntryKind.REGULAR:
            assert data == (tmp_path / path).read_bytes()
        if entry.kind is EntryKind.SYMLINK:
            assert entry.linkname == os.readlink(tmp_path / path)
    assert got["top/file"][0].xattrs == {"user.comment": b"\x00\xffbinary"} or got["top/hard"][0].xattrs
    rewritten = io.BytesIO()
    with LayerWriter(rewritten) as writer:
        for entry, data in items:
            writer.add(entry, data)
    assert _entries(rewritten.getvalue()) == items


class _SeekableCounting(io.RawIOBase):
    """A stream that can skip by seeking, counting the bytes actually read (what an in-place analysis hashes)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        chunk = self._data[self._pos : end]
        self._pos = end
        self.bytes_read += len(chunk)
        return chunk

    def skip(self, n: int) -> int:
        n = min(n, len(self._data) - self._pos)
        self._pos += n
        return n


def test_a_seekable_stream_reads_little_more_than_the_headers_of_large_files() -> None:
    buf = io.BytesIO()
    sizes = [40_000 + 1000 * i for i in range(30)] + [300, 5000, 700] + [2_000_000, 50_000]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate(sizes):
            info = tarfile.TarInfo(f"f{i:02d}")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes([i]) * size))
    stream = _SeekableCounting(buf.getvalue())
    seen = []
    for entry, content in read_layer(stream, needed=lambda e: e.path == "f31"):  # type: ignore[arg-type]
        seen.append((entry.path, entry.size, content.read() if content is not None else None))
    assert [(p, s) for p, s, _ in seen] == [(f"f{i:02d}", size) for i, size in enumerate(sizes)]
    assert seen[31][2] == bytes([31]) * 5000  # a file asked for is read whole
    # Each header after a large file is read with a small block: about 1 KiB per file instead of 16 KiB.
    assert stream.bytes_read < 20_000 + 16_384 * 4 + 1024 * len(sizes), stream.bytes_read


@given(hs.lists(hs.sampled_from(["a", ".wh.", ".wh..wh.", ".wh..wh..opq", "x", ".", "wh", ".w"]), min_size=1,
                max_size=4).map("".join), hs.sampled_from(["", "dir/", "a/b/"]))
@settings(max_examples=300, deadline=None)
def test_the_one_test_for_overlay_markers_agrees_with_the_three_kinds(name: str, parent: str) -> None:
    try:
        entry = Entry.file(parent + name, 0)
    except ValueError:  # a name no entry may have ('.', '.wh..', ...)
        return
    assert entry.is_overlay_marker == (entry.is_whiteout or entry.is_opaque or entry.is_whiteout_meta)


_PIECES = hs.sampled_from(["a", "b.c", ".", "..", "", "/", ".wh.", ".x", "\0", "é", "\udcff"])


@given(hs.lists(_PIECES, max_size=8).map("".join))
@settings(max_examples=1000, deadline=None)
def test_the_shortcuts_for_normal_paths_change_no_answer(text: str) -> None:
    from sconify.errors import UnsafeArchiveError
    from sconify.image.tarfs.entry import _path_problem, encode_name, path_problem
    from sconify.image.tarfs.reader import _LayerReader

    assert path_problem(text) == _path_problem(text)
    reader = _LayerReader(io.BytesIO(b""), "a test layer", 1 << 30, 1 << 20, None)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    expected: str | type[Exception] = (UnsafeArchiveError if "\0" in text or ".." in parts else "/".join(parts))
    try:
        got: str | type[Exception] = reader._normalize(encode_name(text), "name", text)
    except UnsafeArchiveError:
        got = UnsafeArchiveError
    assert got == expected
