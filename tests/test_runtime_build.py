"""scripts/build-runtime makes a static, stripped, reproducible sconify-run that runs in an image without libc."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from test_runtime_support import (  # noqa: F401 (runtime_binary is a fixture)
    BUILD_SCRIPT,
    BUSYBOX,
    ROOT,
    python_mrenclave,
    require_chroot,
    runtime_binary,
)

from sconify.enclave.settings import EnclaveSettings


def test_the_launcher_is_a_static_stripped_x86_64_program(runtime_binary: Path) -> None:  # noqa: F811
    with runtime_binary.open("rb") as f:
        elf = ELFFile(f)
        assert (elf.elfclass, elf["e_machine"]) == (64, "EM_X86_64")
        assert not any(seg["p_type"] == "PT_INTERP" for seg in elf.iter_segments())
        dynamic = elf.get_section_by_name(".dynamic")  # static-pie: only for relocating itself
        assert isinstance(dynamic, DynamicSection)
        assert [tag for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"] == []
        assert elf.get_section_by_name(".symtab") is None
    assert os.access(runtime_binary, os.X_OK)


def test_the_binary_names_no_build_path(runtime_binary: Path) -> None:  # noqa: F811
    data = runtime_binary.read_bytes()
    assert str(ROOT).encode() not in data
    assert b"/runtime/src" not in data


def test_a_build_elsewhere_gives_the_same_bytes(runtime_binary: Path, tmp_path: Path) -> None:  # noqa: F811
    copy = tmp_path / "another" / "checkout"
    for part in ("scripts", "runtime/src"):
        shutil.copytree(ROOT / part, copy / part)
    out = tmp_path / "out" / "sconify-run"
    done = subprocess.run([str(copy / "scripts/build-runtime"), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == runtime_binary.read_bytes()
    again = subprocess.run([str(copy / "scripts/build-runtime"), "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_it_runs_in_a_root_with_nothing_else(runtime_binary: Path, tmp_path: Path) -> None:  # noqa: F811
    """No libc, no shell, no /etc: only the launcher, the measured program and /proc."""
    require_chroot()
    root = tmp_path / "empty"
    (root / "proc").mkdir(parents=True)
    shutil.copy2(runtime_binary, root / "sconify-run")
    shutil.copy2(BUSYBOX, root / "program")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
         'mount -t proc proc "$0/proc" && exec chroot "$0" /sconify-run --measure', str(root)],
        env={"SCONIFY_EXECUTABLE": "/program", "SCONE_HEAP": "32M"}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == python_mrenclave(runtime_binary, BUSYBOX, EnclaveSettings.from_options(heap="32M"))
    assert sorted(os.listdir(root)) == ["proc", "program", "sconify-run"]


def test_unknown_options_of_the_build_script_are_refused() -> None:
    done = subprocess.run([str(BUILD_SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument '--bogus'" in done.stderr
