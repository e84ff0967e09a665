"""ELF facts, judged against pyelftools and binutils' readelf, and the dynamic loader's library search."""

from __future__ import annotations

import io
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sconify.analyze.elf import (
    ElfInfo,
    SearchContext,
    expand_dst,
    is_elf,
    parse_elf,
    parse_ld_so_conf,
    scan_markers,
    search_library,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.elf import aarch64_program  # noqa: E402

C_PROGRAM = "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n"


def _readelf_dynamic(path: Path) -> dict[str, list[str]]:
    out = subprocess.run(["readelf", "-dW", str(path)], capture_output=True, text=True, check=True).stdout
    found: dict[str, list[str]] = {"NEEDED": [], "RPATH": [], "RUNPATH": []}
    for line in out.splitlines():
        m = re.search(r"\((NEEDED|RPATH|RUNPATH)\)\s+.*\[(.*)\]", line)
        if m:
            found[m.group(1)].extend(p for p in m.group(2).split(":") if p)
    return found


def _readelf_header(path: Path) -> dict[str, str]:
    out = subprocess.run(["readelf", "-hlW", str(path)], capture_output=True, text=True, check=True).stdout
    interp = re.search(r"Requesting program interpreter: (.*)\]", out)
    return {
        "class": re.search(r"Class:\s+(\S+)", out).group(1),  # type: ignore[union-attr]
        "type": re.search(r"Type:\s+(\S+)", out).group(1),  # type: ignore[union-attr]
        "machine": re.search(r"Machine:\s+(.*)", out).group(1).strip(),  # type: ignore[union-attr]
        "interp": interp.group(1) if interp else "",
    }


def _parse(path: Path) -> ElfInfo:
    data = path.read_bytes()
    return parse_elf(io.BytesIO(data), str(path), scan_markers([data]))


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small programs compiled here with gcc in the ways images ship them."""
    base = tmp_path_factory.mktemp("elf")
    source = base / "p.c"
    source.write_text(C_PROGRAM)
    variants = {
        "pie": ["-fPIE", "-pie"],
        "nopie": ["-no-pie"],
        "static": ["-static"],
        "static-pie": ["-static-pie"],
        "rpath": ["-Wl,--disable-new-dtags,-rpath,$ORIGIN/../lib:/opt/x/lib"],
        "runpath": ["-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib"],
    }
    out = {}
    for name, flags in variants.items():
        target = base / name
        subprocess.run(["gcc", "-O1", "-o", str(target), str(source), *flags], check=True, capture_output=True)
        out[name] = target
    return out


@pytest.mark.parametrize("name", ["pie", "nopie", "static", "static-pie", "rpath", "runpath"])
def test_facts_match_readelf(programs: dict[str, Path], name: str) -> None:
    path = programs[name]
    info = _parse(path)
    header = _readelf_header(path)
    dynamic = _readelf_dynamic(path)
    assert info.error is None
    assert info.elf_class == (64 if header["class"] == "ELF64" else 32)
    assert info.machine == "x86-64" and "X86-64" in header["machine"]
    assert info.type == {"EXEC": "exec", "DYN": "dyn"}[header["type"]]
    assert (info.interpreter or "") == header["interp"]
    assert list(info.needed) == dynamic["NEEDED"]
    assert list(info.rpath) == dynamic["RPATH"]
    assert list(info.runpath) == dynamic["RUNPATH"]


def test_linking_and_pie_flags(programs: dict[str, Path]) -> None:
    pie, nopie, static, static_pie = (_parse(programs[n]) for n in ("pie", "nopie", "static", "static-pie"))
    assert pie.pie and not pie.static
    assert not nopie.pie and nopie.type == "exec" and not nopie.static
    assert static.static and not static.pie
    assert static_pie.static and static_pie.pie


def test_libc_flavour_of_dynamic_and_static_glibc_programs(programs: dict[str, Path]) -> None:
    assert _parse(programs["pie"]).libc() == "glibc"
    # a static program has no loader or NEEDED: its libc shows only in its bytes
    assert _parse(programs["static"]).libc() == "glibc"


def test_host_python_is_a_non_pie_dynamic_program() -> None:
    python = Path("/usr/bin/python3.11")
    if not python.exists():
        pytest.skip("python3.11 is not installed here")
    info = _parse(python)
    assert list(info.needed) == _readelf_dynamic(python)["NEEDED"]
    assert info.type == {"EXEC": "exec", "DYN": "dyn"}[_readelf_header(python)["type"]]


def test_aarch64_program_is_read_as_aarch64() -> None:
    data = aarch64_program(b"hello\n")
    assert is_elf(data)
    info = parse_elf(io.BytesIO(data), "aarch64")
    assert (info.machine, info.elf_class, info.is_x86_64) == ("aarch64", 64, False)
    assert info.static


def test_damaged_elf_reports_an_error_and_keeps_its_identity() -> None:
    data = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00" + b"\xff" * 20
    info = parse_elf(io.BytesIO(data), "damaged")
    assert info.error
    assert info.machine == "x86-64" and info.elf_class == 64


def test_markers_are_found_across_chunk_borders() -> None:
    text = b"xxxxGNU C Libraryyyyy"
    chunks = [text[:8], text[8:12], text[12:]]
    assert scan_markers(chunks) == ("glibc",)
    assert scan_markers([b"\xff Go buildinf:\x08\x02"]) == ("go",)
    assert scan_markers([b"nothing here"]) == ()


def _info(needed: tuple[str, ...] = (), rpath: tuple[str, ...] = (), runpath: tuple[str, ...] = (),
          interp: str | None = "/lib64/ld-linux-x86-64.so.2") -> ElfInfo:
    return ElfInfo(64, "x86-64", True, "dyn", interp, needed, rpath, runpath, None, True, False, ())


def test_rpath_comes_before_ld_library_path_and_runpath_after() -> None:
    files = {"/opt/app/lib/libx.so", "/env/libx.so", "/usr/lib/libx.so"}
    ctx = SearchContext("glibc", ("/env",), (), "/")
    with_rpath = _info(rpath=("$ORIGIN/../lib",))
    assert search_library("libx.so", "/opt/app/bin/prog", with_rpath, [], ctx, files.__contains__) == \
        ("/opt/app/lib/libx.so", "rpath")
    with_runpath = _info(runpath=("$ORIGIN/../lib",))
    assert search_library("libx.so", "/opt/app/bin/prog", with_runpath, [], ctx, files.__contains__) == \
        ("/env/libx.so", "LD_LIBRARY_PATH")
    no_env = SearchContext("glibc", (), (), "/")
    assert search_library("libx.so", "/opt/app/bin/prog", with_runpath, [], no_env, files.__contains__) == \
        ("/opt/app/lib/libx.so", "runpath")


def test_runpath_disables_rpath_and_the_loaders_rpath_applies_to_dependencies() -> None:
    files = {"/rp/liby.so", "/usr/lib/x86_64-linux-gnu/liby.so"}
    ctx = SearchContext("glibc", (), (), "/")
    both = _info(rpath=("/rp",), runpath=("/nowhere",))
    assert search_library("liby.so", "/p", both, [], ctx, files.__contains__) == \
        ("/usr/lib/x86_64-linux-gnu/liby.so", "default")
    lib = _info()
    # a library without RUNPATH is searched with its loader's RPATH too
    assert search_library("liby.so", "/usr/lib/libz.so", lib, [("/p", ("/rp",))], ctx, files.__contains__) == \
        ("/rp/liby.so", "rpath")


def test_ld_so_conf_directories_come_before_defaults_and_missing_is_none() -> None:
    files = {"/custom/libq.so", "/lib/libq.so"}
    ctx = SearchContext("glibc", (), ("/custom",), "/")
    assert search_library("libq.so", "/p", _info(), [], ctx, files.__contains__) == ("/custom/libq.so", "ld.so.conf")
    assert search_library("libnone.so", "/p", _info(), [], ctx, files.__contains__) == (None, "")


def test_musl_uses_its_path_file_or_its_defaults() -> None:
    files = {"/usr/local/lib/libm.so", "/musl/libm.so"}
    default = SearchContext("musl", (), (), "/")
    assert search_library("libm.so", "/p", _info(), [], default, files.__contains__) == \
        ("/usr/local/lib/libm.so", "default")
    configured = SearchContext("musl", (), ("/musl",), "/")
    assert search_library("libm.so", "/p", _info(), [], configured, files.__contains__) == \
        ("/musl/libm.so", "musl path")


def test_dynamic_string_tokens() -> None:
    assert expand_dst("$ORIGIN/../lib", "/opt/a/bin") == "/opt/a/bin/../lib"
    assert expand_dst("${ORIGIN}/x:$PLATFORM", "/o") == "/o/x:x86_64"


def test_ld_so_conf_includes_are_followed_in_name_order() -> None:
    files = {
        "/etc/ld.so.conf": "include /etc/ld.so.conf.d/*.conf\n/usr/local/lib # trailing comment\n",
        "/etc/ld.so.conf.d/b.conf": "/opt/b/lib\n",
        "/etc/ld.so.conf.d/a.conf": "# a comment\n/opt/a/lib\ninclude /etc/ld.so.conf\n",
        "/etc/ld.so.conf.d/README": "/not/read\n",
    }

    def glob(pattern: str) -> list[str]:
        import fnmatch

        return [p for p in files if fnmatch.fnmatchcase(p, pattern)]

    dirs, read = parse_ld_so_conf(files.get, glob)
    assert dirs == ["/opt/a/lib", "/opt/b/lib", "/usr/local/lib"]
    assert "/etc/ld.so.conf.d/README" not in read


def _pyelftools_facts(f: io.BufferedIOBase | io.BytesIO) -> tuple:
    """The facts as pyelftools reads them: the independent judge of sconify's own ELF reader."""
    from elftools.elf.elffile import ELFFile

    elf = ELFFile(f)
    interp, needed, rpath, runpath, soname, flags_1, dynamic = None, [], [], [], None, 0, False
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_INTERP":
            interp = seg.get_interp_name()
        elif seg["p_type"] == "PT_DYNAMIC":
            dynamic = True
            for tag in seg.iter_tags():
                name = tag.entry.d_tag
                if name == "DT_NEEDED":
                    needed.append(tag.needed)
                elif name == "DT_RPATH":
                    rpath += [p for p in tag.rpath.split(":") if p]
                elif name == "DT_RUNPATH":
                    runpath += [p for p in tag.runpath.split(":") if p]
                elif name == "DT_SONAME":
                    soname = tag.soname
                elif name == "DT_FLAGS_1":
                    flags_1 = int(tag.entry.d_val)
    kind = {"ET_EXEC": "exec", "ET_DYN": "dyn", "ET_REL": "rel", "ET_CORE": "core"}[elf["e_type"]]
    return (elf.elfclass, elf.little_endian, kind, interp, tuple(needed), tuple(rpath), tuple(runpath), soname,
            dynamic, bool(flags_1 & 0x08000000))


def _facts(info: ElfInfo) -> tuple:
    return (info.elf_class, info.little_endian, info.type, info.interpreter, info.needed, info.rpath, info.runpath,
            info.soname, info.has_dynamic, info.pie_flag)


def _host_elfs(limit: int) -> list[Path]:
    found = []
    for folder in ("/usr/bin", "/usr/sbin", "/usr/lib/x86_64-linux-gnu", sys.base_prefix + "/lib"):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name) if os.path.isdir(folder) else ():
            if entry.is_file(follow_symlinks=False) and entry.stat().st_size > 64:
                with open(entry.path, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        found.append(Path(entry.path))
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def test_the_facts_of_this_machines_programs_and_libraries_match_pyelftools() -> None:
    paths = _host_elfs(400)
    assert len(paths) > 100
    dynamic = 0
    for path in paths:
        with open(path, "rb") as f:
            info = parse_elf(f, str(path))
            f.seek(0)
            assert info.error is None, (path, info.error)
            assert _facts(info) == _pyelftools_facts(f), path
            dynamic += bool(info.needed)
    assert dynamic > len(paths) // 2  # the sample is mostly dynamic programs and libraries, with DT_NEEDED to read


def _synthetic_elf(elf_class: int, little: bool, strtab_mapped: bool) -> bytes:
    """A small ELF of either class and byte order: PT_INTERP, PT_LOAD, PT_DYNAMIC (NEEDED, RUNPATH, SONAME,
    FLAGS_1) and a section table with .dynstr. Without ``strtab_mapped`` no PT_LOAD maps DT_STRTAB's address, so
    the string table is found through the section headers, as pyelftools and readelf do."""
    o = "<" if little else ">"
    strings = b"\0libfoo.so.1\0/opt/lib:$ORIGIN\0libself.so\0libbar.so\0"
    shstr = b"\0.dynstr\0.shstrtab\0"
    interp = b"/lib/ld-test.so.1\0"
    word = "Q" if elf_class == 64 else "I"
    ehsize, phsize, shsize = (64, 56, 64) if elf_class == 64 else (52, 32, 40)
    dyn_fmt = o + ("qQ" if elf_class == 64 else "iI")
    phnum = 3
    interp_at = ehsize + phnum * phsize
    strtab_at = interp_at + len(interp)
    shstr_at = strtab_at + len(strings)
    dyn_at = (shstr_at + len(shstr) + 7) & ~7
    dynamic = [(5, 0x400000 + strtab_at if strtab_mapped else 0x900000), (1, 1), (29, 13), (14, 30), (1, 41),
               (0x6FFFFFFB, 0x08000001), (0, 0)]
    dyn = b"".join(struct.pack(dyn_fmt, t, v) for t, v in dynamic)
    sh_at = dyn_at + len(dyn)
    size = sh_at + 3 * shsize

    def phdr(p_type: int, offset: int, vaddr: int, filesz: int) -> bytes:
        if elf_class == 64:
            return struct.pack(o + "IIQQQQQQ", p_type, 4, offset, vaddr, vaddr, filesz, filesz, 8)
        return struct.pack(o + "IIIIIIII", p_type, offset, vaddr, vaddr, filesz, filesz, 4, 4)

    def shdr(name: int, sh_type: int, offset: int, length: int) -> bytes:
        fmt = o + ("IIQQQQIIQQ" if elf_class == 64 else "IIIIIIIIII")
        return struct.pack(fmt, name, sh_type, 0, 0, offset, length, 0, 0, 1, 0)

    ident = b"\x7fELF" + bytes([1 if elf_class == 32 else 2, 1 if little else 2, 1]) + bytes(9)
    header = ident + struct.pack(o + "HHI" + word * 3 + "IHHHHHH", 3, 20 if elf_class == 32 else 21, 1, 0,
                                 ehsize, sh_at, 0, ehsize, phsize, phnum, shsize, 3, 2)
    load_size = dyn_at if strtab_mapped else interp_at
    data = (header + phdr(3, interp_at, 0x400000 + interp_at, len(interp)) + phdr(1, 0, 0x400000, load_size)
            + phdr(2, dyn_at, 0x400000 + dyn_at, len(dyn)) + interp + strings + shstr)
    data += bytes(dyn_at - len(data)) + dyn
    data += bytes(shsize) + shdr(1, 3, strtab_at, len(strings)) + shdr(9, 3, shstr_at, len(shstr))
    assert len(data) == size
    return data


@pytest.mark.parametrize("elf_class", [32, 64])
@pytest.mark.parametrize("little", [True, False], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("strtab_mapped", [True, False], ids=["strtab-mapped", "strtab-by-section"])
def test_either_class_and_byte_order_match_pyelftools_and_readelf(
    tmp_path: Path, elf_class: int, little: bool, strtab_mapped: bool
) -> None:
    data = _synthetic_elf(elf_class, little, strtab_mapped)
    info = parse_elf(io.BytesIO(data), "synthetic")
    assert info.error is None, info.error
    assert _facts(info) == _pyelftools_facts(io.BytesIO(data))
    assert info.needed == ("libfoo.so.1", "libbar.so") and info.runpath == ("/opt/lib", "$ORIGIN")
    assert info.soname == "libself.so" and info.interpreter == "/lib/ld-test.so.1" and info.pie_flag
    assert info.machine == ("ppc" if elf_class == 32 else "ppc64") and info.type == "dyn"
    path = tmp_path / "synthetic"
    path.write_bytes(data)
    assert _readelf_dynamic(path) == {"NEEDED": ["libfoo.so.1", "libbar.so"], "RPATH": [],
                                      "RUNPATH": ["/opt/lib", "$ORIGIN"]}
    assert _readelf_header(path)["interp"] == "/lib/ld-test.so.1"


def test_damaged_elf_files_never_raise_and_keep_their_identity() -> None:
    rng = random.Random(20261126)
    sources = [p.read_bytes() for p in _host_elfs(400) if p.stat().st_size < 4 << 20][:6]
    sources.append(_synthetic_elf(64, True, False))
    assert len(sources) >= 3
    errors = 0
    for _ in range(3000):
        data = bytearray(rng.choice(sources))
        data = data[: rng.choice([16, 52, 64, 300, 4096, len(data)])]
        for _ in range(rng.randint(1, 6)):  # mostly in the headers, where the offsets and counts are
            data[rng.randrange(min(len(data), rng.choice([64, 512, 4096, len(data)])))] = rng.randrange(256)
        info = parse_elf(io.BytesIO(bytes(data)), "damaged")
        if info.error is not None:
            errors += 1
            assert info.type == "unknown" and not info.needed
        else:
            assert info.elf_class in (32, 64)
    assert 0 < errors < 3000
