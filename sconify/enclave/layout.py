"""The enclave layout sconify measures: a pure function of (runtime ELF, executable ELF or none, settings).

The layout is specified byte for byte in ``docs/enclave.md`` so that it can be reimplemented
elsewhere (a launcher that measures itself at start). Regions follow one another in a fixed order,
each starting at the first 2 MiB boundary at or after the end of the previous one:

    settings page | runtime segments | executable segments | threads | heap

Each thread has a TCS page, two SSA frames, a TLS page, an unmapped guard and its stack. The
heap and the stacks are added but not extended (their initial contents are zero and unmeasured);
every other page is measured. Nothing but the inputs of ``build_layout`` shapes the result.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sconify.enclave.elf import PF_R, PF_W, PF_X, ElfImage, read_elf
from sconify.enclave.settings import EnclaveSettings
from sconify.enclave.sgxs import (
    FLAGS_REG,
    FLAGS_TCS,
    PAGE_SIZE,
    SECINFO_R,
    SECINFO_W,
    SECINFO_X,
    PageRange,
    iter_sgxs,
    sgxs_size,
)
from sconify.errors import UnsupportedError

LAYOUT_VERSION = 1
SETTINGS_MAGIC = b"SCNFYENC"
REGION_ALIGN = 2 << 20
SSA_FRAME_SIZE = 1  # pages per SSA frame (SECS.SSAFRAMESIZE); enough for XSAVE state up to AVX-512
SSA_FRAMES = 2  # TCS.NSSA: one frame for the thread, one for an exception handled inside the enclave
GUARD_PAGES = 16  # unmapped pages below each stack: an overflow faults instead of hitting the TLS page
THREAD_FIXED_PAGES = 1 + SSA_FRAMES * SSA_FRAME_SIZE + 1  # TCS, SSA frames, TLS
MIN_ENCLAVE_SIZE = 2 * PAGE_SIZE
MAX_ENCLAVE_SIZE = 1 << 47

TCS_DBGOPTIN = 1
FLAGS_SETTINGS = FLAGS_REG | SECINFO_R
FLAGS_DATA = FLAGS_REG | SECINFO_R | SECINFO_W

_SETTINGS = struct.Struct("<8sIIQQIIQQQQQQIIQQQ")
_TCS = struct.Struct("<QQQIIQQQQII")
_TLS = struct.Struct("<QQQQQQ")


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def secinfo_flags_for_segment(p_flags: int) -> int:
    """SECINFO flags for a PT_LOAD segment: R if readable or writable, W if writable, X if executable."""
    flags = FLAGS_REG
    if p_flags & (PF_R | PF_W):
        flags |= SECINFO_R
    if p_flags & PF_W:
        flags |= SECINFO_W
    if p_flags & PF_X:
        flags |= SECINFO_X
    return flags


def _or_bytes(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(PAGE_SIZE, "little")


def image_ranges(image: ElfImage, base: int, name: str) -> list[PageRange]:
    """The measured pages of an ELF image loaded at enclave offset ``base``.

    Segment ``s`` lands at ``base + s.vaddr - image.first_page``; its pages hold its file bytes and
    zeros elsewhere. A page that two segments share holds both and has the union of their flags.
    """
    pieces: list[tuple[int, int, int, bytes]] = []  # (first page offset, pages, flags, contents)
    for seg in image.segments:
        start = base + (seg.vaddr - image.first_page)
        first = start // PAGE_SIZE * PAGE_SIZE
        pages = (_align_up(start + seg.memsz, PAGE_SIZE) - first) // PAGE_SIZE
        lead = start - first
        content = bytes(lead) + seg.data
        content += bytes(pages * PAGE_SIZE - len(content))
        flags = secinfo_flags_for_segment(seg.flags)
        if pieces and pieces[-1][0] + pieces[-1][1] * PAGE_SIZE > first:
            # This segment begins in the last page of the previous one: that page becomes its own piece.
            p_first, p_pages, p_flags, p_content = pieces.pop()
            if p_pages > 1:
                pieces.append((p_first, p_pages - 1, p_flags, p_content[:-PAGE_SIZE]))
            shared = _or_bytes(p_content[-PAGE_SIZE:], content[:PAGE_SIZE])
            pieces.append((first, 1, p_flags | flags, shared))
            if pages > 1:
                pieces.append((first + PAGE_SIZE, pages - 1, flags, content[PAGE_SIZE:]))
        else:
            pieces.append((first, pages, flags, content))
    return [PageRange(o, n, f, True, c, name) for o, n, f, c in pieces]


def _settings_page(values: dict[str, int]) -> bytes:
    return _SETTINGS.pack(
        SETTINGS_MAGIC,
        LAYOUT_VERSION,
        values["flags"],
        values["heap"],
        values["stack"],
        values["threads"],
        values["dlopen"],
        values["enclave_size"],
        values["runtime_base"],
        values["runtime_entry"],
        values["executable_base"],
        values["executable_entry"],
        values["executable_phdr"],
        values["executable_phnum"],
        values["executable_phentsize"],
        values["thread_base"],
        values["thread_block"],
        values["heap_base"],
    ).ljust(PAGE_SIZE, b"\0")


@dataclass(frozen=True)
class LayoutRegion:
    """A named part of the layout for people: where it is, how many pages are added and measured."""

    name: str
    offset: int
    size: int
    pages: int
    measured_pages: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (offsets as hex strings)."""
        return {
            "name": self.name,
            "offset": f"{self.offset:#x}",
            "size": self.size,
            "pages": self.pages,
            "measured_pages": self.measured_pages,
        }


