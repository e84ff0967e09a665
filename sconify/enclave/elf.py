"""The loadable segments of an x86-64 ELF file: all of an ELF that enclave measurement looks at."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from sconify.errors import UnsupportedError

PT_LOAD = 1
PT_PHDR = 6
PF_X = 1
PF_W = 2
PF_R = 4

ET_EXEC = 2
ET_DYN = 3
EM_X86_64 = 62

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
# Virtual addresses above this cannot be user-space x86-64 addresses; larger values are malformed.
_MAX_VADDR = 1 << 47


@dataclass(frozen=True)
class LoadSegment:
    """One PT_LOAD program header with its file bytes: ``data`` goes at ``vaddr``, zeros up to ``memsz``."""

    vaddr: int
    memsz: int
    flags: int
    data: bytes

    @property
    def end(self) -> int:
        """The first virtual address after the segment."""
        return self.vaddr + self.memsz


@dataclass(frozen=True)
class ElfImage:
    """What measurement needs from an ELF file: entry point, program header location, loadable segments.

    ``segments`` are sorted by virtual address, whatever their order in the program header table.
    """

    entry: int
    segments: tuple[LoadSegment, ...]
    phdr_vaddr: int | None
    phnum: int
    phentsize: int

    @property
    def first_page(self) -> int:
        """The page-aligned virtual address of the lowest segment: the image's load bias is taken from it."""
        return self.segments[0].vaddr & ~0xFFF

    @property
    def span(self) -> int:
        """Bytes from ``first_page`` to the end of the highest segment, rounded up to whole pages."""
        end = max(s.end for s in self.segments)
        return (end - self.first_page + 0xFFF) & ~0xFFF


def read_elf(data: bytes, name: str) -> ElfImage:
    """Parse the ELF header and program headers of ``data``; ``name`` names the file in error messages.

    Accepts 64-bit little-endian x86-64 executables and shared objects (ET_EXEC, ET_DYN); rejects
    anything else, and malformed or overlapping segments, with an UnsupportedError.
    """

    def bad(why: str) -> UnsupportedError:
        return UnsupportedError(
            f"{name} cannot be measured: {why}; give an x86-64 ELF executable or shared object."
        )

    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise bad("it is not an ELF file")
    ident = data[:16]
    if ident[4] != 2:
        raise bad("it is a 32-bit ELF file")
    if ident[5] != 1:
        raise bad("it is a big-endian ELF file")
    (_, e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, _, _, _) = _EHDR.unpack_from(
        data, 0
    )
    if e_machine != EM_X86_64:
        raise bad(f"it is built for machine type {e_machine}, not x86-64")
    if e_type not in (ET_EXEC, ET_DYN):
        raise bad("it is neither an executable nor a shared object")
    if e_phnum == 0xFFFF:
        raise bad("it has more program headers than this reader supports")
    if e_phnum == 0:
        raise bad("it has no program headers")
    if e_phentsize != _PHDR.size:
        raise bad(f"its program headers are {e_phentsize} bytes, not {_PHDR.size}")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise bad("its program header table runs past the end of the file")

    segments: list[LoadSegment] = []
    explicit_phdr: int | None = None
    file_ranges: list[tuple[int, int, int]] = []  # (offset, filesz, vaddr) to locate the header table
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, _, p_filesz, p_memsz, _ = _PHDR.unpack_from(
            data, e_phoff + i * e_phentsize
        )
        if p_type == PT_PHDR:
            explicit_phdr = p_vaddr
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise bad(f"loadable segment {i} has more file bytes than memory bytes")
        if p_offset + p_filesz > len(data):
            raise bad(f"loadable segment {i} runs past the end of the file")
        if p_vaddr + p_memsz > _MAX_VADDR:
            raise bad(f"loadable segment {i} lies outside the x86-64 user address space")
        segments.append(LoadSegment(p_vaddr, p_memsz, p_flags & (PF_R | PF_W | PF_X),
                                    bytes(data[p_offset:p_offset + p_filesz])))
        file_ranges.append((p_offset, p_filesz, p_vaddr))
    if not segments:
        raise bad("it has no loadable segments")
    segments.sort(key=lambda s: s.vaddr)
    for lower, upper in zip(segments, segments[1:], strict=False):
        if upper.vaddr < lower.end:
            raise bad(f"loadable segments at {lower.vaddr:#x} and {upper.vaddr:#x} overlap")
    if not any(s.vaddr <= e_entry < s.end for s in segments):
        raise bad(f"its entry point {e_entry:#x} is outside its loadable segments")

    phdr_vaddr = explicit_phdr
    if phdr_vaddr is None:
        for offset, filesz, vaddr in file_ranges:
            if offset <= e_phoff and e_phoff + e_phnum * e_phentsize <= offset + filesz:
                phdr_vaddr = vaddr + (e_phoff - offset)
                break
    return ElfImage(e_entry, tuple(segments), phdr_vaddr, e_phnum, e_phentsize)
