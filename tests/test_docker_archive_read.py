"""Reading docker-archives: files written by skopeo, by ``docker save`` (legacy form) and in Docker 25's form
(an OCI layout beside manifest.json), by name, by position or as the only image; links, compressed layer
files and compressed archives; every layer verified as it streams."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from infra.dockerd import DockerEngine
from infra.images import skopeo, umoci

from sconify.errors import IntegrityError, NotFoundError, UnsafeArchiveError, UnsupportedError
from sconify.image import mediatypes as mt
from sconify.image.copy import write_image
from sconify.image.model import Image, Platform
from sconify.image.reference import parse_reference
from sconify.image.transports import open_destination, open_image


def open_ref(text: str, platform: Platform | None = None) -> Image:
    return open_image(parse_reference(text), platform)


def drain_layers(image: Image) -> list[str]:
    """Stream every layer's tar (digest, size and DiffID verified on the way); returns sha256 of each tar."""
    out = []
    for layer in image.layers:
        h = hashlib.sha256()
        with layer.open_tar() as tar:
            while chunk := tar.read(1 << 20):
                h.update(chunk)
        out.append("sha256:" + h.hexdigest())
    return out


def members_of(archive: Path) -> dict[str, bytes]:
    """Regular files of a tar, by name (the test archives are small)."""
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def write_tar(path: Path, members: list[tuple[str, bytes | tuple[str, str]]]) -> Path:
    """A tar of regular files (bytes) and links (("sym" | "hard", target)), in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, tuple):
                info.type = tarfile.SYMTYPE if content[0] == "sym" else tarfile.LNKTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class OciParts:
    """The pieces of a one-image OCI layout: manifest, config and layer blobs by digest."""

    def __init__(self, reference: str) -> None:
        layout, _, tag = reference[len("oci:"):].rpartition(":")
        self.layout = Path(layout)
        index = json.loads((self.layout / "index.json").read_text())
        desc = next(d for d in index["manifests"] if d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        self.manifest_bytes = self.blob(desc["digest"])
        self.manifest = json.loads(self.manifest_bytes)
        self.config_bytes = self.blob(self.manifest["config"]["digest"])
        self.config = json.loads(self.config_bytes)
        self.layers = [self.blob(d["digest"]) for d in self.manifest["layers"]]

    def blob(self, digest: str) -> bytes:
        return (self.layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


@pytest.fixture(scope="module")
def busybox(busybox_image: str) -> OciParts:
    return OciParts(busybox_image)


@pytest.fixture(scope="module")
def skopeo_archive(busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox image as skopeo writes a docker-archive (legacy form), tagged sconify-test/bb:1."""
    archive = tmp_path_factory.mktemp("skopeo") / "bb.tar"
    skopeo("copy", busybox_image, f"docker-archive:{archive}:sconify-test/bb:1")
    return archive


def test_skopeo_archive_is_read_by_name_position_or_as_the_only_image(skopeo_archive, busybox, busybox_image):
    refs = ["", ":sconify-test/bb:1", ":docker.io/sconify-test/bb:1", ":@0"]
    images = [open_ref(f"docker-archive:{skopeo_archive}{suffix}") for suffix in refs]
    assert len({im.digest for im in images}) == 1
    image = images[0]
    assert image.config_bytes == busybox.config_bytes
    assert image.media_type == mt.DOCKER_MANIFEST
    assert [la.diff_id for la in image.layers] == busybox.config["rootfs"]["diff_ids"]
    assert drain_layers(image) == busybox.config["rootfs"]["diff_ids"]


