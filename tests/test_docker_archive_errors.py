"""Bad docker-archives through the command line: one clear line on stderr, the documented exit code, no
traceback and no output file (missing file, unknown tag, corrupt layer, truncated gzip layer, not a tar)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from infra.images import skopeo

from sconify.errors import IntegrityError, NotFoundError

SCONIFY = [sys.executable, "-m", "sconify"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SCONIFY, *args], capture_output=True, text=True, timeout=120)


def assert_refused(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """One ``sconify: error:`` line naming ``words``, exit ``code``, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sconify: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture(scope="module")
def archive(busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A legacy docker-archive of the busybox image written by skopeo, tagged sconify-test/bb:1."""
    path = tmp_path_factory.mktemp("archive") / "bb.tar"
    skopeo("copy", busybox_image, f"docker-archive:{path}:sconify-test/bb:1")
    return path


def rewrite(source: Path, target: Path, change) -> Path:  # noqa: ANN001 - change(name, data) -> bytes
    """Copy a tar, passing every regular member's bytes through ``change``."""
    with tarfile.open(source) as src, tarfile.open(target, "w") as out:
        for member in src.getmembers():
            if member.isfile():
                data = change(member.name, src.extractfile(member).read())  # type: ignore[union-attr]
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
            else:
                out.addfile(member)
    return target


def layer_names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return json.loads(tar.extractfile("manifest.json").read())[0]["Layers"]  # type: ignore[union-attr]


def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_missing_archive(tmp_path):
    out = out_dir(tmp_path)
    proc = run_cli("copy", f"docker-archive:{tmp_path}/nope.tar", f"oci:{out}/x:t")
    assert_refused(proc, NotFoundError.exit_code, "nope.tar", "does not exist")
    assert list(out.iterdir()) == []


def test_archive_without_the_named_tag(archive, tmp_path):
    out = out_dir(tmp_path)
    proc = run_cli("copy", f"docker-archive:{archive}:sconify-test/bb:9", f"docker-archive:{out}/x.tar")
    assert_refused(proc, NotFoundError.exit_code, "sconify-test/bb:9", "sconify-test/bb:1")
    assert list(out.iterdir()) == []


def test_flipped_byte_in_a_layer_is_caught(archive, tmp_path):
    layers = layer_names(archive)

    def flip(name: str, data: bytes) -> bytes:
        if name != layers[0]:
            return data
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01  # inside busybox's bytes: the tar stays well-formed
        return bytes(flipped)

    bad = rewrite(archive, tmp_path / "bad.tar", flip)
    out = out_dir(tmp_path)
    proc = run_cli("copy", f"docker-archive:{bad}", f"oci-archive:{out}/x.tar")
    assert_refused(proc, IntegrityError.exit_code, "corrupt")
    assert list(out.iterdir()) == []


def test_truncated_gzip_layer_is_caught(archive, tmp_path):
    layers = layer_names(archive)

    def truncate(name: str, data: bytes) -> bytes:
        return gzip.compress(data, mtime=0)[: len(data) // 4] if name == layers[0] else data

    bad = rewrite(archive, tmp_path / "trunc.tar", truncate)
    out = out_dir(tmp_path)
    proc = run_cli("copy", f"docker-archive:{bad}", f"docker-archive:{out}/x.tar:a/b:1")
    assert_refused(proc, IntegrityError.exit_code, "truncated gzip")
    assert list(out.iterdir()) == []


def test_a_file_that_is_not_a_tar(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive\n" * 100)
    out = out_dir(tmp_path)
    proc = run_cli("copy", f"docker-archive:{junk}", f"oci:{out}/x:t")
    assert_refused(proc, IntegrityError.exit_code, "junk.tar", "not a readable tar archive")
    assert list(out.iterdir()) == []


def test_inspect_reports_the_same_way(archive):
    proc = run_cli("inspect", f"docker-archive:{archive}:@4")
    assert_refused(proc, NotFoundError.exit_code, "@4")
