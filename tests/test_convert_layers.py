"""How ``convert`` writes and reads layers: position nonces as docs/fspf.md states them (checked with hmac and
tarfile alone), the choice between gzip and uncompressed rewritten layers, and the analysis that reads local
uncompressed layers unverified (a tampered blob must still stop the conversion and leave nothing behind).
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from test_convert_support import (
    Keys,
    blob_path,
    cached_conversion,
    convert_image,
    keys,  # noqa: F401 (fixture)
    layout_manifest,
    runtime,  # noqa: F401 (fixture)
)
from test_fspf_spec import SpecReader

VOLUME = ".sconify/fspf/volume.fspf"  # inside the protection layer (a layer path has no leading "/")


def _layers(layout: Path, tag: str = "latest") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    _, manifest = layout_manifest(layout, tag)
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
    return config, manifest["layers"]


def _tar_bytes(layout: Path, desc: dict[str, Any]) -> bytes:
    data = blob_path(layout, desc["digest"]).read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _visible_positions(layout: Path) -> dict[bytes, tuple[str, int]]:
    """Volume path -> (DiffID, content offset in the uncompressed tar) of each file's last occurrence."""
    config, layers = _layers(layout)
    where: dict[bytes, tuple[str, int]] = {}
    for desc, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        with tarfile.open(fileobj=io.BytesIO(_tar_bytes(layout, desc)), mode="r:") as tar:
            for member in tar:
                if member.isreg():
                    where[b"/" + member.name.lstrip("./").encode("utf-8", "surrogateescape")] = (
                        diff_id, member.offset_data)
    return where


@pytest.mark.parametrize("name", ["python-app", "busybox-sh"])
def test_chunk_nonces_name_the_source_position_as_the_document_says(
    name: str, tmp_path_factory: pytest.TempPathFactory, fixture_image, keys: Keys  # noqa: F811
) -> None:
    converted = cached_conversion(tmp_path_factory, fixture_image, keys, name)
    assert converted.layout is not None
    _, layers = _layers(converted.layout)
    protection = _tar_bytes(converted.layout, layers[-1])
    with tarfile.open(fileobj=io.BytesIO(protection), mode="r:") as tar:
        member = tar.extractfile(VOLUME)
        assert member is not None
        metadata = member.read()
    service = converted.service
    key = bytes.fromhex(service["fspf_key"])
    reader = SpecReader(metadata, key, bytes.fromhex(service["fspf_tag"]))
    positions = _visible_positions(Path(converted.source.layout))
    checked = 0
    for path, record in reader.records.items():
        if record["kind"] != 1 or not record["chunks"]:
            continue
        diff_id, offset = positions[path]
        _, nonce_key = reader.file_keys(path)
        digest = bytes.fromhex(diff_id.split(":", 1)[1])
        for index, (nonce, _tag) in enumerate(record["chunks"]):
            expected = hmac.digest(nonce_key, b"layer\0" + digest + struct.pack("<QQ", offset, index), "sha256")
            assert nonce == expected[:12], (path, index)
            checked += 1
    assert checked >= 3


def _docker_archive(fixture: Any, path: Path) -> str:
    """The fixture image as a docker-archive (uncompressed layers), written by ``sconify copy``."""
    ref = f"docker-archive:{path}:sconify/test:1"
    subprocess.run([sys.executable, "-m", "sconify", "-q", "copy", fixture.reference, ref], check=True,
                   capture_output=True, timeout=120)
    return ref


def test_rewritten_layers_of_mostly_ciphertext_are_stored_uncompressed_and_others_gzipped(
    fixture_image, keys: Keys, tmp_path: Path, runtime  # noqa: F811
) -> None:
    source = fixture_image("big", size="24MiB", layers=3)
    out = {}
    for choice in ("auto", "gzip", "none"):
        conv = convert_image(source, f"oci:{tmp_path / choice}:latest", tmp_path / f"p-{choice}", keys, sign=False,
                             layer_compression=choice)
        _, layers = _layers(tmp_path / choice)
        report = json.loads((conv.policy_dir / "report.json").read_text())
        rewritten = [la["index"] for la in report["layers"] if la["result"] == "rewritten"]
        assert rewritten
        out[choice] = [layers[i]["mediaType"] for i in rewritten]
        assert [la["output_media_type"] for la in report["layers"]] == [d["mediaType"] for d in layers[:-2]]
        for i in rewritten:  # whatever the form, the blob is what the manifest says it is
            data = blob_path(tmp_path / choice, layers[i]["digest"]).read_bytes()
            assert (data[:2] == b"\x1f\x8b") == layers[i]["mediaType"].endswith("+gzip")
        # umoci, an independent reader, unpacks every form
        subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{tmp_path / choice}:latest",
                        str(tmp_path / f"bundle-{choice}")], check=True, capture_output=True, timeout=300)
    assert set(out["gzip"]) == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    assert set(out["none"]) == {"application/vnd.oci.image.layer.v1.tar"}
    # The big image keeps most of its bytes under /app/data (encrypted): auto stores those layers as they are.
    assert "application/vnd.oci.image.layer.v1.tar" in out["auto"]


