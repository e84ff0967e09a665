"""SGX measurement records, the canonical SGXS stream, and the rejection of malformed SGXS files."""

from __future__ import annotations

import hashlib
import struct

import pytest

from sconify.enclave.sgxs import (
    FLAGS_REG,
    FLAGS_TCS,
    SECINFO_R,
    SECINFO_W,
    SECINFO_X,
    PageRange,
    eadd_record,
    ecreate_record,
    eextend_record,
    iter_sgxs,
    mrenclave,
    parse_sgxs,
    sgxs_size,
)
from sconify.errors import IntegrityError

RW = FLAGS_REG | SECINFO_R | SECINFO_W
RX = FLAGS_REG | SECINFO_R | SECINFO_X


def _naive_stream(ssa: int, size: int, ranges: list[PageRange]) -> bytes:
    """The stream built the slow, obvious way from the SDM's record definitions."""
    out = [b"ECREATE\0" + struct.pack("<IQ", ssa, size) + bytes(44)]
    for r in ranges:
        data = (r.data or b"").ljust(r.pages * 4096, b"\0")
        for p in range(r.pages):
            offset = r.offset + p * 4096
            out.append(b"EADD\0\0\0\0" + struct.pack("<QQ", offset, r.flags) + bytes(40))
            if r.measured:
                for c in range(16):
                    out.append(b"EEXTEND\0" + struct.pack("<Q", offset + c * 256) + bytes(48))
                    out.append(data[p * 4096 + c * 256:p * 4096 + (c + 1) * 256])
    return b"".join(out)


def _stream(ranges: list[PageRange], size: int = 1 << 30) -> bytes:
    return b"".join(bytes(c) for c in iter_sgxs(1, size, ranges))


SMALL = [
    PageRange(0x0, 2, RX, True, bytes(range(256)) * 20),
    PageRange(0x3000, 1, FLAGS_TCS, True, b"\x01" * 72),
    PageRange(0x4000, 3, RW, False),
]


def test_records_have_the_sdm_layout() -> None:
    assert ecreate_record(1, 0x40000) == b"ECREATE\0" + b"\x01\0\0\0" + (0x40000).to_bytes(8, "little") + bytes(44)
    assert eadd_record(0x5000, RW) == b"EADD\0\0\0\0" + (0x5000).to_bytes(8, "little") + bytes([3, 2]) + bytes(46)
    assert eextend_record(0x5100) == b"EEXTEND\0" + (0x5100).to_bytes(8, "little") + bytes(48)
    assert {len(ecreate_record(1, 1 << 20)), len(eadd_record(0, RW)), len(eextend_record(0))} == {64}


def test_stream_equals_the_naive_construction() -> None:
    stream = _stream(SMALL)
    assert stream == _naive_stream(1, 1 << 30, SMALL)
    assert len(stream) == sgxs_size(SMALL)
    assert mrenclave(iter_sgxs(1, 1 << 30, SMALL)) == hashlib.sha256(stream).digest()


@pytest.mark.parametrize(
    ("offset", "pages"),
    [(0, 1), (0xFFF000, 2), (0x3FF000, 9000), ((1 << 32) - 3 * 4096, 5000), (0x123456000, 4096)],
)
def test_unmeasured_runs_equal_record_by_record_eadds(offset: int, pages: int) -> None:
    # Unmeasured runs are produced a 16 MiB window at a time; crossing windows must not show.
    ranges = [PageRange(offset, pages, RW, False)]
    assert _stream(ranges, 1 << 40) == _naive_stream(1, 1 << 40, ranges)


def test_parse_round_trips_ranges_and_hash() -> None:
    stream = _stream(SMALL)
    summary = parse_sgxs(stream)
    assert summary.mrenclave == hashlib.sha256(stream).digest()
    assert summary.size == 1 << 30 and summary.ssa_frame_size == 1
    assert [(r.offset, r.pages, r.flags, r.chunks) for r in summary.ranges] == [
        (0x0, 2, RX, 0xFFFF), (0x3000, 1, FLAGS_TCS, 0xFFFF), (0x4000, 3, RW, 0),
    ]
    assert summary.length == len(stream)


def test_parse_of_a_long_unmeasured_run_is_exact() -> None:
    # 40,000 EADD records cross block boundaries of the reader and several 16 MiB windows.
    ranges = [PageRange(0x1000, 1, RX, True, b"\xcc" * 4096), PageRange(0x200000, 40000, RW, False),
              PageRange(0x200000 + 40000 * 4096, 1, RX, True)]
    stream = _stream(ranges)
    summary = parse_sgxs(stream)
    assert [(r.offset, r.pages, r.flags, r.chunks) for r in summary.ranges] == [
        (0x1000, 1, RX, 0xFFFF), (0x200000, 40000, RW, 0), (0x200000 + 40000 * 4096, 1, RX, 0xFFFF),
    ]
    assert summary.mrenclave == hashlib.sha256(stream).digest()


def _record_position(stream: bytes, offset: int) -> int:
    """Byte position of the EADD record for ``offset`` in ``stream`` (found by search, not by arithmetic)."""
    return stream.index(b"EADD\0\0\0\0" + offset.to_bytes(8, "little"))


