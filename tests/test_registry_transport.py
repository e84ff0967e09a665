"""The docker:// transport against a real registry: round trips that keep every digest, what skopeo pushed and
reads, multi-arch indexes, cross-repository mounts, HEAD skips, chunked uploads, corrupt blobs, atomic tags."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from infra.images import build_oci_image, busybox_rootfs, skopeo, umoci
from infra.registry import Registry

from sconify.errors import IntegrityError, NotFoundError, UnsupportedError
from sconify.image import mediatypes as mt
from sconify.image.copy import write_image
from sconify.image.model import Platform, canonical_json
from sconify.image.reference import parse_reference
from sconify.image.streams import GzipWriter
from sconify.image.transports import TransportOptions, open_destination, open_image
from sconify.image.transports.registry import RegistryDestination

pytestmark = pytest.mark.registry


def sconify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "sconify", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def push(source: str, dest: str, **dest_kwargs: object) -> tuple[object, RegistryDestination]:
    """Copy ``source`` into the registry reference ``dest`` with sconify's library; returns result and destination."""
    image = open_image(parse_reference(source))
    destination = RegistryDestination(parse_reference(dest), TransportOptions(), **dest_kwargs)  # type: ignore[arg-type]
    return write_image(image, destination), destination


def unique_image(tmp_path: Path, name: str = "unique", size: int = 64 << 10) -> str:
    """A small runnable image whose layer is unlike any other test's (so corrupting its blob harms no one)."""
    rootfs = busybox_rootfs(tmp_path / f"{name}-rootfs", {"/data/noise.bin": secrets.token_bytes(size)})
    return build_oci_image(tmp_path / f"{name}-layout", name, rootfs, cmd=["cat", "/data/noise.bin"])


def layout_blobs(layout: Path) -> set[str]:
    return {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}


def test_round_trip_through_registry_keeps_every_digest(
    registry: Registry, busybox_image: str, tmp_path: Path, repository_name: str
) -> None:
    source = open_image(parse_reference(busybox_image))
    ref = registry.ref(repository_name, "v1")
    result, _ = push(busybox_image, ref)
    assert result.digest == source.digest  # nothing changed: exact manifest bytes

    pulled = open_image(parse_reference(ref))
    assert pulled.manifest_bytes == source.manifest_bytes
    assert pulled.config_bytes == source.config_bytes
    assert [la.descriptor for la in pulled.layers] == [la.descriptor for la in source.layers]

    out = tmp_path / "pulled"
    back = write_image(pulled, open_destination(parse_reference(f"oci:{out}:v1")))
    assert back.digest == source.digest
    wanted = {source.digest, source.config_descriptor.digest, *(la.descriptor.digest for la in source.layers)}
    assert layout_blobs(out) == wanted
    for digest in wanted:  # every blob file holds the bytes its name promises
        data = (out / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest

    # skopeo, an independent client, sees the same manifest and copies the image with the same digest.
    raw = skopeo("inspect", "--raw", "--tls-verify=false", ref).stdout
    assert raw.encode() == source.manifest_bytes
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'by-skopeo'}:v1")
    index = json.loads((tmp_path / "by-skopeo" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == source.digest


def test_reads_a_docker_schema2_image_that_skopeo_pushed(
    registry: Registry, busybox_image: str, tmp_path: Path, repository_name: str
) -> None:
    ref = registry.ref(repository_name, "s2")
    skopeo("copy", "--dest-tls-verify=false", "--format", "v2s2", busybox_image, ref)
    expected = json.loads(skopeo("inspect", "--tls-verify=false", ref).stdout)

    image = open_image(parse_reference(ref))
    assert image.media_type == mt.DOCKER_MANIFEST
    assert image.digest == expected["Digest"]
    assert [la.descriptor.digest for la in image.layers] == expected["Layers"]
    for layer in image.layers:  # digest, size and DiffID verified while streaming
        with layer.open_tar() as tar:
            while tar.read(1 << 20):
                pass

    # Into an OCI layout: the layers keep their bytes, the manifest becomes OCI.
    result = write_image(image, open_destination(parse_reference(f"oci:{tmp_path / 'oci'}:v1")))
    assert [c.written.digest for c in result.layers] == expected["Layers"]
    assert result.media_type == mt.OCI_MANIFEST
    umoci("stat", "--image", f"{tmp_path / 'oci'}:v1")


def _arch_image(tmp_path: Path, arch: str) -> str:
    rootfs = busybox_rootfs(tmp_path / f"rootfs-{arch}", {"/etc/arch": arch.encode()})
    layout = tmp_path / f"layout-{arch}"
    build_oci_image(layout, arch, rootfs, cmd=["cat", "/etc/arch"])
    umoci("config", "--image", f"{layout}:{arch}", "--architecture", arch)
    return f"oci:{layout}:{arch}"


@pytest.fixture
def multiarch(registry: Registry, tmp_path: Path, repository_name: str) -> tuple[str, dict[str, str]]:
    """An index of linux/amd64 and linux/arm64 pushed by sconify: children by digest, then the index by tag."""
    entries, digests = [], {}
    for arch in ("amd64", "arm64"):
        image = open_image(parse_reference(_arch_image(tmp_path, arch)))
        assert image.platform == Platform("linux", arch)
        by_digest = f"docker://{registry.host}/{repository_name}@{image.digest}"
        result, _ = push(f"oci:{tmp_path / f'layout-{arch}'}:{arch}", by_digest)
        digests[arch] = result.digest
        entries.append({"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest_bytes),
                        "platform": {"architecture": arch, "os": "linux"}})
    index = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries})
    ref = registry.ref(repository_name, "multi")
    dest = RegistryDestination(parse_reference(ref))
    dest.put_manifest(index, mt.OCI_INDEX)
    where = dest.commit()
    assert where.endswith("@sha256:" + hashlib.sha256(index).hexdigest())
    return ref, digests


