"""ELF facts the analyzer needs (class, machine, static or dynamic, PIE, PT_INTERP, DT_NEEDED, RPATH,
RUNPATH, libc flavour), read from the ELF header, the program headers and the dynamic segment (System V ABI,
chapters 4 and 5), and the dynamic loader's library search inside an image."""

from __future__ import annotations

import logging
import posixpath
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
DF_1_PIE = 0x08000000

# e_machine values in the words people use (and ``uname -m`` prints); others are shown as "e_machine N".
MACHINES = {
    62: "x86-64",
    3: "i386",
    183: "aarch64",
    40: "arm",
    243: "riscv",
    21: "ppc64",
    20: "ppc",
    22: "s390x",
    8: "mips",
    258: "loongarch",
}
ELF_TYPES = {1: "rel", 2: "exec", 3: "dyn", 4: "core"}

# Byte strings whose presence in a file tells which C library (or none) it was built with.
_LIBC_MARKERS = (
    (b"GNU C Library", "glibc"),
    (b"GLIBC_2.", "glibc"),
    (b"GLIBC_TUNABLES", "glibc"),
    (b"Fatal glibc error", "glibc"),
    (b"Go buildinf:", "go"),
    (b"\x00musl libc", "musl"),
)
_MARKER_OVERLAP = max(len(m) for m, _ in _LIBC_MARKERS)


@dataclass(frozen=True)
class ElfInfo:
    """What one ELF file says about itself (no library resolution; see ``resolve_libraries``)."""

    elf_class: int  # 32 or 64
    machine: str  # "x86-64", "aarch64", ... or the raw e_machine name
    little_endian: bool
    type: str  # "exec", "dyn", "rel", "core" or the raw e_type
    interpreter: str | None  # PT_INTERP
    needed: tuple[str, ...]
    rpath: tuple[str, ...]
    runpath: tuple[str, ...]
    soname: str | None
    has_dynamic: bool
    pie_flag: bool  # DF_1_PIE in DT_FLAGS_1
    markers: tuple[str, ...]  # "glibc", "musl", "go": found in the file's bytes
    error: str | None = None  # set when the file starts like an ELF but cannot be parsed

    @property
    def static(self) -> bool:
        """Statically linked: no program interpreter and no libraries to load."""
        return self.interpreter is None and not self.needed

    @property
    def pie(self) -> bool:
        """Position independent: ET_DYN with an interpreter (or the DF_1_PIE flag, or static-pie)."""
        if self.type != "dyn":
            return False
        return self.interpreter is not None or self.pie_flag or (self.has_dynamic and not self.needed)

    @property
    def is_x86_64(self) -> bool:
        return self.machine == "x86-64" and self.elf_class == 64

    def libc(self) -> str:
        """``glibc``, ``musl``, ``none`` (Go and other libc-free programs) or ``unknown``, from this file alone."""
        interp = self.interpreter or ""
        if "ld-musl" in interp or any(n.startswith("libc.musl") for n in self.needed):
            return "musl"
        if "ld-linux" in interp or "libc.so.6" in self.needed:
            return "glibc"
        if "glibc" in self.markers:
            return "glibc"
        if "musl" in self.markers:
            return "musl"
        if "go" in self.markers and self.static:
            return "none"
        return "unknown"


def is_elf(head: bytes) -> bool:
    return head.startswith(ELF_MAGIC)


def scan_markers(chunks: Iterable[bytes]) -> tuple[str, ...]:
    """The libc markers found in a stream of chunks (matches across chunk borders included)."""
    found: set[str] = set()
    tail = b""
    for chunk in chunks:
        window = tail + chunk
        for marker, kind in _LIBC_MARKERS:
            if kind not in found and marker in window:
                found.add(kind)
        tail = window[-_MARKER_OVERLAP:]
    return tuple(sorted(found))


class ElfFormatError(ValueError):
    """The file starts like an ELF but its headers do not hold together."""


PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH, DT_FLAGS_1 = 0, 1, 5, 14, 15, 29, 0x6FFFFFFB
PN_XNUM = 0xFFFF
MAX_PROGRAM_HEADERS = 65536
MAX_DYNAMIC_BYTES = 1 << 20  # far more than any dynamic segment (entries of 16 bytes)
MAX_STRING = 1 << 16  # a path or library name in the dynamic string table

