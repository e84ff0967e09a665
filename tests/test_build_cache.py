"""The per-layer cache: a repeated conversion reuses every layer and gives the same image, byte for byte."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert_support import decompressed

from fixtures.builder import build_image

BUSYBOX = Path("/usr/bin/busybox")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("keys")
    (base / "fspf.key").write_text("ab" * 32)
    subprocess.run([sys.executable, "-m", "sconify", "keys", "generate", "--enclave", str(base / "enc.pem")],
                   check=True, capture_output=True)
    return base


def convert(src: str, dst: str, policy: Path, keys: Path, cache: Path) -> dict:
    env = {"SCONIFY_RUNTIME": str(BUSYBOX), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "sconify", "convert", src, dst, "--policy-out", str(policy),
         "--fspf-key", str(keys / "fspf.key"), "--enclave-key", str(keys / "enc.pem"), "--cache", str(cache),
         "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_second_conversion_is_served_from_the_cache_and_identical(tmp_path, keys):
    build_image("busybox-sh", tmp_path / "native", "latest")
    first = convert(f"oci:{tmp_path}/native:latest", f"oci:{tmp_path}/a:latest", tmp_path / "p1", keys,
                    tmp_path / "cache")
    second = convert(f"oci:{tmp_path}/native:latest", f"oci:{tmp_path}/b:latest", tmp_path / "p2", keys,
                     tmp_path / "cache")
    assert [layer["action"] for layer in second["layers"]] == ["cached"] * len(second["layers"])
    assert "cached" not in [layer["action"] for layer in first["layers"]]
    assert first["digest"] == second["digest"]
    assert first["mrenclave"] == second["mrenclave"] and first["fspf_tag"] == second["fspf_tag"]
    # The cache holds ciphertext only: no marker of an encrypted file in any cached blob.
    markers = [b"SCONIFY-MARKER-busybox-sh-conf", b"SCONIFY-MARKER-busybox-sh-python"]
    for blob in (tmp_path / "cache").rglob("blob"):
        data = decompressed(blob.read_bytes())
        assert not any(m in data for m in markers)


def test_another_key_misses_the_cache(tmp_path, keys):
    build_image("busybox-sh", tmp_path / "native", "latest")
    convert(f"oci:{tmp_path}/native:latest", f"oci:{tmp_path}/a:latest", tmp_path / "p1", keys, tmp_path / "cache")
    other = tmp_path / "other"
    other.mkdir()
    (other / "fspf.key").write_text("cd" * 32)
    (other / "enc.pem").write_bytes((keys / "enc.pem").read_bytes())
    result = convert(f"oci:{tmp_path}/native:latest", f"oci:{tmp_path}/b:latest", tmp_path / "p2", other,
                     tmp_path / "cache")
    rewritten = [layer["action"] for layer in result["layers"]]
    assert "cached" not in rewritten


def test_header_scans_of_layers_read_in_place_are_kept_once_verified(tmp_path, keys):
    """The analysis reads local layers in place, unverified; their header scans go to the cache only after the
    layer pass verified them, so the next conversion does not read them again, and a failed one keeps none."""
    build_image("busybox-sh", tmp_path / "native", "latest")
    index = json.loads((tmp_path / "native" / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((tmp_path / "native" / "blobs" / "sha256" / manifest_digest).read_bytes())
    digests = [layer["digest"].replace(":", "-") for layer in manifest["layers"]]
    convert(f"oci:{tmp_path}/native:latest", f"oci:{tmp_path}/a:latest", tmp_path / "p1", keys, tmp_path / "cache")
    kept = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "headers").iterdir())
    assert kept == sorted(digests)
    # A layer that fails verification: nothing of this conversion is kept.
    build_image("busybox-sh", tmp_path / "bad", "latest")
    blob = tmp_path / "bad" / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":", 1)[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    env = {"SCONIFY_RUNTIME": str(BUSYBOX), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "sconify", "convert", f"oci:{tmp_path}/bad:latest", f"oci:{tmp_path}/b:latest",
         "--policy-out", str(tmp_path / "p2"), "--fspf-key", str(keys / "fspf.key"), "--enclave-key",
         str(keys / "enc.pem"), "--cache", str(tmp_path / "fresh-cache")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 7, proc.stderr
    headers = tmp_path / "fresh-cache" / "headers"
    assert not headers.exists() or not any(headers.iterdir())