def test_a_bad_record_inside_a_long_run_is_found_where_it_is() -> None:
    ranges = [PageRange(0x200000, 30000, RW, False)]
    stream = bytearray(_stream(ranges))
    bad_at = _record_position(bytes(stream), 0x200000 + 23456 * 4096)
    stream[bad_at + 8:bad_at + 16] = (0x200000 + 23455 * 4096).to_bytes(8, "little")  # repeats the previous page
    with pytest.raises(IntegrityError) as err:
        parse_sgxs(bytes(stream), "heap.sgxs")
    assert f"at byte {bad_at}" in err.value.message
    assert "is not above the previous page" in err.value.message


def test_a_run_with_changed_flags_in_the_middle_is_valid_and_split() -> None:
    ranges = [PageRange(0x200000, 5000, RW, False)]
    stream = bytearray(_stream(ranges))
    at = _record_position(bytes(stream), 0x200000 + 2500 * 4096)
    stream[at + 16] = RX & 0xFF
    summary = parse_sgxs(bytes(stream))
    assert [(r.offset, r.pages, r.flags) for r in summary.ranges] == [
        (0x200000, 2500, RW), (0x200000 + 2500 * 4096, 1, RX), (0x200000 + 2501 * 4096, 2499, RW),
    ]


def _mutate(stream: bytes, at: int, new: bytes) -> bytes:
    return stream[:at] + new + stream[at + len(new):]


GOOD = _stream(SMALL, 1 << 20)
FIRST_EADD = 64
TCS_EADD = GOOD.index(b"EADD\0\0\0\0" + (0x3000).to_bytes(8, "little"))
LAST_EADD = GOOD.index(b"EADD\0\0\0\0" + (0x6000).to_bytes(8, "little"))
FIRST_EEXTEND = 128


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"", "it is empty"),
        (GOOD[64:], "does not start with an ECREATE record"),
        (GOOD + b"\0" * 10, "a truncated record of 10 bytes"),
        (GOOD[:FIRST_EEXTEND + 64 + 100], "an EEXTEND record without its 256 bytes"),
        (GOOD + ecreate_record(1, 1 << 20), "a second ECREATE record"),
        (_mutate(GOOD, 8, struct.pack("<IQ", 1, 3 << 20)), "not a power of two"),
        (_mutate(GOOD, 8, struct.pack("<I", 0)), "SSA frame size of 0"),
        (_mutate(GOOD, 40, b"\x01"), "reserved bytes in the ECREATE record"),
        (_mutate(GOOD, FIRST_EADD + 8, (0x10).to_bytes(8, "little")), "is not page-aligned"),
        (_mutate(GOOD, LAST_EADD + 8, (0x1000).to_bytes(8, "little")), "is not above the previous page"),
        (_mutate(GOOD, LAST_EADD + 8, (1 << 20).to_bytes(8, "little")), "outside the enclave size"),
        (_mutate(GOOD, FIRST_EADD + 16, (RX | 0x10000).to_bytes(8, "little")), "set reserved bits"),
        (_mutate(GOOD, FIRST_EADD + 16, (0x300 | SECINFO_R).to_bytes(8, "little")), "neither TCS nor REG"),
        (_mutate(GOOD, TCS_EADD + 16, (FLAGS_TCS | SECINFO_R).to_bytes(8, "little")), "TCS page with permission"),
        (_mutate(GOOD, FIRST_EADD + 16, (FLAGS_REG | SECINFO_W).to_bytes(8, "little")), "writable but not readable"),
        (_mutate(GOOD, FIRST_EADD + 30, b"\x01"), "reserved SECINFO bytes"),
        (_mutate(GOOD, FIRST_EEXTEND + 8, (0x80).to_bytes(8, "little")), "not a multiple of 256"),
        (_mutate(GOOD, FIRST_EEXTEND + 8, (0x1000).to_bytes(8, "little")), "not in the page added just before"),
        (_mutate(GOOD, FIRST_EEXTEND + 320 + 8, (0x0).to_bytes(8, "little")), "a second time"),
        (_mutate(GOOD, FIRST_EEXTEND + 20, b"\x01"), "reserved bytes in an EEXTEND record"),
        (_mutate(GOOD, FIRST_EADD, b"EREMOVE\0"), "unknown record tag"),
        (ecreate_record(1, 1 << 20) + eextend_record(0) + bytes(256), "not in the page added just before"),
    ],
)
def test_malformed_sgxs_is_rejected_with_the_reason(stream: bytes, expected: str) -> None:
    with pytest.raises(IntegrityError) as err:
        parse_sgxs(stream, "enclave.sgxs")
    assert err.value.message.startswith("enclave.sgxs is not a valid SGXS stream: ")
    assert expected in err.value.message
    assert err.value.exit_code == 7


def test_the_unmutated_stream_of_the_malformed_cases_is_valid() -> None:
    assert parse_sgxs(GOOD).mrenclave == hashlib.sha256(GOOD).digest()