def test_multi_arch_index_selects_the_platform(multiarch: tuple[str, dict[str, str]]) -> None:
    ref, digests = multiarch
    default = open_image(parse_reference(ref))
    assert default.digest == digests["amd64"] and default.platform.architecture == "amd64"
    arm = open_image(parse_reference(ref), Platform.parse("linux/arm64"))
    assert arm.digest == digests["arm64"] and arm.platform.architecture == "arm64"
    with arm.layers[0].open_tar() as tar:
        assert b"arm64" in tar.read()
    # skopeo agrees on what the index holds.
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", ref).stdout)
    assert {m["digest"] for m in raw["manifests"]} == set(digests.values())


def test_a_platform_the_index_lacks_is_unsupported(multiarch: tuple[str, dict[str, str]]) -> None:
    ref, _ = multiarch
    with pytest.raises(UnsupportedError, match="linux/s390x.*--platform"):
        open_image(parse_reference(ref), Platform.parse("linux/s390x"))
    out = sconify("inspect", "--platform", "linux/s390x", ref)
    assert out.returncode == UnsupportedError.exit_code
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "linux/amd64" in out.stderr and "linux/arm64" in out.stderr


def test_copy_between_repositories_of_one_registry_mounts_layers(
    registry: Registry, busybox_image: str, repository_name: str
) -> None:
    first = registry.ref(repository_name + "-a", "v1")
    push(busybox_image, first)
    result, dest = push(first, registry.ref(repository_name + "-b", "v1"))
    layers = open_image(parse_reference(first)).layers
    assert [c.action for c in result.layers] == ["mounted"] * len(layers)
    assert dest.stats.blobs_mounted == len(layers)
    assert sorted(dest.stats.mounted) == sorted(la.descriptor.digest for la in layers)
    # No layer byte travelled: only the (small) config was uploaded.
    config_size = open_image(parse_reference(first)).config_descriptor.size
    assert dest.stats.bytes_uploaded == config_size
    # The mounted image is complete for an independent client.
    skopeo("inspect", "--tls-verify=false", registry.ref(repository_name + "-b", "v1"))


def test_a_second_push_finds_every_blob_present(
    registry: Registry, busybox_image: str, repository_name: str
) -> None:
    ref = registry.ref(repository_name, "v1")
    first, dest1 = push(busybox_image, ref)
    assert {c.action for c in first.layers} == {"copied"} and dest1.stats.bytes_uploaded > 0
    second, dest2 = push(busybox_image, registry.ref(repository_name, "v2"))
    assert {c.action for c in second.layers} == {"present"}
    assert dest2.stats.bytes_uploaded == 0 and dest2.stats.blobs_uploaded == 0
    assert second.digest == first.digest


