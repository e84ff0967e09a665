"""The promises of ``sconify convert``, proved on fixture images: the round trip (decrypting the protected files
with the policy's key and adding the unprotected ones gives back the source's file tree exactly), no plaintext
and no key in any output blob, and reproducible output.

The trees are unpacked by umoci (an independent implementation of the layer rules) and decrypted by the FSPF
reader (``DirectoryVolume.decrypt_to``, what ``sconify fs decrypt`` runs); blobs are read as plain files.
"""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from test_convert_support import (
    Converted,
    Keys,
    blob_path,
    cached_conversion,
    convert_image,
    keys,  # noqa: F401 (fixture)
    layout_blobs,
    layout_manifest,
    real_runtime,
    tree_facts,
)

from sconify.build.runtime import RUNTIME_ENV
from sconify.fspf import DirectoryVolume, VolumeKey

FIXTURES = ("busybox-sh", "dynamic-c", "python-app")


def _unpack(layout_ref: str, bundle: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", layout_ref, str(bundle)], check=True, capture_output=True,
                   text=True, timeout=120)
    return bundle / "rootfs"


def _mode(regions: dict[str, str], path: str) -> str:
    """The mode of the longest region prefix that contains ``path`` (whole components)."""
    best = max((r for r in regions if r == "/" or path == r or path.startswith(r + "/")), key=len)
    return regions[best]


@pytest.fixture(scope="module", params=FIXTURES)
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, fixture_image,
              keys: Keys) -> Converted:  # noqa: F811
    return cached_conversion(tmp_path_factory, fixture_image, keys, request.param)


def test_round_trip_gives_back_the_source_tree(converted: Converted, tmp_path: Path) -> None:
    source_root = _unpack(f"{converted.source.layout}:{converted.source.tag}", tmp_path / "source")
    output_root = _unpack(f"{converted.layout}:latest", tmp_path / "output")
    service = converted.service
    plain = tmp_path / "plain"
    with DirectoryVolume(output_root, VolumeKey.from_hex(service["fspf_key"]), bytes.fromhex(service["fspf_tag"]),
                         metadata_path=service["fspf_path"]) as volume:
        report = volume.decrypt_to(plain)
    assert report.ok and report.files > 0

    expected, expected_links = tree_facts(source_root)
    got, got_links = tree_facts(plain, skip=(".sconify",))
    assert sorted(got) == sorted(expected)
    differing = {path: (expected[path], got[path]) for path in expected if expected[path] != got[path]}
    assert differing == {}
    assert got_links == expected_links
    # The image itself keeps the ciphertext: every file of an encrypted region differs from its source.
    regions = {r["path"]: r["mode"] for r in converted.result.report["regions"]}
    changed = [p for p, f in expected.items() if f.kind == "-" and f.size and _mode(regions, "/" + p) == "encrypted"]
    assert changed, "the fixture has files in an encrypted region"
    stored, _ = tree_facts(output_root)
    for path in changed:
        assert stored[path].size == expected[path].size
        assert stored[path].sha256 != expected[path].sha256, f"/{path} is stored in plaintext"


def test_no_marker_and_no_key_in_any_output_blob(converted: Converted, keys: Keys) -> None:  # noqa: F811
    regions = {r["path"]: r["mode"] for r in converted.result.report["regions"]}
    secret_markers = []
    for marker in converted.source.markers:
        if marker.location.startswith("config:") or _mode(regions, marker.location) == "encrypted":
            secret_markers.append(marker)
        else:
            # Only the measured program stays readable (it is loaded before attestation; MRENCLAVE covers it).
            assert marker.location == converted.result.plan.executable, marker
    markers = [m.value.encode() for m in secret_markers]
    assert len(markers) >= 4
    secrets = keys.secrets()
    found = []
    for name, data in layout_blobs(converted.layout):
        found += [(name, m.decode()) for m in markers if m in data]
        found += [(name, f"secret #{i}") for i, s in enumerate(secrets) if s in data]
    assert found == []
    # The layout also holds nothing but blobs, index.json and oci-layout.
    assert sorted(p.name for p in converted.layout.iterdir()) == ["blobs", "index.json", "oci-layout"]