def test_gzip_layers_keep_ciphertext_in_stored_blocks(
    fixture_image, keys: Keys, tmp_path: Path, runtime  # noqa: F811
) -> None:
    source = fixture_image("big", size="24MiB", layers=3)
    convert_image(source, f"oci:{tmp_path / 'gz'}:latest", tmp_path / "p", keys, sign=False, layer_compression="gzip")
    _, layers = _layers(tmp_path / "gz")
    for desc in layers:
        data = blob_path(tmp_path / "gz", desc["digest"]).read_bytes()
        tar = gzip.decompress(data)
        if len(tar) > 4 << 20:  # a layer of ciphertext: gzip adds a few bytes per 64 KiB, it does not shrink it
            assert len(data) < len(tar) * 1.01
        assert subprocess.run(["gzip", "-t"], input=data, capture_output=True).returncode == 0


def _tamper(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))


def _run_convert(
    source: str, dest: str, policy: Path, with_keys: Keys, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sconify", "-q", "convert", source, dest, "--policy-out", str(policy),
         "--fspf-key", str(with_keys.fspf), "--enclave-key", str(with_keys.enclave), *extra],
        capture_output=True, text=True, timeout=300,
    )


def test_a_tampered_file_in_a_local_uncompressed_layer_stops_the_conversion(
    fixture_image, keys: Keys, tmp_path: Path, runtime  # noqa: F811
) -> None:
    archive = tmp_path / "src.tar"
    ref = _docker_archive(fixture_image("python-app"), archive)
    data = archive.read_bytes()
    marker = data.find(b"def ")  # inside an application file (encrypted); the analysis skips or ignores it
    assert marker > 0
    _tamper(archive, marker + 1)
    done = _run_convert(ref, f"oci:{tmp_path / 'out'}:latest", tmp_path / "policy", keys)
    assert done.returncode == 7, done.stderr
    assert "digest" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "policy").exists()


