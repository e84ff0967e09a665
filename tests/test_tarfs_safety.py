"""Untrusted layers stay in their box (promise 4): each unsafe or malformed archive gets its error class and a
sentence that names the layer and the member."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from sconify.errors import IntegrityError, UnsafeArchiveError, UnsupportedError
from sconify.image.tarfs import Entry, EntryKind, read_layer

LAYER = "layer sha256:feed of test/image"


def _header(name: bytes, size: int = 0, typeflag: bytes = b"0", linkname: bytes = b"", mode: int = 0o644) -> bytes:
    """A ustar header built by hand, independently of the code under test."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\0" % mode
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1700000000
    block[148:156] = b" " * 8
    block[156:157] = typeflag
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _member(name: bytes, data: bytes = b"", **kw: object) -> bytes:
    return _header(name, len(data), **kw) + data + bytes(-len(data) % 512)  # type: ignore[arg-type]


def _pax(records: dict[bytes, bytes]) -> bytes:
    body = b""
    for key, value in records.items():
        rest = b" " + key + b"=" + value + b"\n"
        length = len(rest) + len(str(len(rest)))
        length += len(str(length)) - len(str(len(rest)))
        body += str(length).encode() + rest
    return _member(b"PaxHeader", body, typeflag=b"x")


END = bytes(1024)


def _read_all(data: bytes, **kw: object) -> list[Entry]:
    out = []
    for entry, content in read_layer(io.BytesIO(data), what=LAYER, **kw):  # type: ignore[arg-type]
        if content is not None:
            content.read()
        out.append(entry)
    return out


@pytest.mark.parametrize("name", [b"../evil", b"a/../../evil", b"./../evil", b"a/b/..", b"/../etc/passwd"])
def test_dot_dot_components_are_refused(name: bytes) -> None:
    data = _member(b"ok", b"fine") + _member(name, b"x") + END
    with pytest.raises(UnsafeArchiveError) as err:
        _read_all(data)
    message = str(err.value)
    assert LAYER in message and repr(name.decode()) in message and "'..'" in message


