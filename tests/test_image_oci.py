"""The oci: and oci-archive: transports, judged by umoci and skopeo, and their refusals through the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sconify.errors import IntegrityError, NotFoundError, UnsupportedError
from sconify.image.copy import write_image
from sconify.image.model import Platform
from sconify.image.reference import parse_reference
from sconify.image.transports import open_destination, open_image

SCONIFY = [sys.executable, "-m", "sconify"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*SCONIFY, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def umoci_layout(tmp_path_factory) -> Path:
    """A two-layer image made by umoci, an independent writer of OCI layouts."""
    base = tmp_path_factory.mktemp("umoci")
    layout = base / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:t1"], check=True)
    for i in range(2):
        root = base / f"rootfs{i}"
        (root / "data").mkdir(parents=True)
        (root / "data" / f"file{i}.txt").write_text(f"layer {i} content\n" * 100)
        subprocess.run(["umoci", "insert", "--image", f"{layout}:t1", str(root), "/"], check=True, capture_output=True)
    subprocess.run(["umoci", "config", "--image", f"{layout}:t1", "--config.cmd", "/bin/true"], check=True)
    return layout


def copy(src: str, dst: str):
    return write_image(open_image(parse_reference(src)), open_destination(parse_reference(dst)))


def test_oci_to_oci_keeps_every_digest(umoci_layout, tmp_path):
    source = open_image(parse_reference(f"oci:{umoci_layout}:t1"))
    result = copy(f"oci:{umoci_layout}:t1", f"oci:{tmp_path}/out:v1")
    assert result.digest == source.digest
    copied = open_image(parse_reference(f"oci:{tmp_path}/out:v1"))
    assert copied.manifest_bytes == source.manifest_bytes
    assert [la.descriptor.digest for la in copied.layers] == [la.descriptor.digest for la in source.layers]


def test_umoci_and_skopeo_accept_our_layout(umoci_layout, tmp_path):
    copy(f"oci:{umoci_layout}:t1", f"oci:{tmp_path}/out:v1")
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{tmp_path}/out:v1", str(tmp_path / "b")],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "b/rootfs/data/file1.txt").read_text().startswith("layer 1 content")
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci:{tmp_path}/out:v1"], check=True, capture_output=True, text=True
        ).stdout
    )
    assert len(info["Layers"]) == 2


def test_oci_archive_round_trip_keeps_digest_and_is_deterministic(umoci_layout, tmp_path):
    first = copy(f"oci:{umoci_layout}:t1", f"oci-archive:{tmp_path}/a.tar:x")
    data_a = (tmp_path / "a.tar").read_bytes()
    copy(f"oci:{umoci_layout}:t1", f"oci-archive:{tmp_path}/b.tar:x")
    assert data_a == (tmp_path / "b.tar").read_bytes()
    back = copy(f"oci-archive:{tmp_path}/a.tar:x", f"oci:{tmp_path}/back")
    assert back.digest == first.digest
    subprocess.run(["skopeo", "inspect", f"oci-archive:{tmp_path}/a.tar:x"], check=True, capture_output=True)


def test_adding_a_second_tag_to_an_existing_layout(umoci_layout, tmp_path):
    copy(f"oci:{umoci_layout}:t1", f"oci:{tmp_path}/out:one")
    copy(f"oci:{umoci_layout}:t1", f"oci:{tmp_path}/out:two")
    index = json.loads((tmp_path / "out/index.json").read_text())
    tags = sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"])
    assert tags == ["one", "two"]


def test_corrupt_blob_fails_and_leaves_no_partial_layout(umoci_layout, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(umoci_layout, broken)
    image = open_image(parse_reference(f"oci:{broken}:t1"))
    blob = broken / "blobs/sha256" / image.layers[0].descriptor.hex
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        copy(f"oci:{broken}:t1", f"oci:{tmp_path}/out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_tag_names_the_tags_that_exist(umoci_layout):
    with pytest.raises(NotFoundError, match="tags there: t1"):
        open_image(parse_reference(f"oci:{umoci_layout}:nope"))


def test_platform_mismatch_is_refused(umoci_layout):
    with pytest.raises(UnsupportedError, match="--platform"):
        open_image(parse_reference(f"oci:{umoci_layout}:t1"), Platform.parse("linux/arm64"))


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["copy", "dir:/x", "oci:/tmp/y"], 3, "unknown transport"),
        (["copy", "oci:/nonexistent/layout", "oci:/tmp/y"], 4, "does not exist"),
        (["inspect", "oci-archive:/nonexistent.tar"], 4, "does not exist"),
        (["inspect", "--platform", "linux", "oci:/x"], 2, "OS/ARCH"),
    ],
)
def test_cli_errors_are_one_sentence_with_documented_codes(args, code, fragment):
    proc = run_cli(*args)
    assert proc.returncode == code, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_cli_inspect_json_and_raw(umoci_layout):
    proc = run_cli("inspect", "--json", f"oci:{umoci_layout}:t1")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["cmd"] == ["/bin/true"] and len(info["layers"]) == 2
    raw = run_cli("inspect", "--raw", f"oci:{umoci_layout}:t1")
    image = open_image(parse_reference(f"oci:{umoci_layout}:t1"))
    assert raw.stdout.encode() == image.manifest_bytes


@pytest.mark.parametrize("hint", [None, 8 << 20, 12 << 20, 40 << 20])
def test_a_size_hint_reserves_space_but_the_blob_is_exactly_what_was_written(tmp_path, hint):
    import hashlib

    from sconify.image.model import Descriptor

    data = os.urandom(12 << 20)
    dest = open_destination(parse_reference(f"oci:{tmp_path / 'layout'}:v1"))
    writer = dest.new_blob("application/vnd.oci.image.layer.v1.tar", hint)
    for at in range(0, len(data), 1 << 20):
        writer.write(data[at : at + (1 << 20)])
    desc = writer.commit()
    assert desc == Descriptor("application/vnd.oci.image.layer.v1.tar", "sha256:" + hashlib.sha256(data).hexdigest(),
                              len(data))
    blob = dest.staging / "blobs" / "sha256" / desc.digest[7:]
    assert blob.read_bytes() == data
    assert blob.stat().st_blocks * 512 < len(data) + (4 << 20)  # no reserved space is left behind
    dest.abort()
