"""LayerWriter: deterministic PAX output, round trips through read_layer, and GNU tar as independent judge."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sconify.errors import IntegrityError
from sconify.image.tarfs import Entry, EntryKind, LayerWriter, decode_name, read_layer, sorted_entries

needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")


def _write(items: list[tuple[Entry, bytes | None]], **options: object) -> bytes:
    out = io.BytesIO()
    with LayerWriter(out, **options) as writer:  # type: ignore[arg-type]
        for entry, content in items:
            writer.add(entry, content)
    return out.getvalue()


def _read(data: bytes) -> list[tuple[Entry, bytes | None]]:
    return [(e, c.read() if c is not None else None) for e, c in read_layer(io.BytesIO(data))]


def _rewrite(data: bytes) -> bytes:
    """Read a tar and write every entry back, streaming the contents."""
    out = io.BytesIO()
    with LayerWriter(out) as writer:
        for entry, content in read_layer(io.BytesIO(data)):
            writer.add(entry, content)
    return out.getvalue()


LATIN1 = decode_name(b"caf\xe9")
# A valid VFS capability (revision 2, effective) granting cap_net_raw, as ping has.
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
SAMPLE: list[tuple[Entry, bytes | None]] = [
    (Entry.directory("", mtime=1), None),
    (Entry.directory("bin", mtime=Decimal("1700000000.5")), None),
    (Entry.file("bin/busybox", 5, mode=0o4755, mtime=Decimal("1700000000.123456789"),
                xattrs={"security.capability": CAP_NET_RAW, "user.note": b"\xff\x00"}), b"\x7fELF\n"),
    (Entry.symlink("bin/sh", "busybox"), None),
    (Entry.hardlink("bin/su", "bin/busybox", mode=0o4755), None),
    (Entry.symlink("etc/escape", "../../../etc/shadow"), None),
    (Entry.symlink("etc/abs", "/" + "t" * 150), None),
    (Entry.file("etc/" + LATIN1, 3, uname=LATIN1, gname="g" * 40), b"abc"),
    (Entry.file("srv/" + "x" * 200, 0, uid=2**32 - 2, gid=8**7, pax={"comment": "a\nb"}), None),
    (Entry("dev/null", EntryKind.CHAR, mode=0o666, devmajor=1, devminor=3), None),
    (Entry("dev/big", EntryKind.BLOCK, mode=0o600, devmajor=4095, devminor=2**20 - 1), None),
    (Entry("run/fifo", EntryKind.FIFO, mode=0o600), None),
    (Entry.directory("tmp", mode=0o1777, mtime=-5), None),
    (Entry.file("old", 1, mtime=Decimal("-1.25"), uname="u" * 32), b"o"),
]


def test_round_trip_gives_the_same_entries_and_the_same_bytes() -> None:
    first = _write(SAMPLE)
    assert _read(first) == SAMPLE
    assert _write(SAMPLE) == first  # deterministic
    assert _rewrite(first) == first  # read -> write of our own output is byte-identical
    assert len(first) % 512 == 0 and first.endswith(bytes(1024))


def test_output_is_readable_by_python_tarfile() -> None:
    data = _write(SAMPLE)
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        members = tar.getmembers()
        assert [m.name for m in members][:3] == [".", "bin", "bin/busybox"]
        by_name = {m.name: m for m in members}
        busybox = by_name["bin/busybox"]
        assert busybox.mode == 0o4755 and busybox.size == 5
        assert busybox.pax_headers["mtime"] == "1700000000.123456789"
        assert tar.extractfile(busybox).read() == b"\x7fELF\n"  # type: ignore[union-attr]
        assert by_name["bin/su"].islnk() and by_name["bin/su"].linkname == "bin/busybox"
        assert by_name["etc/abs"].linkname == "/" + "t" * 150
        latin = by_name["etc/" + LATIN1]
        assert latin.uname == LATIN1 and latin.gname == "g" * 40
        big = by_name["srv/" + "x" * 200]
        assert (big.uid, big.gid) == (2**32 - 2, 8**7)
        assert big.pax_headers["comment"] == "a\nb"
        assert by_name["dev/null"].ischr() and (by_name["dev/null"].devmajor, by_name["dev/null"].devminor) == (1, 3)
        assert by_name["run/fifo"].isfifo()
        assert by_name["tmp"].mode == 0o1777


def test_fixed_mtime_and_clamp() -> None:
    fixed = _read(_write(SAMPLE, fixed_mtime=1234))
    assert {e.mtime for e, _ in fixed} == {Decimal(1234)}
    clamp = Decimal("1700000000.2")
    clamped = _read(_write(SAMPLE, mtime_clamp=clamp))
    for (before, _), (after, _) in zip(SAMPLE, clamped, strict=True):
        assert after.mtime == min(before.mtime, clamp)
    with pytest.raises(ValueError):
        LayerWriter(io.BytesIO(), fixed_mtime=1, mtime_clamp=2)


def test_content_length_must_match_the_entry() -> None:
    with pytest.raises(IntegrityError, match="'short'.*ended after 3 bytes"):
        _write([(Entry.file("short", 4), b"abc")])
    with pytest.raises(IntegrityError, match="'long'.*longer than the 2 bytes"):
        _write([(Entry.file("long", 2), io.BytesIO(b"abc"))])  # type: ignore[list-item]
    with pytest.raises(IntegrityError, match="'empty'.*longer than the 0 bytes"):
        _write([(Entry.file("empty", 0), b"x")])
    with pytest.raises(ValueError):
        _write([(Entry.symlink("s", "t"), b"data")])
    with pytest.raises(ValueError):
        _write([(Entry.file("missing", 3), None)])


def test_content_streams_from_a_file_object(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20) + b"tail")
    with big.open("rb") as handle:
        data = _write([(Entry.file("big", big.stat().st_size), handle)])  # type: ignore[list-item]
    (entry, content), = _read(data)
    assert content == big.read_bytes()


def test_sorted_entries_orders_by_path_bytes_with_parents_first() -> None:
    paths = ["a/b/c", "a-b", "B", "a", "", "a/b", "\u00e9", decode_name(b"\xff"), "a/a", "b"]
    entries = [Entry.directory(p) for p in paths]
    got = [e.path for e in sorted_entries(entries)]
    # Component-wise byte order: "a" and its subtree stay together before "a-b"; b"\xc3\xa9" < b"\xff".
    assert got == ["", "B", "a", "a/a", "a/b", "a/b/c", "a-b", "b", "\u00e9", decode_name(b"\xff")]


# -- property: any valid entries survive write -> read unchanged, and writing is a pure function ------------

_component = (
    st.binary(min_size=1, max_size=60)
    .filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..") and not b.startswith(b".wh."))
    .map(decode_name)
)
_paths = st.lists(_component, min_size=1, max_size=4).map("/".join)
_names = st.binary(max_size=40).filter(lambda b: b"\0" not in b).map(decode_name)
_mtimes = st.builds(
    lambda whole, frac: Decimal(f"{whole}.{frac}") if frac else Decimal(whole),
    st.integers(-(2**40), 2**40),
    st.one_of(st.just(""), st.from_regex(r"[0-9]{1,9}", fullmatch=True)),
)
_xattr_names = st.text(min_size=1, max_size=20).filter(lambda s: "=" not in s and "\0" not in s)
_common = {
    "mode": st.integers(0, 0o7777),
    "uid": st.integers(0, 2**32),
    "gid": st.integers(0, 2**32),
    "uname": _names,
    "gname": _names,
    "mtime": _mtimes,
    "xattrs": st.dictionaries(_xattr_names, st.binary(max_size=50), max_size=3),
    "pax": st.dictionaries(st.sampled_from(["comment", "SCHILY.fflags", "LIBARCHIVE.creationtime"]),
                           st.text(min_size=1, max_size=30), max_size=2),
}


@st.composite
def _items(draw: st.DrawFn) -> tuple[Entry, bytes | None]:
    kind = draw(st.sampled_from(list(EntryKind)))
    common = {key: draw(strategy) for key, strategy in _common.items()}
    path = draw(_paths)
    if kind is EntryKind.REGULAR:
        content = draw(st.binary(max_size=1500))
        return Entry(path, kind, size=len(content), **common), content or None  # empty files have no content
    extra: dict[str, object] = {}
    if kind is EntryKind.SYMLINK:
        extra["linkname"] = draw(st.text(min_size=1, max_size=150).filter(lambda s: "\0" not in s))
    elif kind is EntryKind.HARDLINK:
        extra["linkname"] = draw(_paths)
    elif kind in (EntryKind.CHAR, EntryKind.BLOCK):
        extra["devmajor"] = draw(st.integers(0, 2**22))
        extra["devminor"] = draw(st.integers(0, 2**22))
    return Entry(path, kind, **extra, **common), None  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_items(), max_size=6))
def test_property_write_read_round_trip(items: list[tuple[Entry, bytes | None]]) -> None:
    data = _write(items)
    assert _read(data) == items
    assert _rewrite(data) == data


# -- GNU tar as the judge ----------------------------------------------------------------------------------


@needs_tar
@pytest.mark.skipif(os.geteuid() != 0, reason="restoring owners and device nodes needs root")
def test_gnu_tar_extracts_what_layer_writer_wrote(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    layer.write_bytes(_write(SAMPLE))
    out = tmp_path / "out"
    out.mkdir()
    listing = subprocess.run(["tar", "-tvf", str(layer)], capture_output=True, check=True)
    assert listing.stderr == b""
    extraction = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--same-owner", "-xpf", str(layer),
         "-C", str(out)],
        check=True, capture_output=True,
    )
    complaints = [line for line in extraction.stderr.splitlines() if b"implausibly old time stamp" not in line]
    assert complaints == []  # the negative mtimes of SAMPLE are only worth a warning
    busybox = out / "bin/busybox"
    st_busybox = busybox.lstat()
    assert busybox.read_bytes() == b"\x7fELF\n"
    assert stat.S_IMODE(st_busybox.st_mode) == 0o4755
    assert st_busybox.st_mtime_ns == 1700000000_123456789
    assert os.getxattr(busybox, "security.capability") == CAP_NET_RAW
    assert os.getxattr(busybox, "user.note") == b"\xff\x00"
    assert (out / "bin/su").lstat().st_ino == st_busybox.st_ino
    assert os.readlink(out / "bin/sh") == "busybox"
    assert os.readlink(out / "etc/escape") == "../../../etc/shadow"
    assert (out / os.fsencode("etc/" + LATIN1).decode("utf-8", "surrogateescape")).read_bytes() == b"abc"
    big = (out / "srv" / ("x" * 200)).lstat()
    assert (big.st_uid, big.st_gid) == (2**32 - 2, 8**7)
    null = (out / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISFIFO((out / "run/fifo").lstat().st_mode)
    assert stat.S_IMODE((out / "tmp").lstat().st_mode) == 0o1777


def _gnu_tar_tree(root: Path, mtime_ns: int) -> Path:
    src = root / "src"
    (src / "d" / ("deep" * 30)).mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"content\n")
    os.chmod(src / "d" / "f", 0o2751)
    os.setxattr(src / "d" / "f", "user.note", b"\xffnote")
    os.link(src / "d" / "f", src / "d" / "g")
    (src / "d" / "l").symlink_to("/bin/../etc")
    os.mkfifo(src / "d" / "p")
    (src / "d" / ("deep" * 30) / os.fsdecode(b"\xe9t\xe9")).write_bytes(b"x" * 10000)
    for path in sorted(src.rglob("*"), reverse=True):
        os.utime(path, ns=(1, mtime_ns), follow_symlinks=False)
    return src


@needs_tar
@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_rewriting_a_gnu_tar_layer_keeps_everything(tmp_path: Path, fmt: str) -> None:
    # The GNU format keeps whole seconds only, so that --compare below can pass.
    src = _gnu_tar_tree(tmp_path, 1600000000_987654321 if fmt == "posix" else 1600000000_000000000)
    layer = tmp_path / "layer.tar"
    xattrs = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []
    subprocess.run(["tar", f"--format={fmt}", *xattrs, "--sort=name", "-C", str(src), "-cf", str(layer), "."],
                   check=True, capture_output=True)
    original = layer.read_bytes()
    rewritten = _rewrite(original)
    assert _read(rewritten) == _read(original)  # the same entries and metadata, equivalent tar
    assert _rewrite(rewritten) == rewritten  # and stable from then on

    # GNU tar itself finds no difference between the rewritten layer and the files it came from.
    (tmp_path / "re.tar").write_bytes(rewritten)
    compare = subprocess.run(["tar", *xattrs, "--compare", "-f", str(tmp_path / "re.tar"), "-C", str(src)],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_content_that_says_it_is_incompressible_goes_to_the_sinks_raw_path() -> None:
    class Sink:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def write(self, data: bytes) -> int:
            self.calls.append(("write", len(data)))
            return len(data)

        def write_incompressible(self, data: bytes) -> int:
            self.calls.append(("raw", len(data)))
            return len(data)

    class Cipher(io.BytesIO):
        incompressible = True

    sink = Sink()
    w = LayerWriter(sink)
    w.add(Entry.file("a", 100000, mtime=0), Cipher(b"c" * 100000))
    w.add(Entry.file("b", 100000, mtime=0), io.BytesIO(b"p" * 100000))
    w.add(Entry.file("c", 100, mtime=0), Cipher(b"s" * 100))  # too short to be worth a flush: compressed
    w.close()
    assert [n for kind, n in sink.calls if kind == "raw"] == [100000]
    assert sum(n for _, n in sink.calls) == w.bytes_written


def test_small_incompressible_pieces_are_batched_for_a_sink_that_does_not_separate_them() -> None:
    """An uncompressed layer's writer (TarWriter) stores ciphertext like anything else: the ciphertext of many
    small files goes out in a few large writes, not two hand-overs per file, and the bytes are the same."""
    from sconify.image.streams import TarWriter

    class Cipher(io.BytesIO):
        incompressible = True

    class Counting(io.BytesIO):
        writes = 0

        def write(self, data: bytes) -> int:  # type: ignore[override]
            Counting.writes += 1
            return super().write(data)

    outs = []
    for sink_class in ("tar", "plain"):
        target = Counting()
        Counting.writes = 0
        sink = TarWriter(target) if sink_class == "tar" else target
        w = LayerWriter(sink)  # type: ignore[arg-type]
        for i in range(500):
            w.add(Entry.file(f"f{i:03d}", 20000, mtime=0), Cipher(os.urandom(20000) if i % 2 else bytes(20000)))
        w.close()
        if sink_class == "tar":
            sink.close()  # type: ignore[union-attr]
            assert Counting.writes < 30, Counting.writes  # about 10 MB in 1 MiB writes
        outs.append(target.getvalue())
    assert len(outs[0]) == len(outs[1]) > 500 * 20000
    names = [e.path for e, _ in read_layer(io.BytesIO(outs[0]))]
    assert names == [f"f{i:03d}" for i in range(500)]