def test_a_tampered_reused_layer_the_destination_already_holds_is_still_verified(
    fixture_image, keys: Keys, tmp_path: Path, runtime  # noqa: F811
) -> None:
    # An OCI layout with uncompressed layers; the destination already has every source blob ("present").
    archive = tmp_path / "src.tar"
    _docker_archive(fixture_image("python-app"), archive)
    src = tmp_path / "src"
    subprocess.run([sys.executable, "-m", "sconify", "-q", "copy", f"docker-archive:{archive}",
                    f"oci:{src}:v1"], check=True, capture_output=True, timeout=120)
    dest = tmp_path / "dest"
    shutil.copytree(src, dest)
    _, layers = _layers(src, "v1")
    base = blob_path(src, layers[0]["digest"])  # the base layer holds nothing encrypted: it is reused
    assert layers[0]["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    # With / and the shell left unprotected, nothing of the base (busybox) layer is sealed or authenticated: the
    # layer pass has no reason to read it, and the destination has it already.
    plain = ["--plain", "/", "--plain", "/bin/busybox"]
    plan = subprocess.run([sys.executable, "-m", "sconify", "convert", f"oci:{src}:v1", *plain,
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(plan.stdout)["layers"][0]["action"] == "reuse", plan.stderr
    _tamper(base, base.stat().st_size // 2)
    index_before = (dest / "index.json").read_bytes()
    done = _run_convert(f"oci:{src}:v1", f"oci:{dest}:converted", tmp_path / "policy", keys, *plain)
    assert done.returncode == 7, done.stderr
    assert "digest" in done.stderr and "Traceback" not in done.stderr
    assert (dest / "index.json").read_bytes() == index_before
    assert not (tmp_path / "policy").exists()


class _Source:
    def __init__(self, reference: str) -> None:
        self.reference = reference


def test_a_layer_that_changes_between_the_analysis_and_the_conversion_is_refused(
    fixture_image, keys: Keys, tmp_path: Path, runtime, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    import sconify.convert as conversion
    from sconify.errors import IntegrityError

    archive = tmp_path / "src.tar"
    ref = _docker_archive(fixture_image("python-app"), archive)
    genuine = archive.read_bytes()
    at = genuine.find(b"root:x:0:0")  # /etc/passwd, which the analysis reads (it names the image's users)
    assert at > 0
    _tamper(archive, at + 1)  # the analysis sees this; the layer pass would see the genuine, verified bytes
    analyze = conversion.prepare

    def analyze_then_restore(*args: Any, **kwargs: Any) -> Any:
        prepared = analyze(*args, **kwargs)
        with open(archive, "r+b") as f:  # same file, same inode: the open archive sees the change
            f.write(genuine)
        return prepared

    monkeypatch.setattr(conversion, "prepare", analyze_then_restore)
    with pytest.raises(IntegrityError, match="changed while sconify read it"):
        convert_image(_Source(ref), f"oci:{tmp_path / 'out'}:latest", tmp_path / "policy", keys, sign=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "policy").exists()


def test_a_registry_source_is_downloaded_once_however_often_it_is_read(
    registry, fixture_image, keys: Keys, tmp_path: Path, runtime, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    import collections
    import tempfile

    from infra.images import skopeo

    from sconify.image.transports.registry import RegistryBlobSource

    skopeo("copy", "--dest-tls-verify=false", fixture_image("python-app").reference,
           registry.ref("spool/native", "1"))
    fetched: collections.Counter[str] = collections.Counter()
    real_open = RegistryBlobSource.open_blob

    def counting_open(self: RegistryBlobSource, desc: Any) -> Any:
        fetched[desc.digest] += 1
        return real_open(self, desc)

    monkeypatch.setattr(RegistryBlobSource, "open_blob", counting_open)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the spool goes
    conv = convert_image(_Source(registry.ref("spool/native", "1")), f"oci:{tmp_path / 'out'}:latest",
                         tmp_path / "policy", keys, sign=False)
    report = conv.result.report
    layers = [la["digest"] for la in report["layers"]]
    assert any(la["result"] == "rewritten" for la in report["layers"])
    assert all(fetched[d] == 1 for d in layers), fetched  # the analysis and the layer pass read them all
    assert not list(tmp_path.glob("sconify-spool-*"))  # the spool is gone with the conversion


def _source_plaintexts(layout: Path) -> dict[bytes, tuple[str, int, bytes]]:
    """Volume path -> (DiffID, content offset, content) of each visible regular file of an OCI layout."""
    config, layers = _layers(layout)
    out: dict[bytes, tuple[str, int, bytes]] = {}
    for desc, diff_id in zip(layers, config["rootfs"]["diff_ids"], strict=True):
        with tarfile.open(fileobj=io.BytesIO(_tar_bytes(layout, desc)), mode="r:") as tar:
            for member in tar:
                if member.isreg():
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    out[b"/" + member.name.lstrip("./").encode("utf-8", "surrogateescape")] = (
                        diff_id, member.offset_data, data)
    return out


def _registry_volume(registry: Any, repository: str, tag: str) -> bytes:
    """The FSPF metadata of an image in the test registry, read with plain HTTP calls."""
    import requests

    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    manifest = requests.get(f"{registry.url}/v2/{repository}/manifests/{tag}", headers={"Accept": accept},
                            timeout=30).json()
    blob = requests.get(f"{registry.url}/v2/{repository}/blobs/{manifest['layers'][-1]['digest']}", timeout=30)
    data = blob.content
    tar = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as archive:
        member = archive.extractfile(VOLUME)
        assert member is not None
        return member.read()


@pytest.mark.parametrize("source_kind", ["local archive", "registry"])
def test_nonces_into_a_registry_are_positional_only_for_bytes_verified_before_sealing(
    source_kind: str, registry, fixture_image, keys: Keys, tmp_path: Path, runtime  # noqa: F811
) -> None:
    """Upload chunks leave the machine before a layer's end is verified: sealing a local file straight into a
    registry uses synthetic nonces; a registry blob, verified whole into the spool first, may use positions."""
    from infra.images import skopeo

    fixture = fixture_image("python-app")
    if source_kind == "registry":
        skopeo("copy", "--dest-tls-verify=false", fixture.reference, registry.ref("nonces/native", "1"))
        source = registry.ref("nonces/native", "1")
    else:
        source = _docker_archive(fixture, tmp_path / "src.tar")
    repository = f"nonces/{source_kind.replace(' ', '-')}"
    conv = convert_image(_Source(source), registry.ref(repository, "1"), tmp_path / "policy", keys, sign=False)
    service = conv.service
    key = bytes.fromhex(service["fspf_key"])
    reader = SpecReader(_registry_volume(registry, repository, "1"), key, bytes.fromhex(service["fspf_tag"]))
    sources = _source_plaintexts(Path(fixture.layout))
    kinds = set()
    for path, record in reader.records.items():
        if record["kind"] != 1 or not record["chunks"]:
            continue
        diff_id, offset, plain = sources[path]
        _, nonce_key = reader.file_keys(path)
        digest = bytes.fromhex(diff_id.split(":", 1)[1])
        for index, (nonce, _tag) in enumerate(record["chunks"]):
            chunk = plain[index * reader.chunk : (index + 1) * reader.chunk]
            synthetic = hmac.digest(nonce_key, struct.pack("<Q", index) + chunk, "sha256")[:12]
            position = hmac.digest(nonce_key, b"layer\0" + digest + struct.pack("<QQ", offset, index), "sha256")[:12]
            assert nonce in (synthetic, position), (path, index)
            kinds.add("synthetic" if nonce == synthetic else "position")
    assert kinds == ({"synthetic"} if source_kind == "local archive" else {"position"})


# -- gzip layers of a local layout: read unverified by the analysis, verified by the layer pass ------------------


def _gzip_layout(fixture: Any, dest: Path) -> Path:
    """A copy of the fixture's OCI layout (gzip layers) that a test may change."""
    src = Path(fixture.reference[len("oci:"):].rsplit(":", 1)[0])
    shutil.copytree(src, dest)
    return dest


def _layer_holding(layout: Path, needle: bytes) -> Path:
    _, layers = _layers(layout)
    for desc in layers:
        if needle in _tar_bytes(layout, desc):
            assert desc["mediaType"].endswith("+gzip")
            return blob_path(layout, desc["digest"])
    raise AssertionError(f"no layer holds {needle!r}")


def test_a_tampered_gzip_layer_of_a_local_layout_stops_the_conversion(
    fixture_image, keys: Keys, tmp_path: Path, runtime  # noqa: F811
) -> None:
    src = _gzip_layout(fixture_image("python-app"), tmp_path / "src")
    blob = _layer_holding(src, b"def ")
    _tamper(blob, blob.stat().st_size // 2)
    done = _run_convert(f"oci:{src}:latest", f"oci:{tmp_path / 'out'}:latest", tmp_path / "policy", keys)
    assert done.returncode == 7, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "policy").exists()


def test_a_gzip_layer_that_changes_between_the_analysis_and_the_conversion_is_refused(
    fixture_image, keys: Keys, tmp_path: Path, runtime, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    import sconify.convert as conversion
    from sconify.errors import IntegrityError

    src = _gzip_layout(fixture_image("python-app"), tmp_path / "src")
    blob = _layer_holding(src, b"root:x:0:0")  # /etc/passwd, which the analysis reads
    genuine = blob.read_bytes()
    # What the analysis sees: another valid gzip stream, of a tar that names other users.
    changed = gzip.compress(gzip.decompress(genuine).replace(b"root:x:0:0", b"root:x:0:7"), mtime=0)
    blob.write_bytes(changed)
    analyze = conversion.prepare

    def analyze_then_restore(*args: Any, **kwargs: Any) -> Any:
        prepared = analyze(*args, **kwargs)
        blob.write_bytes(genuine)  # the layer pass reads the genuine bytes, which verify
        return prepared

    monkeypatch.setattr(conversion, "prepare", analyze_then_restore)
    with pytest.raises(IntegrityError, match="changed while sconify read it"):
        convert_image(_Source(f"oci:{src}:latest"), f"oci:{tmp_path / 'out'}:latest", tmp_path / "policy", keys,
                      sign=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "policy").exists()


@pytest.mark.parametrize("destination", ["empty", "holds-the-blob"])
def test_a_reused_gzip_layer_whose_diff_id_is_wrong_is_refused(
    fixture_image, keys: Keys, tmp_path: Path, runtime, destination: str  # noqa: F811
) -> None:
    """The blob is intact (its digest verifies) but the config names another DiffID: a raw copy of the reused
    layer cannot notice, so the conversion must inflate it to check, whether it copies the blob or finds it at
    the destination already."""
    src = _gzip_layout(fixture_image("python-app"), tmp_path / "src")
    plain = ["--plain", "/", "--plain", "/bin/busybox"]  # the base layer is reused, as it is
    plan = subprocess.run([sys.executable, "-m", "sconify", "convert", f"oci:{src}:latest", *plain,
                           "--dry-run", "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(plan.stdout)["layers"][0]["action"] == "reuse", plan.stderr
    index_path = src / "index.json"
    index = json.loads(index_path.read_text())
    manifest_desc = index["manifests"][0]
    manifest = json.loads(blob_path(src, manifest_desc["digest"]).read_bytes())
    config = json.loads(blob_path(src, manifest["config"]["digest"]).read_bytes())
    config["rootfs"]["diff_ids"][0] = "sha256:" + hashlib.sha256(b"another layer").hexdigest()

    def put(data: bytes) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (src / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifest["config"].update(put(json.dumps(config).encode()))
    manifest_desc.update(put(json.dumps(manifest).encode()))
    index_path.write_text(json.dumps(index))
    dest = tmp_path / "dest"
    if destination == "holds-the-blob":
        shutil.copytree(src, dest)
    done = _run_convert(f"oci:{src}:latest", f"oci:{dest}:converted", tmp_path / "policy", keys, *plain)
    assert done.returncode == 7, done.stderr
    assert "DiffID" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "policy").exists()
    if destination == "empty":
        assert not dest.exists()
