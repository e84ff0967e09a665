"""Cosign-format signatures: payload, storage under the .sig tag, verification, key handling."""

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sconify.errors import DestinationError, KeyMaterialError, VerificationFailed
from sconify.image.reference import parse_reference
from sconify.image.transports import open_destination, open_image
from sconify.signing.cosign import (
    sign,
    signature_manifest,
    signature_tag,
    simple_signing_payload,
    verify_signature_image,
    write_signature,
)
from sconify.signing.keys import generate_cosign_keys, load_signing_key, load_verify_key

DIGEST = "sha256:" + "ab" * 32


def test_signature_tag_follows_cosign_discovery_rule():
    assert signature_tag(DIGEST) == "sha256-" + "ab" * 32 + ".sig"


def test_generated_keys_are_p256_pkcs8_and_private_is_0600(tmp_path):
    pair = generate_cosign_keys(tmp_path / "cosign", passphrase=b"s3cret")
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    pem = pair.private_path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = load_signing_key(pair.private_path, b"s3cret")
    assert isinstance(key.curve, ec.SECP256R1)
    with pytest.raises(KeyMaterialError, match="wrong passphrase"):
        load_signing_key(pair.private_path, b"nope")
    with pytest.raises(KeyMaterialError, match="encrypted"):
        load_signing_key(pair.private_path)
    with pytest.raises(DestinationError, match="already exists"):
        generate_cosign_keys(tmp_path / "cosign")


def test_wrong_kind_of_key_is_refused_with_the_way_out(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.key"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(KeyMaterialError, match="sconify keys generate --cosign"):
        load_signing_key(path)


def test_signature_round_trip_in_an_oci_layout_verified_independently(tmp_path):
    pair = generate_cosign_keys(tmp_path / "k")
    key = load_signing_key(pair.private_path)
    payload = simple_signing_payload("registry.example/app", DIGEST)
    sig = signature_manifest(payload, sign(key, payload))
    layout = tmp_path / "layout"
    write_signature(open_destination(parse_reference(f"oci:{layout}:{signature_tag(DIGEST)}")), sig)

    # Independent check: read the layout by hand and verify with cryptography directly.
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == signature_tag(DIGEST)
    manifest = json.loads((layout / "blobs/sha256" / entry["digest"][7:]).read_bytes())
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    body = (layout / "blobs/sha256" / layer["digest"][7:]).read_bytes()
    assert json.loads(body)["critical"]["image"]["docker-manifest-digest"] == DIGEST
    assert json.loads(body)["critical"]["type"] == "cosign container image signature"
    public = serialization.load_pem_public_key(pair.public_path.read_bytes())
    public.verify(
        base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"]), body, ec.ECDSA(hashes.SHA256())
    )

    # And through sconify's own verifier.
    image = open_image(parse_reference(f"oci:{layout}:{signature_tag(DIGEST)}"))
    verified = verify_signature_image(image, load_verify_key(pair.public_path), DIGEST)
    assert verified.docker_reference == "registry.example/app"


def test_verification_refuses_other_key_and_other_digest(tmp_path):
    pair = generate_cosign_keys(tmp_path / "k")
    other = generate_cosign_keys(tmp_path / "other")
    key = load_signing_key(pair.private_path)
    payload = simple_signing_payload("x/y", DIGEST)
    layout = tmp_path / "layout"
    write_signature(
        open_destination(parse_reference(f"oci:{layout}:t")), signature_manifest(payload, sign(key, payload))
    )
    image = open_image(parse_reference(f"oci:{layout}:t"))
    with pytest.raises(VerificationFailed, match="does not verify"):
        verify_signature_image(image, load_verify_key(other.public_path), DIGEST)
    with pytest.raises(VerificationFailed, match="signs"):
        verify_signature_image(image, load_verify_key(pair.public_path), "sha256:" + "cd" * 32)


def test_signatures_are_reproducible(tmp_path: Path):
    pair = generate_cosign_keys(tmp_path / "k")
    key = load_signing_key(pair.private_path)
    payload = simple_signing_payload("x/y", DIGEST)
    assert (
        signature_manifest(payload, sign(key, payload)).digest == signature_manifest(payload, sign(key, payload)).digest
    )