def test_synthesised_manifest_describes_the_files_of_the_archive(skopeo_archive, busybox):
    files = members_of(skopeo_archive)
    entry = json.loads(files["manifest.json"])[0]
    image = open_ref(f"docker-archive:{skopeo_archive}")
    manifest = json.loads(image.manifest_bytes)
    assert manifest["config"] == {
        "mediaType": mt.DOCKER_CONFIG, "digest": sha(files[entry["Config"]]), "size": len(files[entry["Config"]])
    }
    assert [(d["digest"], d["size"], d["mediaType"]) for d in manifest["layers"]] == [
        (sha(files[name]), len(files[name]), mt.DOCKER_LAYER) for name in entry["Layers"]
    ]
    # Deterministic: the same archive always gives the same manifest.
    assert open_ref(f"docker-archive:{skopeo_archive}").manifest_bytes == image.manifest_bytes


def test_archive_read_by_sconify_unpacks_with_umoci(skopeo_archive, tmp_path):
    write_image(open_ref(f"docker-archive:{skopeo_archive}"), open_destination(parse_reference(f"oci:{tmp_path}/l:t")))
    umoci("unpack", "--rootless", "--image", f"{tmp_path}/l:t", str(tmp_path / "bundle"))
    assert (tmp_path / "bundle/rootfs/etc/motd").read_text() == "sconify test image\n"
    assert (tmp_path / "bundle/rootfs/bin/sh").is_symlink()


def test_platform_that_the_archive_does_not_hold_is_refused(skopeo_archive):
    with pytest.raises(UnsupportedError, match="linux/arm64"):
        open_ref(f"docker-archive:{skopeo_archive}", Platform("linux", "arm64"))
    assert open_ref(f"docker-archive:{skopeo_archive}", Platform("linux", "amd64")).platform.architecture == "amd64"


def test_docker_save_archive_with_two_images_and_a_linked_layer(
    dockerd: DockerEngine, busybox_image: str, tmp_path: Path
) -> None:
    # Two images over the same layer with different configs: docker save stores the layer once and links it.
    layout = tmp_path / "layout"
    shutil.copytree(busybox_image[len("oci:"):].rpartition(":")[0], layout)
    umoci("config", "--image", f"{layout}:busybox", "--tag", "other", "--config.cmd", "echo", "--config.cmd", "other")
    for tag, name in (("busybox", "sconify-test/save-a:1"), ("other", "sconify-test/save-b:2")):
        skopeo("copy", f"oci:{layout}:{tag}", f"docker-archive:{tmp_path}/{tag}.tar:{name}")
        dockerd.load(tmp_path / f"{tag}.tar")
    archive = tmp_path / "saved.tar"
    dockerd.run("save", "-o", str(archive), "sconify-test/save-a:1", "sconify-test/save-b:2", check=True)
    with tarfile.open(archive) as tar:
        assert any(m.issym() and m.name.endswith("layer.tar") for m in tar.getmembers())
    for name in ("sconify-test/save-a:1", "sconify-test/save-b:2"):
        image = open_ref(f"docker-archive:{archive}:{name}")
        image_id = dockerd.run("inspect", "--format", "{{.Id}}", name, check=True).stdout.strip()
        assert image.config_descriptor.digest == image_id
        assert drain_layers(image) == [la.diff_id for la in image.layers]
    # docker save lists images in no fixed order: find B's position from manifest.json itself.
    entries = json.loads(members_of(archive)["manifest.json"])
    position = next(i for i, e in enumerate(entries) if e["RepoTags"] == ["sconify-test/save-b:2"])
    assert open_ref(f"docker-archive:{archive}:@{position}").config["config"]["Cmd"] == ["echo", "other"]
    with pytest.raises(NotFoundError, match="holds 2 images.*save-a:1"):
        open_ref(f"docker-archive:{archive}")