def test_policy_directory_is_private_and_the_report_holds_no_key(converted: Converted, keys: Keys) -> None:  # noqa: F811
    policy = converted.policy_dir
    assert stat.S_IMODE(policy.stat().st_mode) == 0o700
    for name in ("session.yml", "report.json", "enclave.sig", "enclave.sgxs"):
        assert stat.S_IMODE((policy / name).stat().st_mode) == 0o600, name
    report_bytes = (policy / "report.json").read_bytes()
    for secret in keys.secrets():
        assert secret not in report_bytes
    assert converted.service["fspf_key"].encode() not in report_bytes
    report = json.loads(report_bytes)
    digest, manifest = layout_manifest(converted.layout)
    assert report["digest"] == digest == converted.result.digest
    assert report["source_digest"] == converted.source.digest
    assert report["mrenclave"] in converted.service["mrenclaves"]
    assert report["fspf_tag"] == converted.service["fspf_tag"]
    encrypted = next(s for s in report["region_stats"] if s["mode"] == "encrypted")
    assert encrypted["files"] > 0 and encrypted["bytes"] > 0
    # The manifest names its source and sconify's results; the config keeps only the runtime's variables.
    annotations = manifest["annotations"]
    assert annotations["org.opencontainers.image.base.digest"] == converted.source.digest
    assert annotations["io.sconify.mrenclave"] == report["mrenclave"]
    config = json.loads(blob_path(converted.layout, manifest["config"]["digest"]).read_bytes())
    assert config["config"]["Entrypoint"] == ["/.sconify/bin/sconify-run"]
    assert "Cmd" not in config["config"]
    names = {item.split("=", 1)[0] for item in config["config"]["Env"]}
    assert {"SCONE_CAS_ADDR", "SCONE_LAS_ADDR", "SCONE_CONFIG_ID", "SCONE_HEAP"} <= names
    assert all(n.startswith(("SCONE_", "SCONIFY_")) for n in names)
    assert len(config["history"]) - sum(1 for h in config["history"] if h.get("empty_layer")) == len(
        manifest["layers"])


def test_layers_without_encrypted_files_are_reused_byte_for_byte(converted: Converted) -> None:
    source = converted.source.manifests[0]
    _, manifest = layout_manifest(converted.layout)
    layers = converted.result.report["layers"]
    assert len(manifest["layers"]) == len(source.layers) + 2  # plus the runtime and protection layers
    for action, out in zip(layers, manifest["layers"], strict=False):
        src = source.layers[action["index"]]
        if action["action"] == "reuse":
            assert out["digest"] == src.digest
        else:
            assert action["encrypted_files"] + action["dropped_files"] > 0
            assert out["digest"] != src.digest


def test_same_keys_and_options_give_the_same_manifest_digest(
    tmp_path: Path, fixture_image, keys: Keys, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    if not real_runtime():
        monkeypatch.setenv(RUNTIME_ENV, "/usr/bin/busybox")
    source = fixture_image("busybox-sh")
    first = convert_image(source, f"oci:{tmp_path / 'a'}:latest", tmp_path / "pa", keys)
    second = convert_image(source, f"oci:{tmp_path / 'b'}:latest", tmp_path / "pb", keys)
    assert first.result.digest == second.result.digest
    assert layout_manifest(first.layout)[0] == layout_manifest(second.layout)[0] == first.result.digest
    # The enclave signature too is byte for byte the same (its date comes from the source, not the clock).
    assert (tmp_path / "pa" / "enclave.sig").read_bytes() == (tmp_path / "pb" / "enclave.sig").read_bytes()
    assert first.service == second.service

    other = convert_image(source, f"oci:{tmp_path / 'c'}:latest", tmp_path / "pc", keys, fspf_key=keys.other_fspf)
    assert other.result.digest != first.result.digest
    assert other.result.mrenclave == first.result.mrenclave  # the key is no part of the measurement
    assert other.service["fspf_tag"] != first.service["fspf_tag"]