@dataclass(frozen=True)
class EnclaveLayout:
    """Every page of the enclave in ascending order, with the values the settings page records."""

    settings: EnclaveSettings
    size: int
    ssa_frame_size: int
    ranges: tuple[PageRange, ...]
    runtime_base: int
    runtime_entry: int
    executable_base: int | None
    executable_entry: int | None
    thread_base: int
    thread_block: int
    heap_base: int

    def iter_sgxs(self) -> Iterator[bytes | memoryview]:
        """The canonical SGXS stream (see ``sgxs.iter_sgxs`` for the one rule about its chunks)."""
        return iter_sgxs(self.ssa_frame_size, self.size, self.ranges)

    @property
    def sgxs_length(self) -> int:
        """Bytes in the SGXS stream."""
        return sgxs_size(self.ranges)

    @property
    def pages(self) -> int:
        """Pages added to the enclave (EADD records)."""
        return sum(r.pages for r in self.ranges)

    @property
    def measured_pages(self) -> int:
        """Pages whose contents are measured (16 EEXTEND records each)."""
        return sum(r.pages for r in self.ranges if r.measured)

    def regions(self) -> list[LayoutRegion]:
        """The layout's parts in address order: settings, runtime, executable, threads, heap."""
        groups: dict[str, list[PageRange]] = {}
        for r in self.ranges:
            groups.setdefault(r.name.split(" ", 1)[0], []).append(r)
        out = []
        for name, members in groups.items():
            start = members[0].offset
            end = members[-1].end
            out.append(LayoutRegion(
                name, start, end - start, sum(m.pages for m in members),
                sum(m.pages for m in members if m.measured),
            ))
        return out