def test_a_layer_bigger_than_one_upload_chunk_round_trips(
    registry: Registry, busybox_image: str, tmp_path: Path, repository_name: str
) -> None:
    image = open_image(parse_reference(busybox_image))
    chunk = 64 << 10
    assert max(la.descriptor.size for la in image.layers) > 4 * chunk
    ref = registry.ref(repository_name, "v1")
    result, dest = push(busybox_image, ref, chunk_size=chunk)
    assert result.digest == image.digest
    expected_chunks = sum(-(-la.descriptor.size // chunk) for la in image.layers)
    assert dest.stats.chunks_uploaded >= expected_chunks
    pulled = open_image(parse_reference(ref))
    for layer in pulled.layers:
        with layer.open_blob(verify_diff_id=True) as blob:
            while blob.read(1 << 20):
                pass
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'check'}:v1")


@pytest.mark.parametrize("chunk", [1 << 20, 48 << 10], ids=["one-request", "chunked"])
def test_new_blob_streams_and_names_itself_by_its_digest(
    registry: Registry, repository_name: str, chunk: int
) -> None:
    dest = RegistryDestination(parse_reference(registry.ref(repository_name, "v1")), chunk_size=chunk)
    writer = dest.new_blob(mt.OCI_LAYER_GZIP)
    plain = secrets.token_bytes(100_000) * 3
    out = io.BytesIO()

    class Both:
        def write(self, data: bytes) -> int:
            out.write(data)
            return writer.write(data)

    gz = GzipWriter(Both())  # type: ignore[arg-type]
    for i in range(0, len(plain), 7000):  # odd-sized writes, as a converter makes them
        gz.write(plain[i : i + 7000])
    gz.close()
    desc = writer.commit()
    assert desc.digest == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    assert desc.size == len(out.getvalue())
    assert dest.has_blob(desc)
    with registry.session() as session:
        got = session.get(f"{registry.url}/v2/{repository_name}/blobs/{desc.digest}", timeout=10)
    assert got.content == out.getvalue()


def _blob_file(registry: Registry, digest: str) -> Path:
    hex_ = digest.split(":")[1]
    return registry.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hex_[:2] / hex_ / "data"


def test_a_corrupt_blob_in_the_registry_fails_and_leaves_no_output(
    registry: Registry, tmp_path: Path, repository_name: str
) -> None:
    source = unique_image(tmp_path)
    ref = registry.ref(repository_name, "v1")
    push(source, ref)
    layer = open_image(parse_reference(ref)).layers[0].descriptor
    blob = _blob_file(registry, layer.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    blob.write_bytes(bytes(data))

    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=layer.digest):
        write_image(open_image(parse_reference(ref)), open_destination(parse_reference(f"oci:{out}:v1")))
    assert not out.exists()
    run = sconify("copy", ref, f"oci:{out}:v1")
    assert run.returncode == IntegrityError.exit_code, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_failed_push_moves_no_tag(registry: Registry, tmp_path: Path, repository_name: str) -> None:
    source = unique_image(tmp_path, size=300 << 10)
    layout = Path(parse_reference(source).path or "")
    image = open_image(parse_reference(source))
    blob = layout / "blobs" / "sha256" / image.layers[0].descriptor.hex
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0x01
    blob.write_bytes(bytes(data))
    ref = registry.ref(repository_name, "v1")
    with pytest.raises(IntegrityError):
        push(source, ref)
    with pytest.raises(NotFoundError, match=repository_name):
        open_image(parse_reference(ref))
    out = skopeo("inspect", "--tls-verify=false", ref, check=False)
    assert out.returncode != 0


def test_pull_and_push_by_digest(registry: Registry, busybox_image: str, repository_name: str) -> None:
    digest = open_image(parse_reference(busybox_image)).digest
    by_digest = f"docker://{registry.host}/{repository_name}@{digest}"
    result, _ = push(busybox_image, by_digest)
    assert result.destination.endswith(f"{repository_name}@{digest}")
    assert open_image(parse_reference(by_digest)).digest == digest
    tags = registry.get(f"/v2/{repository_name}/tags/list").json().get("tags")
    assert not tags  # pushing by digest names no tag
    wrong = f"docker://{registry.host}/{repository_name}@sha256:{'0' * 64}"
    with pytest.raises(NotFoundError):
        open_image(parse_reference(wrong))


def test_missing_tag_exits_4_and_registry_down_exits_6(registry: Registry, repository_name: str) -> None:
    from infra.procs import free_port

    missing = sconify("inspect", registry.ref(repository_name, "nope"))
    assert missing.returncode == NotFoundError.exit_code
    assert repository_name in missing.stderr and "nope" in missing.stderr
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr

    port = free_port()
    down = sconify("copy", f"docker://127.0.0.1:{port}/some/image:v1", "oci:/nonexistent-dir:v1")
    assert down.returncode == 6
    assert down.stderr.startswith(f"sconify: error: cannot reach registry 127.0.0.1:{port}")
    assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