def docker25_archive(parts: OciParts, out: Path, *, compressed: bool, layers_in_index: bool = True) -> tuple[Path, str]:
    """Docker >= 25's save format made by hand: an OCI layout (uncompressed layers, as the classic store writes
    them, or the gzip blobs, as the containerd store keeps them) plus manifest.json. Returns the archive and
    the digest of the manifest that index.json names."""
    blobs: dict[str, bytes] = {}
    layer_descs = []
    for blob, desc in zip(parts.layers, parts.manifest["layers"], strict=True):
        data = blob if compressed else gzip.decompress(blob)
        media_type = desc["mediaType"] if compressed else mt.OCI_LAYER
        blobs[sha(data)] = data
        layer_descs.append({"mediaType": media_type, "digest": sha(data), "size": len(data)})
    blobs[sha(parts.config_bytes)] = parts.config_bytes
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": sha(parts.config_bytes), "size": len(parts.config_bytes)},
        "layers": layer_descs if layers_in_index else [],
    }
    manifest_bytes = json.dumps(manifest).encode()
    blobs[sha(manifest_bytes)] = manifest_bytes
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [{
        "mediaType": mt.OCI_MANIFEST, "digest": sha(manifest_bytes), "size": len(manifest_bytes),
        "annotations": {"io.containerd.image.name": "docker.io/sconify-test/new:25",
                        "org.opencontainers.image.ref.name": "25"},
    }]}
    entry = [{"Config": f"blobs/sha256/{sha(parts.config_bytes)[7:]}", "RepoTags": ["sconify-test/new:25"],
              "Layers": [f"blobs/sha256/{d['digest'][7:]}" for d in layer_descs]}]
    members: list[tuple[str, bytes | tuple[str, str]]] = [
        (f"blobs/sha256/{digest[7:]}", data) for digest, data in sorted(blobs.items())
    ]
    members += [("index.json", json.dumps(index).encode()), ("manifest.json", json.dumps(entry).encode()),
                ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')]
    return write_tar(out, members), sha(manifest_bytes)


@pytest.mark.parametrize("compressed", [False, True], ids=["classic-store", "containerd-store"])
def test_docker25_archive_keeps_its_manifest_digest(busybox, tmp_path, compressed):
    archive, digest = docker25_archive(busybox, tmp_path / "new.tar", compressed=compressed)
    image = open_ref(f"docker-archive:{archive}:sconify-test/new:25")
    assert image.digest == digest
    assert image.media_type == mt.OCI_MANIFEST
    assert drain_layers(image) == busybox.config["rootfs"]["diff_ids"]
    # Same-family destination: the exact manifest travels on.
    result = write_image(image, open_destination(parse_reference(f"oci:{tmp_path}/out:t")))
    assert result.digest == digest


def test_docker25_archive_whose_index_lacks_the_layers_falls_back_to_a_synthesised_manifest(busybox, tmp_path):
    # Early Docker 25 releases listed only foreign layers in the OCI manifest; manifest.json is the truth then.
    archive, digest = docker25_archive(busybox, tmp_path / "new.tar", compressed=False, layers_in_index=False)
    image = open_ref(f"docker-archive:{archive}")
    assert image.digest != digest
    assert image.media_type == mt.DOCKER_MANIFEST
    assert drain_layers(image) == busybox.config["rootfs"]["diff_ids"]


def legacy_archive(parts: OciParts, out: Path, layer_files: list[bytes] | None = None,
                   extra: list[tuple[str, bytes | tuple[str, str]]] | None = None,
                   layer_names: list[str] | None = None, tags: list[str] | None = None) -> Path:
    """A legacy docker-archive made by hand: ``<hex>.json`` config, ``<n>/layer.tar`` files (given bytes or the
    uncompressed layers), and optional extra members."""
    files = layer_files if layer_files is not None else [gzip.decompress(b) for b in parts.layers]
    names = layer_names or [f"layer{i}/layer.tar" for i in range(len(files))]
    config_name = f"{sha(parts.config_bytes)[7:]}.json"
    members: list[tuple[str, bytes | tuple[str, str]]] = [(config_name, parts.config_bytes)]
    members += [(f"layer{i}/layer.tar", data) for i, data in enumerate(files)]
    members += extra or []
    entry = [{"Config": config_name, "RepoTags": tags or ["sconify-test/legacy:1"], "Layers": names}]
    members.append(("manifest.json", json.dumps(entry).encode()))
    return write_tar(out, members)


def test_legacy_archive_with_gzip_layer_files(busybox, tmp_path):
    # docker load accepts compressed layer files; their digest is the file's, their DiffID the config's.
    archive = legacy_archive(busybox, tmp_path / "gz.tar", layer_files=busybox.layers)
    image = open_ref(f"docker-archive:{archive}")
    assert [la.descriptor.digest for la in image.layers] == [d["digest"] for d in busybox.manifest["layers"]]
    assert [la.descriptor.media_type for la in image.layers] == [mt.DOCKER_LAYER_GZIP]
    assert drain_layers(image) == busybox.config["rootfs"]["diff_ids"]
    # A docker-archive destination stores layers uncompressed: the file's digest becomes the DiffID.
    result = write_image(image, open_destination(parse_reference(f"docker-archive:{tmp_path}/plain.tar")))
    assert [c.written.digest for c in result.layers] == busybox.config["rootfs"]["diff_ids"]


def test_layer_files_reached_through_symlinks_and_hard_links(busybox, tmp_path):
    plain = gzip.decompress(busybox.layers[0])
    for kind, target in (("sym", "../layer0/layer.tar"), ("hard", "layer0/layer.tar")):
        archive = legacy_archive(busybox, tmp_path / f"{kind}.tar", extra=[("dup/layer.tar", (kind, target))],
                                 layer_names=["dup/layer.tar"])
        image = open_ref(f"docker-archive:{archive}")
        assert drain_layers(image) == [sha(plain)]


def test_link_out_of_the_archive_is_refused(busybox, tmp_path):
    archive = legacy_archive(busybox, tmp_path / "evil.tar", extra=[("dup/layer.tar", ("sym", "../../etc/passwd"))],
                             layer_names=["dup/layer.tar"])
    with pytest.raises(UnsafeArchiveError, match="outside the archive"):
        open_ref(f"docker-archive:{archive}")


def test_gzip_compressed_archive_file(skopeo_archive, tmp_path):
    packed = tmp_path / "bb.tar.gz"
    packed.write_bytes(gzip.compress(skopeo_archive.read_bytes()))
    image = open_ref(f"docker-archive:{packed}:sconify-test/bb:1")
    assert image.digest == open_ref(f"docker-archive:{skopeo_archive}").digest
    assert drain_layers(image) == [la.diff_id for la in image.layers]


def test_choosing_an_image_that_is_not_there(skopeo_archive):
    with pytest.raises(NotFoundError, match=r"no image tagged sconify-test/bb:2 .*docker.io/sconify-test/bb:1"):
        open_ref(f"docker-archive:{skopeo_archive}:sconify-test/bb:2")
    with pytest.raises(NotFoundError, match="@3 does not exist; use @0 to @0"):
        open_ref(f"docker-archive:{skopeo_archive}:@3")


def test_oci_archive_given_as_docker_archive_names_the_right_transport(busybox_image, tmp_path):
    skopeo("copy", busybox_image, f"oci-archive:{tmp_path}/o.tar:x")
    with pytest.raises(NotFoundError, match="oci-archive:"):
        open_ref(f"docker-archive:{tmp_path}/o.tar")


def test_layer_count_disagreeing_with_the_config_is_corrupt(busybox, tmp_path):
    archive = legacy_archive(busybox, tmp_path / "bad.tar", layer_names=["layer0/layer.tar", "layer0/layer.tar"])
    with pytest.raises(IntegrityError, match="1 layer DiffIDs but manifest.json names 2"):
        open_ref(f"docker-archive:{archive}")


def test_reading_does_not_extract_the_archive(skopeo_archive, tmp_path, monkeypatch):
    # Random access: opening and streaming writes nothing to disk beside the caller's files.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    image = open_ref(f"docker-archive:{skopeo_archive}")
    drain_layers(image)
    assert list(tmp_path.iterdir()) == []
