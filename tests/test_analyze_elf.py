"""ELF facts with pyelftools, judged against binutils' readelf, and the dynamic loader's library search."""

from __future__ import annotations

import io
import re
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
