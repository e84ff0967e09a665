"""Independent judges of ``sconify convert``'s output: skopeo and umoci read the OCI layout, the Docker engine
loads (and runs) the docker-archive output, and the cosign signature pushed to a real registry is read back with
plain HTTP requests and checked with ``cryptography`` alone, as cosign's SIGNATURE_SPEC describes it."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from infra.images import skopeo
from test_convert_support import (
    Converted,
    Keys,
    cached_conversion,
    convert_image,
    keys,  # noqa: F401 (fixture)
    layout_manifest,
    real_runtime,
    run_cli,
)

from sconify.build.runtime import RUNTIME_ENV
from sconify.convert import convert
from sconify.image.reference import parse_reference
from sconify.plan import ConvertOptions

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"


@pytest.fixture
def busybox(tmp_path_factory: pytest.TempPathFactory, fixture_image, keys: Keys) -> Converted:  # noqa: F811
    return cached_conversion(tmp_path_factory, fixture_image, keys, "busybox-sh")


@pytest.fixture
def runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if not real_runtime():
        monkeypatch.setenv(RUNTIME_ENV, "/usr/bin/busybox")


def test_skopeo_inspects_and_copies_the_oci_output(busybox: Converted, tmp_path: Path) -> None:
    ref = f"oci:{busybox.layout}:latest"
    info = json.loads(skopeo("inspect", ref).stdout)
    assert info["Digest"] == busybox.result.digest
    assert len(info["Layers"]) == len(busybox.source.manifests[0].layers) + 2
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    # skopeo copy reads every blob and checks it against its digest (without --preserve-digests it would gzip
    # the layers sconify stores uncompressed, and so change the digest).
    skopeo("copy", "--preserve-digests", ref, f"oci:{tmp_path / 'copy'}:latest")
    assert layout_manifest(tmp_path / "copy")[0] == busybox.result.digest


def test_umoci_unpacks_the_oci_output_with_the_runtime_as_entrypoint(busybox: Converted, tmp_path: Path) -> None:
    run = subprocess.run(["umoci", "unpack", "--image", f"{busybox.layout}:latest", str(tmp_path / "bundle")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rootfs = tmp_path / "bundle" / "rootfs"
    runtime = rootfs / ".sconify" / "bin" / "sconify-run"
    assert runtime.read_bytes()[:4] == b"\x7fELF" and runtime.stat().st_mode & 0o111
    assert (rootfs / ".sconify" / "fspf" / "volume.fspf").read_bytes()[:8] == b"SCNYFSPF"
    spec = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert spec["process"]["args"] == ["/.sconify/bin/sconify-run"]
    session = busybox.session
    assert f"SCONE_CONFIG_ID={session['name']}/{busybox.service['name']}" in spec["process"]["env"]


def test_docker_loads_and_runs_the_docker_archive_output(
    dockerd, fixture_image, keys: Keys, tmp_path: Path, runtime_env: None  # noqa: F811
) -> None:
    source = fixture_image("busybox-sh")
    archive = tmp_path / "conf.tar"
    converted = convert_image(source, f"docker-archive:{archive}:sconify-test/busybox-conf:1", tmp_path / "policy",
                              keys, sign=False, session="demo", service="app")
    loaded = dockerd.load(archive)
    assert "sconify-test/busybox-conf:1" in loaded.stdout
    config = json.loads(dockerd.run("image", "inspect", "sconify-test/busybox-conf:1", check=True).stdout)[0]
    assert config["Config"]["Entrypoint"] == ["/.sconify/bin/sconify-run"]
    assert "SCONE_CONFIG_ID=demo/app" in config["Config"]["Env"]
    assert not any(e.startswith("DB_PASSWORD=") for e in config["Config"]["Env"])
    if not real_runtime():
        pytest.skip("the open runtime is not built (scripts/build-runtime); the image was only loaded")
    session = converted.policy_dir / "session.yml"
    run = dockerd.run_container(
        "sconify-test/busybox-conf:1",
        options=("-v", f"{session}:/run/sconify/session.yml:ro", "-e", "SCONIFY_SESSION_FILE=/run/sconify/session.yml"),
    )
    assert run.returncode == 0, run.stderr
    for line in source.facts["stdout"]:  # run.sh reads its greeting from an encrypted file
        assert line in run.stdout.splitlines()


def _http_manifest(url: str, reference: str) -> tuple[bytes, str]:
    resp = requests.get(f"{url}/manifests/{reference}", timeout=10,
                        headers={"Accept": f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"})
    resp.raise_for_status()
    return resp.content, resp.headers.get("Content-Type", "")


@dataclass(frozen=True)
class Pushed:
    result: Any
    policy: Path
    repository: str
    tag: str


@pytest.fixture(scope="module")
def pushed(registry, fixture_image, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pushed]:  # noqa: F811
    """busybox-sh pushed to the registry, then converted from there into another repository, signed."""
    source = fixture_image("busybox-sh")
    policy = tmp_path_factory.mktemp("judges-policy") / "policy"
    # The source lives in the same registry, so layers reused unchanged are mounted, not uploaded.
    skopeo("copy", "--dest-tls-verify=false", source.reference, registry.ref("judges/native", "1.4"))
    with pytest.MonkeyPatch.context() as mp:
        if not real_runtime():
            mp.setenv(RUNTIME_ENV, "/usr/bin/busybox")
        result = convert(parse_reference(registry.ref("judges/native", "1.4")),
                         parse_reference(registry.ref("judges/confidential", "1.4")), ConvertOptions(),
                         policy_out=policy, fspf_key_file=keys.fspf, enclave_key_file=keys.enclave,
                         sign_key_file=keys.cosign_key)
    yield Pushed(result, policy / "session.yml", "judges/confidential", "1.4")


def test_signature_in_the_registry_follows_cosigns_format(
    registry, pushed: Pushed, keys: Keys, capsys  # noqa: F811
) -> None:
    result = pushed.result
    reused = [layer for layer in result.layers if layer["action"] != "rewritten"]
    assert reused and all(layer["action"] == "mounted" for layer in reused)

    base = f"{registry.url}/v2/{pushed.repository}"
    manifest, _ = _http_manifest(base, pushed.tag)
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    assert digest == result.digest

    sig_manifest_bytes, content_type = _http_manifest(base, "sha256-" + digest.split(":")[1] + ".sig")
    sig_manifest = json.loads(sig_manifest_bytes)
    assert sig_manifest["schemaVersion"] == 2
    assert sig_manifest.get("mediaType", content_type.split(";")[0]) == OCI_MANIFEST
    assert sig_manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    layer = sig_manifest["layers"][0]
    assert layer["mediaType"] == SIMPLE_SIGNING
    payload = requests.get(f"{base}/blobs/{layer['digest']}", timeout=10).content
    assert len(payload) == layer["size"]
    assert "sha256:" + hashlib.sha256(payload).hexdigest() == layer["digest"]
    claims = json.loads(payload)
    assert claims["critical"]["type"] == "cosign container image signature"
    assert claims["critical"]["image"]["docker-manifest-digest"] == digest
    assert claims["critical"]["identity"]["docker-reference"] == f"{registry.host}/{pushed.repository}"

    public = serialization.load_pem_public_key(keys.cosign_pub.read_bytes())
    signature = base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION])
    public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))  # raises InvalidSignature if wrong
    other = serialization.load_pem_public_key(keys.other_pub.read_bytes())
    with pytest.raises(InvalidSignature):
        other.verify(signature, payload, ec.ECDSA(hashes.SHA256()))

    # skopeo pulls the pushed image, and sconify's own verify agrees with the judges.
    ref = registry.ref(pushed.repository, pushed.tag)
    info = json.loads(skopeo("inspect", "--tls-verify=false", ref).stdout)
    assert info["Digest"] == digest
    run = run_cli(capsys, "verify", ref, "--policy", str(pushed.policy), "--key", str(keys.cosign_pub))
    assert run.code == 0, run.stdout + run.stderr
    assert [line.split()[:2] for line in run.stdout.splitlines()] == [
        ["signature:", "ok:"], ["mrenclave:", "ok:"], ["fspf:", "ok:"]]


@pytest.mark.skipif(shutil.which("cosign") is None, reason="no cosign binary on PATH; the format is checked above")
def test_cosign_itself_verifies_the_signature(registry, pushed: Pushed, keys: Keys) -> None:  # noqa: F811
    done = subprocess.run(
        ["cosign", "verify", "--key", str(keys.cosign_pub), "--insecure-ignore-tlog=true", "--allow-http-registry",
         f"{registry.host}/{pushed.repository}@{pushed.result.digest}"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