# (header after e_ident, program header, section header, dynamic entry) for ELFCLASS32 and ELFCLASS64, without
# the byte order. Header: e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
# e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx. Program header: p_type, then the class's field order.
_LAYOUTS = {
    1: ("HHIIIIIHHHHHH", "IIIIIIII", "IIIIIIIIII", "iI"),
    2: ("HHIQQQIHHHHHH", "IIQQQQQQ", "IIQQQQIIQQ", "qQ"),
}


class _ElfReader:
    """The parts of one ELF file the analysis reads, from a seekable binary file, with every offset and count
    checked against the file's length."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        f.seek(0, 2)
        self._size = f.tell()
        ident = self._at(0, 16)
        if not ident.startswith(ELF_MAGIC):
            raise ElfFormatError("no ELF magic")
        self.elf_class = {1: 32, 2: 64}.get(ident[4], 0)
        if not self.elf_class:
            raise ElfFormatError(f"unknown ELF class {ident[4]}")
        if ident[5] not in (1, 2):
            raise ElfFormatError(f"unknown ELF data encoding {ident[5]}")
        self.little_endian = ident[5] == 1
        order = "<" if self.little_endian else ">"
        header, phdr, shdr, dyn = (struct.Struct(order + f) for f in _LAYOUTS[ident[4]])
        self._phdr, self._shdr, self._dyn = phdr, shdr, dyn
        (self.type, self.machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         shstrndx) = header.unpack(self._at(16, header.size))
        self._shoff, self._shentsize, self._shnum, self._shstrndx = shoff, shentsize, shnum, shstrndx
        if phnum == PN_XNUM:  # the real count is in section 0's sh_info
            phnum = self._section(0)[7]
        if phnum and phentsize < phdr.size:
            raise ElfFormatError(f"program header entries of {phentsize} bytes")
        if phnum > MAX_PROGRAM_HEADERS:
            raise ElfFormatError(f"{phnum} program headers")
        self.segments: list[tuple[int, int, int, int]] = []  # (p_type, p_offset, p_vaddr, p_filesz)
        table = self._at(phoff, phnum * phentsize) if phnum else b""
        for i in range(phnum):
            fields = phdr.unpack_from(table, i * phentsize)
            if self.elf_class == 64:  # p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, ...
                self.segments.append((fields[0], fields[2], fields[3], fields[5]))
            else:  # p_type, p_offset, p_vaddr, p_paddr, p_filesz, ...
                self.segments.append((fields[0], fields[1], fields[2], fields[4]))

    def _at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ElfFormatError(f"{length} bytes at offset {offset} lie outside the file ({self._size} bytes)")
        self._f.seek(offset)
        data = self._f.read(length)
        if len(data) != length:
            raise ElfFormatError(f"short read at offset {offset}")
        return data

    def _section(self, index: int) -> tuple[int, ...]:
        if self._shentsize < self._shdr.size or self._shoff == 0:
            raise ElfFormatError("no usable section header table")
        return self._shdr.unpack(self._at(self._shoff + index * self._shentsize, self._shdr.size))

    def string(self, offset: int) -> bytes:
        """The NUL-terminated string at file ``offset``."""
        data = b""
        while len(data) < MAX_STRING:
            piece = self._at(offset + len(data), min(4096, self._size - offset - len(data)))
            if not piece:
                break
            end = piece.find(b"\0")
            if end >= 0:
                return data + piece[:end]
            data += piece
        raise ElfFormatError(f"a string at offset {offset} has no end")

    def interpreter(self) -> str | None:
        for p_type, offset, _, filesz in self.segments:
            if p_type == PT_INTERP:
                return self._at(offset, filesz).split(b"\0", 1)[0].decode()
        return None

    def dynamic(self) -> list[tuple[int, int]] | None:
        """The dynamic segment's (d_tag, d_val) entries up to DT_NULL, or None without a PT_DYNAMIC."""
        for p_type, offset, _, filesz in self.segments:
            if p_type == PT_DYNAMIC:
                if filesz > MAX_DYNAMIC_BYTES:
                    raise ElfFormatError(f"a dynamic segment of {filesz} bytes")
                data = self._at(offset, filesz)
                entries = []
                for tag, value in self._dyn.iter_unpack(data[: len(data) - len(data) % self._dyn.size]):
                    if tag == DT_NULL:
                        break
                    entries.append((tag, value))
                return entries
        return None

    def file_offset(self, address: int) -> int | None:
        """The file offset of a virtual address, through the PT_LOAD segment that maps it from the file."""
        for p_type, offset, vaddr, filesz in self.segments:
            if p_type == PT_LOAD and vaddr <= address < vaddr + filesz:
                return address - vaddr + offset
        return None

    def dynstr_offset(self) -> int | None:
        """The file offset of the ``.dynstr`` section, for files whose DT_STRTAB no PT_LOAD maps."""
        if not self._shnum or self._shstrndx >= self._shnum:
            return None
        names = self._section(self._shstrndx)
        names_offset = names[4]  # sh_offset, the fifth field in both classes
        for i in range(min(self._shnum, MAX_PROGRAM_HEADERS)):
            sh = self._section(i)
            if self.string(names_offset + sh[0]) == b".dynstr":
                return sh[4]
        return None


