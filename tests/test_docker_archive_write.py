"""Writing docker-archives: docker load runs what sconify wrote, skopeo reads and copies it, the file is
reproducible byte for byte, holds uncompressed layers whose digest is their DiffID, and appears only complete."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from infra.dockerd import DockerEngine
from infra.images import skopeo, umoci

from sconify.errors import BadReferenceError, DestinationError, IntegrityError
from sconify.image import mediatypes as mt
from sconify.image.copy import CopyResult, write_image
from sconify.image.model import Descriptor
from sconify.image.reference import parse_reference
from sconify.image.transports import open_destination, open_image
from sconify.image.transports.docker_archive import DockerArchiveDestination


def copy(src: str, dst: str) -> CopyResult:
    return write_image(open_image(parse_reference(src)), open_destination(parse_reference(dst)))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_members(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def written(busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CopyResult]:
    """The busybox test image written by sconify as docker-archive:FILE:sconify-test/written:1."""
    archive = tmp_path_factory.mktemp("written") / "bb.tar"
    return archive, copy(busybox_image, f"docker-archive:{archive}:sconify-test/written:1")


def test_docker_loads_and_runs_the_archive(dockerd: DockerEngine, written: tuple[Path, CopyResult]) -> None:
    archive, _ = written
    loaded = dockerd.load(archive)
    assert "Loaded image: sconify-test/written:1" in loaded.stdout
    ran = dockerd.run_container("sconify-test/written:1")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "hello from busybox\n"


def test_docker_loads_an_untagged_archive_by_its_id(dockerd: DockerEngine, busybox_image: str, tmp_path: Path) -> None:
    result = copy(busybox_image, f"docker-archive:{tmp_path}/anon.tar")
    config = json.loads(result.manifest_bytes)["config"]["digest"]
    assert f"Loaded image ID: {config}" in dockerd.load(tmp_path / "anon.tar").stdout


def test_skopeo_inspects_and_copies_the_archive(written, busybox_image, tmp_path):
    archive, _ = written
    ours = json.loads(skopeo("inspect", f"docker-archive:{archive}").stdout)
    source = json.loads(skopeo("inspect", busybox_image).stdout)
    assert ours["Env"] == source["Env"] and ours["Architecture"] == "amd64"
    source_config = json.loads(skopeo("inspect", "--config", busybox_image).stdout)
    assert ours["Layers"] == source_config["rootfs"]["diff_ids"]  # uncompressed: digest == DiffID
    skopeo("copy", f"docker-archive:{archive}", f"oci:{tmp_path}/layout:t")
    umoci("unpack", "--rootless", "--image", f"{tmp_path}/layout:t", str(tmp_path / "bundle"))
    assert (tmp_path / "bundle/rootfs/etc/motd").read_text() == "sconify test image\n"


def test_archive_layout_is_docker25_style_with_uncompressed_layers(written, busybox_image):
    archive, result = written
    members = read_members(archive)
    names = [m.name for m, _ in members]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m, _ in members)
    assert {m.mode for m, _ in members if m.isfile()} == {0o644}
    files = {m.name: data for m, data in members if data is not None}
    entry = json.loads(files["manifest.json"])
    config = json.loads(files[entry[0]["Config"]])
    assert entry[0]["RepoTags"] == ["sconify-test/written:1"]
    assert [sha(files[name]) for name in entry[0]["Layers"]] == config["rootfs"]["diff_ids"]
    # The OCI index beside it names the exact manifest sconify wrote (so a read keeps the digest).
    index = json.loads(files["index.json"])
    assert index["manifests"][0]["digest"] == result.digest
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "docker.io/sconify-test/written:1"
    assert sha(files[f"blobs/sha256/{result.digest[7:]}"]) == result.digest
    assert json.loads(result.manifest_bytes)["layers"][0]["mediaType"] == mt.DOCKER_LAYER


def test_same_image_gives_a_byte_identical_archive(written, busybox_image, tmp_path):
    archive, _ = written
    copy(busybox_image, f"docker-archive:{tmp_path}/again.tar:sconify-test/written:1")
    assert (tmp_path / "again.tar").read_bytes() == archive.read_bytes()


def test_archive_to_archive_keeps_the_manifest_digest_and_bytes(written, tmp_path):
    archive, first = written
    second = copy(f"docker-archive:{archive}", f"docker-archive:{tmp_path}/copy.tar:sconify-test/written:1")
    assert second.digest == first.digest
    assert [c.action for c in second.layers] == ["copied"]
    assert (tmp_path / "copy.tar").read_bytes() == archive.read_bytes()


def test_nothing_appears_before_commit_and_an_old_file_is_replaced_only_then(tmp_path):
    target = tmp_path / "out.tar"
    target.write_bytes(b"old archive")
    dest = DockerArchiveDestination(parse_reference(f"docker-archive:{target}:a/b:c"))
    layer = b"x" * 4096  # not a valid tar, which the destination does not need to know
    dest.put_blob(Descriptor(mt.DOCKER_LAYER, sha(layer), len(layer)), io.BytesIO(layer))
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                                                           "diff_ids": [sha(layer)]}}).encode()
    dest.put_blob(Descriptor(mt.DOCKER_CONFIG, sha(config), len(config)), io.BytesIO(config))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
                           "config": {"mediaType": mt.DOCKER_CONFIG, "digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": mt.DOCKER_LAYER, "digest": sha(layer), "size": len(layer)}]})
    dest.put_manifest(manifest.encode(), mt.DOCKER_MANIFEST)
    assert target.read_bytes() == b"old archive"
    assert dest.commit() == f"docker-archive:{target}:a/b:c"
    assert tarfile.is_tarfile(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar"]


def test_abort_leaves_nothing_behind(tmp_path):
    dest = DockerArchiveDestination(parse_reference(f"docker-archive:{tmp_path}/never.tar"))
    writer = dest.new_blob(mt.DOCKER_LAYER)
    writer.write(b"partial")
    dest.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_source_leaves_no_archive(busybox_image, tmp_path):
    layout = Path(busybox_image[len("oci:"):].rpartition(":")[0])
    bad = tmp_path / "bad"
    shutil.copytree(layout, bad)
    source = open_image(parse_reference(f"oci:{bad}:busybox"))
    blob = bad / "blobs" / "sha256" / source.layers[0].descriptor.hex
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError):
        write_image(source, open_destination(parse_reference(f"docker-archive:{out}/x.tar:a/b:1")))
    assert list(out.iterdir()) == []


def test_destination_refusals(tmp_path):
    with pytest.raises(BadReferenceError, match="@N only selects"):
        open_destination(parse_reference(f"docker-archive:{tmp_path}/x.tar:@0"))
    with pytest.raises(DestinationError, match="is not a file"):
        open_destination(parse_reference(f"docker-archive:{tmp_path}"))
    with pytest.raises(DestinationError, match="does not exist"):
        open_destination(parse_reference(f"docker-archive:{tmp_path}/no/such/dir/x.tar"))
