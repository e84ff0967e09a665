"""The launcher's MRENCLAVE (C, `sconify-run --measure`) equals sconify's (Python, `measure()`) on the same inputs.

Inputs vary over runtimes (the built launcher and copies with one byte of its read-only data changed),
executables (none, static and dynamic programs, a shared object, hand-made ELF files with shared pages,
.bss and unusual program headers) and every enclave setting in SCONE's notations.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from test_runtime_support import BUSYBOX, EXIT_BAD_CONFIG, EXIT_MEASUREMENT, runtime_binary  # noqa: F401

from sconify.enclave.measurement import measure
from sconify.enclave.settings import EnclaveSettings
from sconify.errors import UnsupportedError, UsageError

IDENT = b"sconify-run open runtime 1"
PAGE = 0x1000


def c_measure(runtime: Path, executable: Path | None, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """Run ``RUNTIME --measure`` with only the given settings in its environment."""
    full = dict(env or {})
    if executable is not None:
        full["SCONIFY_EXECUTABLE"] = str(executable)
    return subprocess.run([str(runtime), "--measure"], env=full, capture_output=True, text=True, timeout=120)


def py_measure(runtime: Path, executable: Path | None, env: dict[str, str] | None = None) -> str:
    """The converter's MRENCLAVE for the same inputs, settings read as sconify's options read them."""
    env = env or {}
    settings = EnclaveSettings.from_options(
        heap=env.get("SCONE_HEAP"),
        stack=env.get("SCONE_STACK"),
        threads=int(env["SCONE_THREADS"]) if "SCONE_THREADS" in env else None,
        dlopen=env.get("SCONE_ALLOW_DLOPEN"),
        debug=env["SCONE_DEBUG"] == "1" if "SCONE_DEBUG" in env else None,
    )
    exe = executable.read_bytes() if executable is not None else None
    return measure(runtime.read_bytes(), exe, settings).mrenclave.hex()


def elf(segments: list[tuple[int, int, bytes, int]], entry: int, *, e_type: int = 3, phdr: str = "outside",
        reverse: bool = False) -> bytes:
    """A small x86-64 ELF file: segments are (vaddr, p_flags, file bytes, memsz).

    ``phdr``: "outside" (the header table in no PT_LOAD), "load" (the first PT_LOAD covers the file start,
    so the table is found through it) or "explicit" (a PT_PHDR entry as well).
    """
    table = 64 + 56 * (len(segments) + (phdr in ("explicit", "load")))
    cursor = 0x1000
    offsets = []
    for vaddr, _, data, _ in segments:
        offset = cursor + vaddr % PAGE
        offsets.append(offset)
        cursor = (offset + len(data) + PAGE - 1) // PAGE * PAGE
    image = bytearray(cursor)
    loads = []
    for (vaddr, flags, data, memsz), offset in zip(segments, offsets, strict=True):
        image[offset:offset + len(data)] = data
        loads.append(struct.pack("<IIQQQQQQ", 1, flags, offset, vaddr, vaddr, len(data), memsz, PAGE))
    if phdr == "load":
        # A first segment that maps the file's first page (ELF and program headers) at 0x10000.
        loads.insert(0, struct.pack("<IIQQQQQQ", 1, 4, 0, 0x10000, 0x10000, table, table, PAGE))
    if reverse:
        loads.reverse()
    if phdr == "explicit":
        loads.insert(0, struct.pack("<IIQQQQQQ", 6, 4, 64, 0x20040, 0x20040, table - 64, table - 64, 8))
    image[0:64] = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01".ljust(16, b"\0"), e_type, 62, 1, entry, 64,
                              0, 0, 64, 56, len(loads), 0, 0, 0)
    for i, header in enumerate(loads):
        image[64 + 56 * i:64 + 56 * (i + 1)] = header
    return bytes(image)


SHARED_PAGES = elf([(0x20000, 4, b"\x01" * 0x10, 0x10), (0x20400, 5, b"\x02" * 0x30, 0x30),
                    (0x20c00, 6, b"\x03" * 0x500, 0x5000)], entry=0x20400, phdr="explicit")
BSS_AND_GAP = elf([(0x401000, 5, bytes(range(256)) * 18, 0x1234), (0x409010, 6, b"\x07" * 0x100, 0x30000)],
                  entry=0x401010, e_type=2, phdr="load", reverse=True)


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory, runtime_binary: Path) -> list[Path]:  # noqa: F811
    """The built launcher and two copies whose identification string (loaded read-only data) differs."""
    base = tmp_path_factory.mktemp("runtimes")
    data = runtime_binary.read_bytes()
    assert data.count(IDENT) == 1
    paths = [runtime_binary]
    for variant in (b"2", b"3"):
        path = base / f"sconify-run-{variant.decode()}"
        path.write_bytes(data.replace(IDENT, IDENT[:-1] + variant))
        path.chmod(0o755)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def executables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("executables")
    found = {
        "busybox (static)": BUSYBOX,
        "ls (dynamic PIE)": Path(shutil.which("ls") or "/bin/ls").resolve(),
        "libc (shared object)": Path("/lib/x86_64-linux-gnu/libc.so.6").resolve(),
    }
    for name, data in (("shared pages", SHARED_PAGES), ("bss, gap, ET_EXEC", BSS_AND_GAP)):
        path = base / name.replace(" ", "_").replace(",", "")
        path.write_bytes(data)
        found[name] = path
    for name, path in found.items():
        if not path.exists():
            pytest.skip(f"{path} ({name}) is missing on this machine")
    return found


# (runtime index, executable name or None, settings): at least one of every kind, 20 combinations.
GRID = [
    (0, None, {}),
    (0, "busybox (static)", {}),
    (0, "ls (dynamic PIE)", {"SCONE_HEAP": "1G"}),
    (0, "libc (shared object)", {"SCONE_THREADS": "3"}),
    (0, "shared pages", {"SCONE_STACK": "3000"}),
    (0, "bss, gap, ET_EXEC", {"SCONE_DEBUG": "1"}),
    (1, None, {"SCONE_ALLOW_DLOPEN": "protected"}),
    (1, "busybox (static)", {"SCONE_ALLOW_DLOPEN": "unprotected", "SCONE_DEBUG": "1"}),
    (2, "busybox (static)", {"SCONE_ALLOW_DLOPEN": "off", "SCONE_DEBUG": "0"}),
    (2, "ls (dynamic PIE)", {"SCONE_HEAP": "16G", "SCONE_THREADS": "64", "SCONE_STACK": "8M"}),
    (0, "busybox (static)", {"SCONE_HEAP": "64MiB", "SCONE_STACK": "256k", "SCONE_THREADS": "1"}),
    (0, "busybox (static)", {"SCONE_HEAP": " 100 mb ", "SCONE_ALLOW_DLOPEN": "1"}),
    (0, "busybox (static)", {"SCONE_HEAP": "67108865", "SCONE_ALLOW_DLOPEN": "2"}),
    (1, "shared pages", {"SCONE_HEAP": "256M", "SCONE_THREADS": "4096", "SCONE_STACK": "4K"}),
    (2, "bss, gap, ET_EXEC", {"SCONE_STACK": "1G", "SCONE_THREADS": "2", "SCONE_HEAP": "4k"}),
    (0, "libc (shared object)", {"SCONE_HEAP": "2g", "SCONE_DEBUG": "1", "SCONE_ALLOW_DLOPEN": "PROTECTED"}),
]


@pytest.mark.parametrize(("runtime_index", "executable", "settings"), GRID,
                         ids=[f"{r}-{e}-{'-'.join(f'{k[6:]}={v}' for k, v in s.items())}" for r, e, s in GRID])
def test_c_and_python_measure_the_same(runtimes: list[Path], executables: dict[str, Path], runtime_index: int,
                                       executable: str | None, settings: dict[str, str]) -> None:
    runtime = runtimes[runtime_index]
    exe = executables[executable] if executable is not None else None
    done = c_measure(runtime, exe, settings)
    assert done.returncode == 0, done.stderr
    assert done.stdout == py_measure(runtime, exe, settings) + "\n"


def test_each_input_changes_the_measurement(runtimes: list[Path], executables: dict[str, Path]) -> None:
    """The grid is not vacuous: runtimes, executables and settings each give another MRENCLAVE."""
    busybox = executables["busybox (static)"]
    results = {
        c_measure(runtimes[0], busybox).stdout,
        c_measure(runtimes[1], busybox).stdout,
        c_measure(runtimes[0], None).stdout,
        c_measure(runtimes[0], executables["ls (dynamic PIE)"]).stdout,
        c_measure(runtimes[0], busybox, {"SCONE_HEAP": "128M"}).stdout,
        c_measure(runtimes[0], busybox, {"SCONE_STACK": "2M"}).stdout,
        c_measure(runtimes[0], busybox, {"SCONE_THREADS": "9"}).stdout,
        c_measure(runtimes[0], busybox, {"SCONE_ALLOW_DLOPEN": "protected"}).stdout,
        c_measure(runtimes[0], busybox, {"SCONE_DEBUG": "1"}).stdout,
    }
    assert len(results) == 9


def test_unset_and_empty_settings_take_the_defaults(runtimes: list[Path]) -> None:
    defaults = {"SCONE_HEAP": "64M", "SCONE_STACK": "1M", "SCONE_THREADS": "8", "SCONE_ALLOW_DLOPEN": "off",
                "SCONE_DEBUG": "0"}
    empty = {name: "" for name in defaults}
    assert c_measure(runtimes[0], BUSYBOX).stdout == c_measure(runtimes[0], BUSYBOX, defaults).stdout
    assert c_measure(runtimes[0], BUSYBOX, empty).stdout == c_measure(runtimes[0], BUSYBOX, defaults).stdout


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"SCONE_HEAP": "64X"}, "SCONE_HEAP"),
        ({"SCONE_HEAP": "0"}, "SCONE_HEAP"),
        ({"SCONE_HEAP": "2T"}, "SCONE_HEAP"),
        ({"SCONE_HEAP": "99999999999999999999999G"}, "SCONE_HEAP"),
        ({"SCONE_STACK": "2G"}, "SCONE_STACK"),
        ({"SCONE_STACK": "1 M B"}, "SCONE_STACK"),
        ({"SCONE_THREADS": "0"}, "SCONE_THREADS"),
        ({"SCONE_THREADS": "4097"}, "SCONE_THREADS"),
        ({"SCONE_ALLOW_DLOPEN": "sometimes"}, "SCONE_ALLOW_DLOPEN"),
        ({"SCONE_DEBUG": "2"}, "SCONE_DEBUG"),
    ],
)
def test_settings_sconify_refuses_are_refused(runtimes: list[Path], settings: dict[str, str], named: str) -> None:
    (name, value), = settings.items()
    if name != "SCONE_DEBUG":  # sconify takes debug as a flag, not as text
        with pytest.raises(UsageError):
            py_measure(runtimes[0], None, settings)
    done = c_measure(runtimes[0], None, settings)
    assert done.returncode == EXIT_BAD_CONFIG
    assert done.stdout == ""
    assert done.stderr.startswith("sconify-run: ") and named in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"#!/bin/sh\necho not a program\n", "not an ELF file"),
        (SHARED_PAGES[:4] + b"\x01" + SHARED_PAGES[5:], "32-bit"),
        (SHARED_PAGES[:18] + struct.pack("<H", 183) + SHARED_PAGES[20:], "machine type 183"),
        (elf([(0x1000, 5, b"a" * 0x200, 0x200), (0x1100, 6, b"b", 0x10)], 0x1000), "overlap"),
        (elf([(0x1000, 5, b"\xc3" * 16, 16)], 0x9000), "entry point 0x9000 is outside"),
        (elf([(0x1000, 5, b"\xc3" * 16, 16)], 0x1000)[:0x1008], "runs past the end of the file"),
    ],
)
def test_executables_sconify_cannot_measure_are_refused(runtimes: list[Path], tmp_path: Path, data: bytes,
                                                        reason: str) -> None:
    path = tmp_path / "program"
    path.write_bytes(data)
    with pytest.raises(UnsupportedError, match=reason):
        py_measure(runtimes[0], path)
    done = c_measure(runtimes[0], path)
    assert done.returncode == EXIT_MEASUREMENT
    assert reason in done.stderr and str(path) in done.stderr


def test_measure_needs_no_session_and_takes_no_arguments(runtimes: list[Path]) -> None:
    done = subprocess.run([str(runtimes[0]), "--measure", "extra"], env={}, capture_output=True, text=True)
    assert done.returncode == 2 and "--measure takes no arguments" in done.stderr