def parse_elf(f: BinaryIO, what: str, markers: tuple[str, ...] = ()) -> ElfInfo:
    """The ELF facts of a seekable file; a malformed ELF gives an ``ElfInfo`` with ``error`` set."""
    try:
        elf = _ElfReader(f)
        interp = elf.interpreter()
        needed: list[str] = []
        rpath: list[str] = []
        runpath: list[str] = []
        soname = None
        flags_1 = 0
        dynamic = elf.dynamic()
        if dynamic:
            strtab = next((elf.file_offset(v) for t, v in dynamic if t == DT_STRTAB), None)
            if strtab is None:
                strtab = elf.dynstr_offset()

            def text(value: int) -> str:
                if strtab is None:
                    raise ElfFormatError("a dynamic segment without a string table")
                return elf.string(strtab + value).decode("utf-8", "replace")

            for tag, value in dynamic:
                if tag == DT_NEEDED:
                    needed.append(text(value))
                elif tag == DT_RPATH:
                    rpath.extend(p for p in text(value).split(":") if p)
                elif tag == DT_RUNPATH:
                    runpath.extend(p for p in text(value).split(":") if p)
                elif tag == DT_SONAME:
                    soname = text(value)
                elif tag == DT_FLAGS_1:
                    flags_1 = value
        return ElfInfo(
            elf_class=elf.elf_class,
            machine=MACHINES.get(elf.machine, f"e_machine {elf.machine}"),
            little_endian=elf.little_endian,
            type=ELF_TYPES.get(elf.type, f"e_type {elf.type}"),
            interpreter=interp,
            needed=tuple(needed),
            rpath=tuple(rpath),
            runpath=tuple(runpath),
            soname=soname,
            has_dynamic=dynamic is not None,
            pie_flag=bool(flags_1 & DF_1_PIE),
            markers=markers,
        )
    except (ElfFormatError, struct.error, UnicodeDecodeError, OSError) as exc:
        log.debug("cannot parse %s as ELF: %s", what, exc)
        return _bare_header(f, what, f"{type(exc).__name__}: {exc}", markers)


def _bare_header(f: BinaryIO, what: str, error: str, markers: tuple[str, ...]) -> ElfInfo:
    """Class and machine from the ELF identification bytes alone, for files whose headers do not parse."""
    f.seek(0)
    head = f.read(20)
    elf_class = {1: 32, 2: 64}.get(head[4] if len(head) > 4 else 0, 0)
    little = len(head) > 5 and head[5] == 1
    machine_code = int.from_bytes(head[18:20], "little" if little else "big") if len(head) >= 20 else 0
    machine = MACHINES.get(machine_code, f"e_machine {machine_code}")
    return ElfInfo(elf_class, machine, little, "unknown", None, (), (), (), None, False, False, markers, error)


@dataclass(frozen=True)
class Library:
    """One DT_NEEDED name as the dynamic loader would resolve it inside the image."""

    name: str
    needed_by: str  # the object whose DT_NEEDED lists it
    path: str | None  # the resolved path inside the image; None when missing
    via: str  # "rpath", "runpath", "LD_LIBRARY_PATH", "ld.so.conf", "default", "path", "musl path"; "" if missing

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "needed_by": self.needed_by, "path": self.path, "via": self.via}


# glibc on x86-64 (Debian multiarch and Fedora lib64 layouts) and musl's compiled-in default.
GLIBC_DEFAULT_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
MUSL_DEFAULT_DIRS = ("/lib", "/usr/local/lib", "/usr/lib")