def build_layout(
    runtime: bytes,
    executable: bytes | None,
    settings: EnclaveSettings,
    *,
    runtime_name: str = "the runtime",
    executable_name: str = "the executable",
) -> EnclaveLayout:
    """Lay out an enclave for the runtime ELF, the program's ELF (or ``None``) and the settings.

    Pure: the same bytes and settings always give the same layout, whatever file they came from
    (the names only appear in error messages).
    """
    runtime_image = read_elf(runtime, runtime_name)
    executable_image = read_elf(executable, executable_name) if executable is not None else None

    ranges: list[PageRange] = []
    runtime_base = _align_up(PAGE_SIZE, REGION_ALIGN)
    ranges += image_ranges(runtime_image, runtime_base, "runtime")
    cursor = _align_up(runtime_base + runtime_image.span, REGION_ALIGN)
    runtime_entry = runtime_base + runtime_image.entry - runtime_image.first_page

    executable_base = executable_entry = None
    executable_phdr = 0
    if executable_image is not None:
        executable_base = cursor
        ranges += image_ranges(executable_image, executable_base, "executable")
        executable_entry = executable_base + executable_image.entry - executable_image.first_page
        if executable_image.phdr_vaddr is not None:
            executable_phdr = executable_base + executable_image.phdr_vaddr - executable_image.first_page
        cursor = _align_up(executable_base + executable_image.span, REGION_ALIGN)

    thread_base = cursor
    thread_block = (THREAD_FIXED_PAGES + GUARD_PAGES) * PAGE_SIZE + settings.stack
    for i in range(settings.threads):
        block = thread_base + i * thread_block
        tcs = block
        ssa = tcs + PAGE_SIZE
        tls = ssa + SSA_FRAMES * SSA_FRAME_SIZE * PAGE_SIZE
        stack_low = tls + PAGE_SIZE + GUARD_PAGES * PAGE_SIZE
        stack_top = block + thread_block
        tcs_page = _TCS.pack(
            0, TCS_DBGOPTIN if settings.debug else 0, ssa, 0, SSA_FRAMES, runtime_entry, 0, tls, tls,
            0xFFF, 0xFFF,
        )
        tls_page = _TLS.pack(tls, i, stack_low, stack_top, tcs, ssa)
        ranges.append(PageRange(tcs, 1, FLAGS_TCS, True, tcs_page, f"threads {i} tcs"))
        ranges.append(PageRange(ssa, SSA_FRAMES * SSA_FRAME_SIZE, FLAGS_DATA, True, None, f"threads {i} ssa"))
        ranges.append(PageRange(tls, 1, FLAGS_DATA, True, tls_page, f"threads {i} tls"))
        ranges.append(PageRange(stack_low, settings.stack // PAGE_SIZE, FLAGS_DATA, False, None,
                                f"threads {i} stack"))
    heap_base = _align_up(thread_base + settings.threads * thread_block, REGION_ALIGN)
    ranges.append(PageRange(heap_base, settings.heap // PAGE_SIZE, FLAGS_DATA, False, None, "heap"))
    size = max(_next_power_of_two(heap_base + settings.heap), MIN_ENCLAVE_SIZE)
    if size > MAX_ENCLAVE_SIZE:
        raise UnsupportedError(
            f"the enclave would need {size:#x} bytes of address space, more than SGX supports; "
            "give a smaller heap, stack or thread count."
        )

    values = {
        "flags": 1 if settings.debug else 0,
        "heap": settings.heap,
        "stack": settings.stack,
        "threads": settings.threads,
        "dlopen": int(settings.dlopen),
        "enclave_size": size,
        "runtime_base": runtime_base,
        "runtime_entry": runtime_entry,
        "executable_base": executable_base or 0,
        "executable_entry": executable_entry or 0,
        "executable_phdr": executable_phdr,
        "executable_phnum": executable_image.phnum if executable_image else 0,
        "executable_phentsize": executable_image.phentsize if executable_image else 0,
        "thread_base": thread_base,
        "thread_block": thread_block,
        "heap_base": heap_base,
    }
    ranges.insert(0, PageRange(0, 1, FLAGS_SETTINGS, True, _settings_page(values), "settings"))
    return EnclaveLayout(
        settings=settings,
        size=size,
        ssa_frame_size=SSA_FRAME_SIZE,
        ranges=tuple(ranges),
        runtime_base=runtime_base,
        runtime_entry=runtime_entry,
        executable_base=executable_base,
        executable_entry=executable_entry,
        thread_base=thread_base,
        thread_block=thread_block,
        heap_base=heap_base,
    )
