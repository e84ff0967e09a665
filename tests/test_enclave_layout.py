"""The documented enclave layout and its measurement: what changes MRENCLAVE, and what does not."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from sconify.enclave import EnclaveSettings, build_layout, measure, parse_sgxs
from sconify.enclave.settings import DlopenMode
from sconify.enclave.sgxs import FLAGS_REG, FLAGS_TCS, SECINFO_R, SECINFO_W, SECINFO_X
from sconify.errors import UnsupportedError

BUSYBOX = Path("/usr/bin/busybox")
PAGE = 4096
MIB2 = 2 << 20

PROGRAM = r"""
#include <stdio.h>
static const char banner[] = "sconify layout test";
int counter = 7;
static char scratch[20000];
int main(int argc, char **argv) {
    scratch[argc] = (char)counter;
    puts(banner);
    return scratch[1] + argc;
}
"""


@pytest.fixture(scope="module")
def runtime() -> bytes:
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    return BUSYBOX.read_bytes()


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("prog")
    (d / "prog.c").write_text(PROGRAM)
    subprocess.run([gcc, "-O1", "-o", str(d / "prog"), str(d / "prog.c")], check=True)
    return d / "prog"


def _section_offset(path: Path, name: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        section = ELFFile(f).get_section_by_name(name)
        assert section is not None
        return section["sh_offset"], section["sh_size"]


def make_elf(
    segments: list[tuple[int, int, bytes, int]],
    entry: int,
    order: list[int] | None = None,
    ident: bytes = b"\x7fELF\x02\x01\x01",
    machine: int = 62,
) -> bytes:
    """A minimal ELF64 whose headers lie outside every PT_LOAD: segments are (vaddr, p_flags, data, memsz)."""
    offsets = []
    cursor = 0x1000
    for vaddr, _, data, _ in segments:
        offset = cursor + vaddr % PAGE
        offsets.append(offset)
        cursor = (offset + len(data) + PAGE - 1) // PAGE * PAGE
    phdrs = [struct.pack("<IIQQQQQQ", 1, flags, offsets[i], vaddr, vaddr, len(data), memsz, PAGE)
             for i, (vaddr, flags, data, memsz) in enumerate(segments)]
    image = bytearray(max(cursor, 0x1000))
    image[0:64] = struct.pack("<16sHHIQQQIHHHHHH", ident.ljust(16, b"\0"), 3, machine, 1, entry, 64, 0, 0, 64, 56,
                              len(segments), 0, 0, 0)
    for slot, index in enumerate(order if order is not None else range(len(segments))):
        image[64 + slot * 56:64 + (slot + 1) * 56] = phdrs[index]
    for (_, _, data, _), offset in zip(segments, offsets, strict=True):
        image[offset:offset + len(data)] = data
    return bytes(image)


def _field(page: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, page, offset)[0]


# --- the documented layout --------------------------------------------------------------------------


def test_settings_page_holds_the_documented_fields(runtime: bytes, program: Path) -> None:
    settings = EnclaveSettings(heap=8 << 20, stack=256 << 10, threads=3, dlopen=DlopenMode.PROTECTED, debug=True)
    layout = build_layout(runtime, program.read_bytes(), settings)
    first = layout.ranges[0]
    assert (first.offset, first.pages, first.flags, first.measured) == (0, 1, FLAGS_REG | SECINFO_R, True)
    page = first.data
    assert page is not None and len(page) == PAGE
    with open(BUSYBOX, "rb") as f:
        rt = ELFFile(f)
        rt_first = min(s["p_vaddr"] for s in rt.iter_segments() if s["p_type"] == "PT_LOAD") & ~0xFFF
        rt_entry = rt.header["e_entry"]
    with open(program, "rb") as f:
        ex = ELFFile(f)
        ex_first = min(s["p_vaddr"] for s in ex.iter_segments() if s["p_type"] == "PT_LOAD") & ~0xFFF
        ex_entry = ex.header["e_entry"]
        ex_phdr = next(s["p_vaddr"] for s in ex.iter_segments() if s["p_type"] == "PT_PHDR")
        ex_phnum = ex.header["e_phnum"]
    assert page[0:8] == b"SCNFYENC"
    assert _field(page, 8, "I") == 1  # layout version
    assert _field(page, 12, "I") == 1  # flags: debug
    assert _field(page, 16, "Q") == 8 << 20
    assert _field(page, 24, "Q") == 256 << 10
    assert _field(page, 32, "I") == 3
    assert _field(page, 36, "I") == 1  # dlopen: protected
    assert _field(page, 40, "Q") == layout.size
    assert _field(page, 48, "Q") == 0x200000
    assert _field(page, 56, "Q") == 0x200000 + rt_entry - rt_first
    exe_base = _field(page, 64, "Q")
    assert exe_base == layout.executable_base and exe_base % MIB2 == 0
    assert _field(page, 72, "Q") == exe_base + ex_entry - ex_first
    assert _field(page, 80, "Q") == exe_base + ex_phdr - ex_first
    assert _field(page, 88, "I") == ex_phnum and _field(page, 92, "I") == 56
    assert _field(page, 96, "Q") == layout.thread_base
    assert _field(page, 104, "Q") == (4 + 16) * PAGE + (256 << 10)
    assert _field(page, 112, "Q") == layout.heap_base
    assert not any(page[120:])


def test_regions_come_in_order_each_on_a_2mib_boundary(runtime: bytes, program: Path) -> None:
    layout = build_layout(runtime, program.read_bytes(), EnclaveSettings(heap=4 << 20, threads=2))
    regions = layout.regions()
    assert [r.name for r in regions] == ["settings", "runtime", "executable", "threads", "heap"]
    assert all(r.offset % MIB2 == 0 for r in regions)
    for lower, upper in zip(regions, regions[1:], strict=False):
        assert upper.offset == (lower.offset + lower.size + MIB2 - 1) // MIB2 * MIB2
    end = regions[-1].offset + regions[-1].size
    assert layout.size >= end and layout.size & (layout.size - 1) == 0 and layout.size // 2 < end


def test_pages_are_ascending_without_overlap(runtime: bytes, program: Path) -> None:
    layout = build_layout(runtime, program.read_bytes(), EnclaveSettings(threads=4))
    for lower, upper in zip(layout.ranges, layout.ranges[1:], strict=False):
        assert lower.end <= upper.offset
    assert all(r.offset % PAGE == 0 for r in layout.ranges)


def test_threads_have_tcs_ssa_tls_guard_and_stack(runtime: bytes) -> None:
    settings = EnclaveSettings(stack=64 << 10, threads=2, debug=False)
    layout = build_layout(runtime, None, settings)
    block = (4 + 16) * PAGE + (64 << 10)
    rw = FLAGS_REG | SECINFO_R | SECINFO_W
    for i in range(2):
        base = layout.thread_base + i * block
        mine = [r for r in layout.ranges if r.name.startswith(f"threads {i} ")]
        assert [(r.offset - base, r.pages, r.flags, r.measured) for r in mine] == [
            (0, 1, FLAGS_TCS, True),
            (PAGE, 2, rw, True),
            (3 * PAGE, 1, rw, True),
            (20 * PAGE, 16, rw, False),  # the stack, after 16 unmapped guard pages
        ]
        tcs = mine[0].data
        assert tcs is not None
        assert _field(tcs, 8, "Q") == 0  # FLAGS: no DBGOPTIN without debug
        assert _field(tcs, 16, "Q") == base + PAGE  # OSSA
        assert _field(tcs, 24, "I") == 0 and _field(tcs, 28, "I") == 2  # CSSA, NSSA
        assert _field(tcs, 32, "Q") == layout.runtime_entry  # OENTRY
        assert _field(tcs, 48, "Q") == base + 3 * PAGE == _field(tcs, 56, "Q")  # OFSBASE, OGSBASE
        assert _field(tcs, 64, "I") == 0xFFF == _field(tcs, 68, "I")
        assert not any(tcs[72:])
        tls = mine[2].data
        assert tls is not None
        assert struct.unpack_from("<6Q", tls) == (base + 3 * PAGE, i, base + 20 * PAGE, base + block, base, base + PAGE)
    debug_layout = build_layout(runtime, None, EnclaveSettings(stack=64 << 10, threads=2, debug=True))
    tcs = next(r for r in debug_layout.ranges if r.flags == FLAGS_TCS).data
    assert tcs is not None and _field(tcs, 8, "Q") == 1  # DBGOPTIN


def test_heap_is_added_but_not_measured(runtime: bytes) -> None:
    layout = build_layout(runtime, None, EnclaveSettings(heap=12 << 20))
    heap = layout.ranges[-1]
    assert (heap.name, heap.offset, heap.pages, heap.measured) == ("heap", layout.heap_base, 3072, False)
    assert heap.flags == FLAGS_REG | SECINFO_R | SECINFO_W
    unmeasured = {r.name.split()[-1] for r in layout.ranges if not r.measured}
    assert unmeasured == {"heap", "stack"}


def test_segments_map_their_bytes_flags_and_zero_fill() -> None:
    text = b"\x90" * 0x300
    data = b"\x11" * 0x80
    elf = make_elf([(0x10000, 5, text, 0x300), (0x12010, 6, data, 0x2000)], entry=0x10000)
    layout = build_layout(elf, None, EnclaveSettings())
    runtime = [r for r in layout.ranges if r.name == "runtime"]
    assert [(r.offset, r.pages, r.flags) for r in runtime] == [
        (0x200000, 1, FLAGS_REG | SECINFO_R | SECINFO_X),
        (0x202000, 3, FLAGS_REG | SECINFO_R | SECINFO_W),
    ]
    assert runtime[0].data == text + bytes(PAGE - 0x300)
    assert runtime[1].data == bytes(0x10) + data + bytes(3 * PAGE - 0x10 - 0x80)
    assert layout.runtime_entry == 0x200000


def test_a_page_shared_by_two_segments_holds_both_with_the_union_of_flags() -> None:
    elf = make_elf([(0x1000, 5, b"\xaa" * 0x100, 0x100), (0x1800, 6, b"\xbb" * 0x100, 0x1000)], entry=0x1000)
    layout = build_layout(elf, None, EnclaveSettings())
    runtime = [r for r in layout.ranges if r.name == "runtime"]
    assert [(r.offset, r.pages, r.flags) for r in runtime] == [
        (0x200000, 1, FLAGS_REG | SECINFO_R | SECINFO_W | SECINFO_X),
        (0x201000, 1, FLAGS_REG | SECINFO_R | SECINFO_W),
    ]
    expected = bytearray(PAGE)
    expected[0:0x100] = b"\xaa" * 0x100
    expected[0x800:0x900] = b"\xbb" * 0x100
    assert runtime[0].data == bytes(expected)


def test_three_segments_in_one_page_become_one_page() -> None:
    elf = make_elf([(0x1000, 4, b"\x01" * 0x10, 0x10), (0x1400, 5, b"\x02" * 0x10, 0x10),
                    (0x1800, 6, b"\x03" * 0x10, 0x10)], entry=0x1400)
    runtime = [r for r in build_layout(elf, None, EnclaveSettings()).ranges if r.name == "runtime"]
    assert [(r.offset, r.pages, r.flags) for r in runtime] == [
        (0x200000, 1, FLAGS_REG | SECINFO_R | SECINFO_W | SECINFO_X)
    ]
    data = runtime[0].data
    assert data is not None
    assert (data[0:0x10], data[0x400:0x410], data[0x800:0x810]) == (b"\x01" * 16, b"\x02" * 16, b"\x03" * 16)
    assert data.count(0) == PAGE - 0x30


def test_round_trip_measure_export_parse(runtime: bytes, program: Path) -> None:
    m = measure(runtime, program.read_bytes(), EnclaveSettings(heap=20 << 20, threads=2))
    stream = b"".join(bytes(chunk) for chunk in m.iter_sgxs())
    assert hashlib.sha256(stream).digest() == m.mrenclave
    assert len(stream) == m.layout.sgxs_length
    summary = parse_sgxs(stream)
    assert summary.mrenclave == m.mrenclave
    assert summary.size == m.layout.size and summary.ssa_frame_size == 1
    assert summary.pages == m.layout.pages
    assert summary.measured_chunks == 16 * m.layout.measured_pages


def test_write_sgxs_writes_the_stream_atomically(runtime: bytes, tmp_path: Path) -> None:
    m = measure(runtime, None, EnclaveSettings(heap=4 << 20))
    out = tmp_path / "enclave.sgxs"
    m.write_sgxs(out)
    assert hashlib.sha256(out.read_bytes()).digest() == m.mrenclave
    assert [p.name for p in tmp_path.iterdir()] == ["enclave.sgxs"]


# --- what changes MRENCLAVE -------------------------------------------------------------------------


def _mrenclave(runtime: bytes, executable: bytes | None, **settings: object) -> bytes:
    return measure(runtime, executable, EnclaveSettings(**settings)).mrenclave  # type: ignore[arg-type]


def test_one_changed_byte_in_the_text_changes_mrenclave(runtime: bytes, program: Path) -> None:
    exe = program.read_bytes()
    offset, size = _section_offset(program, ".text")
    changed = bytearray(exe)
    changed[offset + size // 2] ^= 0x01
    assert _mrenclave(runtime, exe) != _mrenclave(runtime, bytes(changed))


def test_one_changed_byte_in_the_runtime_changes_mrenclave(runtime: bytes, program: Path) -> None:
    offset, size = _section_offset(BUSYBOX, ".text")
    changed = bytearray(runtime)
    changed[offset + 1000] ^= 0x80
    assert _mrenclave(runtime, program.read_bytes()) != _mrenclave(bytes(changed), program.read_bytes())


@pytest.mark.parametrize(
    "change",
    [{"heap": 64 << 20}, {"stack": 2 << 20}, {"threads": 9}, {"dlopen": DlopenMode.PROTECTED},
     {"dlopen": DlopenMode.UNPROTECTED}, {"debug": True}],
    ids=["heap", "stack", "threads", "dlopen-protected", "dlopen-unprotected", "debug"],
)
def test_each_setting_changes_mrenclave(runtime: bytes, program: Path, change: dict[str, object]) -> None:
    base = {"heap": 32 << 20, "stack": 1 << 20, "threads": 8, "dlopen": DlopenMode.OFF, "debug": False}
    exe = program.read_bytes()
    assert _mrenclave(runtime, exe, **base) != _mrenclave(runtime, exe, **{**base, **change})


def test_a_program_measured_in_changes_mrenclave(runtime: bytes, program: Path) -> None:
    assert _mrenclave(runtime, None) != _mrenclave(runtime, program.read_bytes())


# --- what does not --------------------------------------------------------------------------------


def test_bytes_outside_loadable_segments_do_not_change_mrenclave(runtime: bytes, program: Path) -> None:
    exe = program.read_bytes()
    offset, size = _section_offset(program, ".comment")
    changed = bytearray(exe)
    changed[offset:offset + size] = b"x" * size
    appended = exe + b"trailing bytes that no segment loads"
    reference = _mrenclave(runtime, exe)
    assert _mrenclave(runtime, bytes(changed)) == reference
    assert _mrenclave(runtime, appended) == reference


def test_program_header_order_does_not_change_mrenclave() -> None:
    segments = [(0x1000, 5, b"\xc3" * 0x200, 0x200), (0x3000, 4, b"ro" * 0x100, 0x200),
                (0x5000, 6, b"\x01" * 0x40, 0x1000)]
    elfs = [make_elf(segments, 0x1000, order) for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0])]
    assert len(set(elfs)) == 3
    assert len({_mrenclave(elf, elf) for elf in elfs}) == 1


def test_file_name_and_timestamps_do_not_change_mrenclave(runtime: bytes, program: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "renamed"
    copy.parent.mkdir()
    shutil.copy(program, copy)
    os.utime(copy, (1_000_000, 1_000_000))
    assert _mrenclave(runtime, copy.read_bytes()) == _mrenclave(runtime, program.read_bytes())


def test_settings_given_in_any_order_measure_the_same(runtime: bytes) -> None:
    a = EnclaveSettings(heap=16 << 20, stack=128 << 10, threads=2, dlopen=DlopenMode.OFF, debug=True)
    b = EnclaveSettings(debug=True, threads=2, dlopen=DlopenMode.OFF, stack=128 << 10, heap=16 << 20)
    c = EnclaveSettings.from_options(dlopen="0", debug=True, heap="16M", threads=2, stack="128K")
    results = {measure(runtime, None, settings).mrenclave for settings in (a, b, c)}
    assert len(results) == 1


def test_measuring_twice_gives_the_same_result(runtime: bytes, program: Path) -> None:
    exe = program.read_bytes()
    assert measure(runtime, exe, EnclaveSettings()) == measure(runtime, exe, EnclaveSettings())


# --- inputs that cannot be measured -----------------------------------------------------------------

GOOD_SEGMENTS = [(0x1000, 5, b"\xc3" * 16, 16)]


@pytest.mark.parametrize(
    ("elf", "expected"),
    [
        (b"#!/bin/sh\necho hi\n", "not an ELF file"),
        (make_elf(GOOD_SEGMENTS, 0x1000, ident=b"\x7fELF\x01\x01\x01"), "32-bit"),
        (make_elf(GOOD_SEGMENTS, 0x1000, ident=b"\x7fELF\x02\x02\x01"), "big-endian"),
        (make_elf(GOOD_SEGMENTS, 0x1000, machine=183), "machine type 183"),
        (make_elf([(0x1000, 5, b"a" * 0x200, 0x200), (0x1100, 6, b"b", 0x10)], 0x1000), "overlap"),
        (make_elf(GOOD_SEGMENTS, 0x9000), "entry point 0x9000 is outside"),
        (make_elf([], 0x1000), "no program headers"),
        (make_elf(GOOD_SEGMENTS, 0x1000)[:0x1008], "runs past the end of the file"),
    ],
)
def test_unmeasurable_elf_files_are_rejected(elf: bytes, expected: str) -> None:
    with pytest.raises(UnsupportedError) as err:
        measure(elf, None, EnclaveSettings(), runtime_name="runtime file rt")
    assert err.value.message.startswith("runtime file rt cannot be measured: ")
    assert expected in err.value.message


def test_the_unmutated_elf_of_the_rejection_cases_is_measurable() -> None:
    assert len(measure(make_elf(GOOD_SEGMENTS, 0x1000), None, EnclaveSettings()).mrenclave) == 32