def parse_ld_so_conf(
    read: Callable[[str], str | None], glob: Callable[[str], list[str]], path: str = "/etc/ld.so.conf"
) -> tuple[list[str], list[str]]:
    """The directories an ``ld.so.conf`` names, following ``include`` globs; returns (dirs, files read)."""
    dirs: list[str] = []
    seen: list[str] = []

    def visit(conf: str, depth: int) -> None:
        if conf in seen or depth > 8:
            return
        seen.append(conf)
        text = read(conf)
        if text is None:
            return
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include ") or line.startswith("include\t"):
                for pattern in line.split()[1:]:
                    pattern = posixpath.join(posixpath.dirname(conf), pattern)
                    for match in sorted(glob(pattern)):
                        visit(match, depth + 1)
            elif line.startswith("hwcap "):
                continue
            else:
                # Old syntax allowed "dir=type" and comma or space separated lists.
                for item in line.replace(",", " ").split():
                    item = item.split("=", 1)[0]
                    if item.startswith("/") and item not in dirs:
                        dirs.append(posixpath.normpath(item))

    visit(path, 0)
    return dirs, seen


def expand_dst(entry: str, origin: str, lib: str = "lib64", platform: str = "x86_64") -> str:
    """Expand the loader's dynamic string tokens ($ORIGIN, $LIB, $PLATFORM, also as ${...})."""
    out = entry
    for token, value in (("ORIGIN", origin), ("LIB", lib), ("PLATFORM", platform)):
        out = out.replace("${" + token + "}", value).replace("$" + token, value)
    return out


@dataclass(frozen=True)
class SearchContext:
    """What the loader consults besides the object itself: flavour, LD_LIBRARY_PATH and configured dirs."""

    libc: str  # "glibc" or "musl" (anything else searches like glibc)
    ld_library_path: tuple[str, ...]
    conf_dirs: tuple[str, ...]  # ld.so.conf(.d) for glibc, /etc/ld-musl-*.path for musl
    workdir: str = "/"


def search_library(
    name: str,
    obj_path: str,
    obj: ElfInfo,
    loader_rpaths: Sequence[tuple[str, tuple[str, ...]]],
    ctx: SearchContext,
    exists: Callable[[str], bool],
) -> tuple[str | None, str]:
    """Where ``name`` (a DT_NEEDED of ``obj`` at ``obj_path``) is found, and by which rule.

    ``loader_rpaths`` are (path, DT_RPATH) of the objects that loaded ``obj``, the executable first; glibc
    consults them after the object's own RPATH when the object has no RUNPATH.
    """
    if "/" in name:
        path = posixpath.normpath(posixpath.join(ctx.workdir, name))
        return (path, "path") if exists(path) else (None, "")
    origin = posixpath.dirname(obj_path)
    candidates: list[tuple[str, str]] = []
    if ctx.libc == "musl":
        for d in obj.rpath + obj.runpath:
            candidates.append((expand_dst(d, origin), "rpath" if d in obj.rpath else "runpath"))
        candidates += [(d, "LD_LIBRARY_PATH") for d in ctx.ld_library_path]
        dirs = ctx.conf_dirs or MUSL_DEFAULT_DIRS
        candidates += [(d, "musl path" if ctx.conf_dirs else "default") for d in dirs]
    else:
        if not obj.runpath:
            candidates += [(expand_dst(d, origin), "rpath") for d in obj.rpath]
            for loader_path, rpaths in reversed(loader_rpaths):
                candidates += [(expand_dst(d, posixpath.dirname(loader_path)), "rpath") for d in rpaths]
        candidates += [(d, "LD_LIBRARY_PATH") for d in ctx.ld_library_path]
        candidates += [(expand_dst(d, origin), "runpath") for d in obj.runpath]
        candidates += [(d, "ld.so.conf") for d in ctx.conf_dirs]
        candidates += [(d, "default") for d in GLIBC_DEFAULT_DIRS]
    tried: set[str] = set()
    for directory, via in candidates:
        if not directory:
            directory = ctx.workdir  # an empty entry means the current directory
        path = posixpath.normpath(posixpath.join(ctx.workdir, directory, name))
        if path in tried:
            continue
        tried.add(path)
        if exists(path):
            return path, via
    return None, ""


def libc_of(infos: Mapping[str, ElfInfo], executable: str) -> str:
    """The libc flavour of a program: its own evidence first, then its resolved libraries'."""
    own = infos[executable].libc() if executable in infos else "unknown"
    if own != "unknown":
        return own
    for info in infos.values():
        flavour = info.libc()
        if flavour in ("glibc", "musl"):
            return flavour
    return own
