"""Files holding keys and policies: private from the first byte, complete, never over an existing file."""

import gc
import os
import stat
from pathlib import Path

import pytest

from sconify.secretfile import write_secret_files


def test_files_written_together_are_private_and_complete_whatever_the_umask(tmp_path: Path) -> None:
    files = {"session.yml": b"name: s\n" * 1000, "report.json": b"{}\n", "empty": b"", "big": os.urandom(3 << 20)}
    old = os.umask(0)
    try:
        write_secret_files(tmp_path, files)
    finally:
        os.umask(old)
    for name, data in files.items():
        assert (tmp_path / name).read_bytes() == data
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_an_existing_file_is_never_replaced_and_no_descriptor_is_left_open(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"keep me")
    gc.collect()  # files left to the collector by earlier tests must not close during the count
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileExistsError):
        write_secret_files(tmp_path, {"a": b"first", "b": b"second"})
    assert (tmp_path / "b").read_bytes() == b"keep me"
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before