def test_absolute_and_redundant_names_are_read_relative_to_the_root(caplog: pytest.LogCaptureFixture) -> None:
    data = _member(b"/etc/passwd", b"root") + _member(b"/etc/group", b"g") + _member(b"usr//bin/./x") + END
    with caplog.at_level(logging.DEBUG, logger="sconify.image.tarfs"):
        entries = _read_all(data)
    assert [e.path for e in entries] == ["etc/passwd", "etc/group", "usr/bin/x"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/etc/passwd" in warnings[0].getMessage() and LAYER in warnings[0].getMessage()


def test_hard_links_are_normalised_or_refused() -> None:
    absolute = _member(b"etc/passwd", b"root") + _member(b"copy", typeflag=b"1", linkname=b"/etc/passwd") + END
    assert _read_all(absolute)[1].linkname == "etc/passwd"
    for target in (b"../../etc/shadow", b"a/../../x"):
        escaping = _member(b"link", typeflag=b"1", linkname=target) + END
        with pytest.raises(UnsafeArchiveError) as err:
            _read_all(escaping)
        assert "'link'" in str(err.value) and target.decode() in str(err.value) and LAYER in str(err.value)
    with pytest.raises(UnsafeArchiveError, match="image root"):
        _read_all(_member(b"link", typeflag=b"1", linkname=b"/") + END)


def test_symlink_targets_are_data_and_kept() -> None:
    data = (
        _member(b"bin/sh", typeflag=b"2", linkname=b"/bin/busybox")
        + _member(b"x", typeflag=b"2", linkname=b"../../etc")
        + _member(b"y", typeflag=b"2", linkname=b"a//b/./c/")
        + END
    )
    assert [e.linkname for e in _read_all(data)] == ["/bin/busybox", "../../etc", "a//b/./c/"]


def test_nul_in_a_pax_name_is_refused() -> None:
    data = _pax({b"path": b"etc/pass\0wd"}) + _member(b"placeholder", b"x") + END
    with pytest.raises(UnsafeArchiveError, match="NUL") as err:
        _read_all(data)
    assert LAYER in str(err.value)
    link = _pax({b"linkpath": b"a\0b"}) + _member(b"l", typeflag=b"2") + END
    with pytest.raises(UnsafeArchiveError, match="'l'.*NUL"):
        _read_all(link)


def test_absurd_sizes_are_refused_before_reading() -> None:
    # 1 TB declared in a PAX record, with no data behind it: refused from the header alone.
    data = _pax({b"size": b"1000000000000"}) + _header(b"huge") + END
    with pytest.raises(UnsafeArchiveError) as err:
        _read_all(data)
    assert "'huge'" in str(err.value) and "1000000000000" in str(err.value) and LAYER in str(err.value)
    small = _member(b"big-enough", b"x" * 5000) + END
    with pytest.raises(UnsafeArchiveError, match="'big-enough'.*limit of 4096"):
        _read_all(small, max_size=4096)
    assert _read_all(small, max_size=5000)[0].size == 5000
    huge_header = _pax({b"comment": b"c" * 3000}) + _member(b"a") + END
    with pytest.raises(UnsafeArchiveError, match="PAX extended header.*metadata"):
        _read_all(huge_header, max_metadata=1024)


def test_truncated_archives() -> None:
    whole = _member(b"first", b"1" * 100) + _member(b"second", b"2" * 3000) + END
    for cut in (512 + 512 + 1000, 512 + 512 + 100, 512 + 50):
        with pytest.raises(IntegrityError) as err:
            _read_all(whole[:cut])
        message = str(err.value)
        assert LAYER in message and "is not a valid tar archive" in message
    with pytest.raises(IntegrityError, match="'second'"):
        _read_all(whole[: 512 + 512 + 512 + 1000])


def test_garbage_headers() -> None:
    garbage = os.urandom(512)
    with pytest.raises(IntegrityError, match="is not a valid tar archive") as err:
        _read_all(_member(b"good", b"x") + garbage + END)
    assert LAYER in str(err.value)
    with pytest.raises(IntegrityError, match="is not a valid tar archive"):
        _read_all(b"This is a text file, not a tar archive at all.\n" * 40)
    flipped = bytearray(_member(b"file", b"data") + END)
    flipped[10] ^= 0x01  # one bit of the name: the checksum no longer matches
    with pytest.raises(IntegrityError, match="checksum"):
        _read_all(bytes(flipped))
    bad_number = bytearray(_header(b"file"))
    bad_number[124:136] = b"0000000009x\0"
    bad_number[148:156] = b" " * 8
    bad_number[148:156] = b"%06o\0 " % sum(bad_number)
    with pytest.raises(IntegrityError, match="octal"):
        _read_all(bytes(bad_number) + END)


def test_a_lone_zero_block_cannot_hide_members(caplog: pytest.LogCaptureFixture) -> None:
    hidden = _member(b"visible", b"v") + bytes(512) + _member(b"hidden", b"h") + END
    with pytest.raises(IntegrityError, match="single zero block"):
        _read_all(hidden)
    # Two zero blocks end the archive; whatever follows is read (for the digest) and ignored with a warning.
    trailing = _member(b"visible", b"v") + END + b"junk" + bytes(508)
    with caplog.at_level(logging.WARNING, logger="sconify.image.tarfs"):
        assert [e.path for e in _read_all(trailing)] == ["visible"]
    assert any("after its end-of-archive marker" in r.getMessage() for r in caplog.records)
    assert [e.path for e in _read_all(_member(b"visible", b"v") + bytes(512))] == ["visible"]


@pytest.mark.parametrize(
    "records",
    [b"11 path=abc\n", b"99 path=abc\n", b"x path=abc\n", b"11 pathabc\n", b"13 path=abc\nX"],
    ids=["short", "long", "no-length", "no-equals", "trailing"],
)
def test_malformed_pax_records(records: bytes) -> None:
    data = _member(b"PaxHeader", records, typeflag=b"x") + _member(b"a") + END
    with pytest.raises(IntegrityError, match="PAX"):
        _read_all(data)


def test_extended_header_without_its_member() -> None:
    with pytest.raises(IntegrityError, match="extended header is followed by the end"):
        _read_all(_pax({b"path": b"x"}) + END)


def test_whiteouts_that_escape_and_a_root_that_is_a_file() -> None:
    for name in (b"a/.wh...", b".wh..", b"a/.wh."):
        with pytest.raises(UnsafeArchiveError, match="whiteout") as err:
            _read_all(_member(name) + END)
        assert LAYER in str(err.value)
    with pytest.raises(UnsafeArchiveError, match="image root"):
        _read_all(_member(b"./", b"x") + END)
    # The usual ones are fine.
    entries = _read_all(_member(b"a/.wh.b") + _member(b"c/.wh..wh..opq") + END)
    assert [e.whiteout_target for e in entries] == ["a/b", "c"]
    assert [(e.is_whiteout, e.is_opaque) for e in entries] == [(True, False), (False, True)]


def test_unknown_member_types_are_unsupported() -> None:
    with pytest.raises(UnsupportedError, match="'volume'"):
        _read_all(_member(b"volume", typeflag=b"V") + END)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_are_unsupported(tmp_path: Path, fmt: str) -> None:
    sparse = tmp_path / "src" / "sparse"
    sparse.parent.mkdir()
    with sparse.open("wb") as handle:
        handle.truncate(1 << 20)
        handle.seek(1 << 19)
        handle.write(b"data")
    archive = tmp_path / "layer.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-C", str(sparse.parent), "-cf", str(archive), "."],
                   check=True, capture_output=True)
    with pytest.raises(UnsupportedError, match="sparse"):
        _read_all(archive.read_bytes())


def test_header_only_kinds_carry_no_data_and_hard_links_have_size_zero() -> None:
    # Go and Python ignore the size field of links, directories and devices; so do we.
    data = _header(b"dir/", size=100, typeflag=b"5") + _member(b"after", b"x") + END
    entries = _read_all(data)
    assert [(e.path, e.kind, e.size) for e in entries] == [
        ("dir", EntryKind.DIRECTORY, 0),
        ("after", EntryKind.REGULAR, 1),
    ]


def test_tarfile_made_unsafe_archive() -> None:
    """The same refusals for an archive from Python's tarfile, which writes what it is told to."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("usr/" + "x" * 150 + "/../../../../etc/cron.d/evil")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UnsafeArchiveError, match="etc/cron.d/evil"):
        _read_all(out.getvalue())
