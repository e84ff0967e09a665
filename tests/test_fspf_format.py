"""Regions, paths and the metadata layout: the rules of docs/fspf.md sections 1, 2, 4 and 5."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sconify.errors import IntegrityError, KeyMaterialError, UnsafeArchiveError, UnsupportedError, UsageError
from sconify.fspf import Record, RecordKind, Region, RegionMode, RegionTable, VolumeKey, open_volume
from sconify.fspf.format import (
    FORMAT_VERSION,
    SUITE_HMAC_SIV_AES256GCM,
    Header,
    decode_body,
    encode_body,
    normalize_path,
)

CHUNK = 4096


def test_the_longest_prefix_wins_on_whole_components() -> None:
    table = RegionTable.of(["encrypted:/app", "not-protected:/app/cache", "authenticated:/app/cache/signed"])
    assert table.mode_for(b"/app") is RegionMode.ENCRYPTED
    assert table.mode_for(b"/app/main.py") is RegionMode.ENCRYPTED
    assert table.mode_for(b"/application") is RegionMode.NOT_PROTECTED
    assert table.mode_for(b"/app/cache") is RegionMode.NOT_PROTECTED
    assert table.mode_for(b"/app/cache2") is RegionMode.ENCRYPTED
    assert table.mode_for(b"/app/cache/signed/x") is RegionMode.AUTHENTICATED
    assert table.mode_for(b"/") is RegionMode.NOT_PROTECTED


def test_the_root_region_is_always_there_and_can_be_set() -> None:
    assert RegionTable.of([]).regions == (Region(b"/", RegionMode.NOT_PROTECTED),)
    table = RegionTable.of(["encrypted:/", "not-protected:/tmp"])
    assert table.mode_for(b"/etc/passwd") is RegionMode.ENCRYPTED
    assert [str(r) for r in table.regions] == ["encrypted:/", "not-protected:/tmp"]


def test_a_walk_must_look_inside_directories_above_a_protected_region() -> None:
    table = RegionTable.of(["encrypted:/usr/lib/python3"])
    assert table.protected_at_or_below(b"/usr")
    assert table.protected_at_or_below(b"/usr/lib/python3/site")
    assert not table.protected_at_or_below(b"/usr/share")
    assert not table.protected_at_or_below(b"/usr/lib/python")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("encrypted", "MODE:PREFIX"),
        ("encrypted:", "MODE:PREFIX"),
        ("sealed:/app", "Unknown region mode"),
        ("encrypted:app", "must be absolute"),
    ],
)
def test_malformed_region_specs_are_usage_errors(spec: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        Region.parse(spec)


def test_a_prefix_given_twice_is_refused_even_when_spelled_differently() -> None:
    with pytest.raises(UsageError, match="given twice"):
        RegionTable.of(["encrypted:/app", "authenticated:/app/"])


def test_region_prefixes_are_normalised_and_may_not_escape() -> None:
    assert Region.parse("authenticated:/usr//lib/./x/").prefix == b"/usr/lib/x"
    with pytest.raises(UnsafeArchiveError):
        Region.parse("encrypted:/app/../etc")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("app/x", b"/app/x"), ("./app//x/", b"/app/x"), ("/app/x", b"/app/x"), ("", b"/"), (b"a/\xff", b"/a/\xff")],
)
def test_paths_are_normalised_to_absolute_bytes(raw: str | bytes, expected: bytes) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["../etc", "app/../../x", b"a\0b"])
def test_paths_that_could_leave_the_volume_are_refused(raw: str | bytes) -> None:
    with pytest.raises(UnsafeArchiveError):
        normalize_path(raw)


def _record(path: bytes, kind: RecordKind = RecordKind.DIRECTORY, **fields: object) -> Record:
    return Record(path, kind, RegionMode.ENCRYPTED, 0o40755, 0, 0, 0, **fields)  # type: ignore[arg-type]


TABLE = RegionTable.of(["encrypted:/app"])


def test_a_body_decodes_to_what_was_encoded() -> None:
    records = [
        _record(b"/app"),
        _record(
            b"/app/f", RecordKind.FILE, size=CHUNK + 1, chunks=bytes(range(56)), xattrs=((b"user.a", b"\x00\x01"),)
        ),
        _record(b"/app/h", RecordKind.HARDLINK, target=b"/app/f"),
        _record(b"/app/s", RecordKind.SYMLINK, target=b"../../etc/\xff"),
        _record(b"/app/d", RecordKind.SPECIAL, devmajor=1, devminor=3),
    ]
    body = decode_body(encode_body(TABLE, reversed(records), CHUNK), CHUNK, where="test")
    assert body.regions == TABLE
    assert list(body.records) == sorted(records, key=lambda r: r.path)


@pytest.mark.parametrize(
    ("records", "words"),
    [
        ([_record(b"/etc")], "region's protection"),
        ([_record(b"/app/h", RecordKind.HARDLINK, target=b"/app/nothing")], "hard link"),
        ([_record(b"/app/f", RecordKind.FILE), _record(b"/app/f/x")], "below a non-directory"),
        ([_record(b"/")], "not normalised"),
    ],
)
def test_an_inconsistent_body_is_refused(records: list[Record], words: str) -> None:
    with pytest.raises(IntegrityError, match=words):
        decode_body(encode_body(TABLE, records, CHUNK), CHUNK, where="test")


def test_a_body_with_trailing_or_missing_bytes_is_refused() -> None:
    body = encode_body(TABLE, [_record(b"/app")], CHUNK)
    with pytest.raises(IntegrityError, match="trailing"):
        decode_body(body + b"\0", CHUNK, where="test")
    with pytest.raises(IntegrityError, match="ends early"):
        decode_body(body[:-3], CHUNK, where="test")


def _metadata(key: VolumeKey, version: int = FORMAT_VERSION, suite: int = SUITE_HMAC_SIV_AES256GCM) -> bytes:
    body = encode_body(TABLE, [_record(b"/app")], CHUNK)
    header = Header(version, suite, CHUNK, len(body), key.key_id)
    return key.seal_metadata(header, body)[0]


def test_the_header_layout_is_the_documented_one() -> None:
    key = VolumeKey(bytes(32))
    data = _metadata(key)
    magic, version, suite, chunk, body_length = struct.unpack_from("<8sHHIQ", data)
    assert (magic, version, suite, chunk) == (b"SCNYFSPF", 1, 1, CHUNK)
    assert len(data) == 64 + body_length + 16
    assert data[24:40] == key.key_id and data[52:64] == bytes(12)


def test_an_unknown_version_or_suite_is_unsupported() -> None:
    key = VolumeKey.generate()
    for version, suite in ((2, 1), (1, 7)):
        with pytest.raises(UnsupportedError, match=f"format {version} with cipher suite {suite}"):
            open_volume(_metadata(key, version, suite), key, None)


def test_something_else_than_metadata_is_named() -> None:
    with pytest.raises(IntegrityError, match="not an FSPF metadata file"):
        open_volume(b"PK\x03\x04" + bytes(100), VolumeKey.generate(), None)


@pytest.mark.parametrize("text", ["", "00" * 31, "00" * 33, "xyz"])
def test_keys_must_be_32_bytes_of_hex(text: str) -> None:
    with pytest.raises(KeyMaterialError):
        VolumeKey.from_hex(text)


def test_a_key_never_shows_its_bytes() -> None:
    key = VolumeKey(bytes(range(32)))
    assert bytes(range(32)).hex() not in repr(key) and key.key_id.hex() in repr(key)
    assert VolumeKey.from_hex(key.hex()) == key and VolumeKey.generate() != key


_PART = st.sampled_from([b"a", b"b", b"app", b"lib", b"x.y"])
_VPATH = st.lists(_PART, min_size=1, max_size=6).map(lambda parts: b"/" + b"/".join(parts))


@given(prefixes=st.dictionaries(_VPATH, st.sampled_from(list(RegionMode)), max_size=6),
       paths=st.lists(_VPATH, min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_mode_for_with_its_directory_memory_agrees_with_region_for(prefixes, paths) -> None:  # noqa: ANN001
    table = RegionTable(tuple(Region(p, m) for p, m in sorted(prefixes.items())))
    for path in paths + paths + [b"/"]:  # the second round is answered from what the first one kept
        assert table.mode_for(path) == table.region_for(path).mode
