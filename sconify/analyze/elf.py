"""ELF facts the analyzer needs (class, machine, static or dynamic, PIE, PT_INTERP, DT_NEEDED, RPATH,
RUNPATH, libc flavour), read with pyelftools, and the dynamic loader's library search inside an image."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

log = logging.getLogger(__name__)

ELF_MAGIC = b"\x7fELF"
DF_1_PIE = 0x08000000

# e_machine names in the words people use (and ``uname -m`` prints).
MACHINES = {
    "EM_X86_64": "x86-64",
    "EM_386": "i386",
    "EM_AARCH64": "aarch64",
    "EM_ARM": "arm",
    "EM_RISCV": "riscv",
    "EM_PPC64": "ppc64",
    "EM_PPC": "ppc",
    "EM_S390": "s390x",
    "EM_MIPS": "mips",
    "EM_LOONGARCH": "loongarch",
}
ELF_TYPES = {"ET_EXEC": "exec", "ET_DYN": "dyn", "ET_REL": "rel", "ET_CORE": "core"}

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


def parse_elf(f: BinaryIO, what: str, markers: tuple[str, ...] = ()) -> ElfInfo:
    """The ELF facts of a seekable file; a malformed ELF gives an ``ElfInfo`` with ``error`` set."""
    try:
        elf = ELFFile(f)
        machine_raw = str(elf["e_machine"])
        machine = MACHINES.get(machine_raw, machine_raw.removeprefix("EM_").lower())
        etype_raw = str(elf["e_type"])
        interp = None
        needed: list[str] = []
        rpath: list[str] = []
        runpath: list[str] = []
        soname = None
        flags_1 = 0
        has_dynamic = False
        for seg in elf.iter_segments():
            kind = seg["p_type"]
            if kind == "PT_INTERP":
                interp = seg.get_interp_name()  # type: ignore[attr-defined]
            elif kind == "PT_DYNAMIC":
                has_dynamic = True
                for tag in seg.iter_tags():  # type: ignore[attr-defined]
                    name = tag.entry.d_tag
                    if name == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif name == "DT_RPATH":
                        rpath.extend(p for p in tag.rpath.split(":") if p)
                    elif name == "DT_RUNPATH":
                        runpath.extend(p for p in tag.runpath.split(":") if p)
                    elif name == "DT_SONAME":
                        soname = tag.soname
                    elif name == "DT_FLAGS_1":
                        flags_1 = int(tag.entry.d_val)
        return ElfInfo(
            elf_class=int(elf.elfclass),
            machine=machine,
            little_endian=bool(elf.little_endian),
            type=ELF_TYPES.get(etype_raw, etype_raw),
            interpreter=interp,
            needed=tuple(needed),
            rpath=tuple(rpath),
            runpath=tuple(runpath),
            soname=soname,
            has_dynamic=has_dynamic,
            pie_flag=bool(flags_1 & DF_1_PIE),
            markers=markers,
        )
    except (ELFError, ValueError, KeyError, UnicodeDecodeError, OSError, AssertionError, AttributeError,
            TypeError, IndexError) as exc:
        # pyelftools raises many kinds of exception on malformed input; any of them means "not a usable ELF".
        log.debug("cannot parse %s as ELF: %s", what, exc)
        return _bare_header(f, what, f"{type(exc).__name__}: {exc}", markers)


def _bare_header(f: BinaryIO, what: str, error: str, markers: tuple[str, ...]) -> ElfInfo:
    """Class and machine from the ELF identification bytes alone, for files pyelftools rejects."""
    f.seek(0)
    head = f.read(20)
    elf_class = {1: 32, 2: 64}.get(head[4] if len(head) > 4 else 0, 0)
    little = len(head) > 5 and head[5] == 1
    machine_code = int.from_bytes(head[18:20], "little" if little else "big") if len(head) >= 20 else 0
    machine = {62: "x86-64", 3: "i386", 183: "aarch64", 40: "arm", 243: "riscv"}.get(machine_code,
                                                                                   f"e_machine {machine_code}")
    return ElfInfo(elf_class, machine, little, "unknown", None, (), (), (), None, False, False, markers, error)


# --------------------------------------------------------------------------------------------- libraries


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
