"""Cosign's key-based signature format (sigstore/cosign specs/SIGNATURE_SPEC.md): a simple-signing payload
signed with ECDSA P-256, stored as an OCI manifest under the tag ``sha256-<hex>.sig``."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sconify.errors import NotFoundError, VerificationFailed
from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor, Image, sha256_digest
from sconify.image.transports.base import Destination, verify_document

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
# cosign's empty-platform config: created at the zero time, one diff_id per payload.
_ZERO_TIME = "0001-01-01T00:00:00Z"


def signature_tag(manifest_digest: str) -> str:
    """The tag under which cosign finds the signatures of an image: ``sha256-<hex>.sig``."""
    return manifest_digest.replace(":", "-") + ".sig"


def simple_signing_payload(
    docker_reference: str, manifest_digest: str, optional: dict[str, Any] | None = None
) -> bytes:
    """The simple-signing JSON that is signed: identity, manifest digest and type."""
    payload = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": optional,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    """Base64 of the DER ECDSA P-256 / SHA-256 signature over the payload (RFC 6979, so reproducible)."""
    der = key.sign(payload, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return base64.b64encode(der).decode()


@dataclass(frozen=True)
class SignatureManifest:
    """The blobs and manifest that carry one signature."""

    payload: bytes
    config: bytes
    manifest: bytes

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def signature_manifest(payload: bytes, signature_b64: str) -> SignatureManifest:
    payload_desc = Descriptor(
        mt.SIMPLE_SIGNING, sha256_digest(payload), len(payload), {SIGNATURE_ANNOTATION: signature_b64}
    )
    config = json.dumps(
        {
            "architecture": "",
            "config": {},
            "created": _ZERO_TIME,
            "history": [{"created": _ZERO_TIME}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [payload_desc.digest]},
        },
        separators=(",", ":"),
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "size": len(config), "digest": sha256_digest(config)},
        "layers": [payload_desc.to_json()],
    }
    return SignatureManifest(payload, config, json.dumps(manifest, separators=(",", ":")).encode())


def write_signature(dest: Destination, sig: SignatureManifest) -> str:
    """Store a signature manifest through a destination opened at the ``.sig`` tag; returns where."""
    try:
        for data, media_type in ((sig.payload, mt.SIMPLE_SIGNING), (sig.config, mt.OCI_CONFIG)):
            desc = Descriptor(media_type, sha256_digest(data), len(data))
            if not dest.has_blob(desc):
                dest.put_blob(desc, io.BytesIO(data))
        dest.put_manifest(sig.manifest, mt.OCI_MANIFEST)
        return dest.commit()
    except BaseException:
        dest.abort()
        raise


@dataclass(frozen=True)
class VerifiedSignature:
    docker_reference: str
    manifest_digest: str
    payload: dict[str, Any]


def verify_signature_image(sig_image: Image, key: ec.EllipticCurvePublicKey, manifest_digest: str) -> VerifiedSignature:
    """Check that one of the signatures in a ``.sig`` image is valid for ``key`` and names ``manifest_digest``."""
    problems = []
    for layer in sig_image.layers:
        desc = layer.descriptor
        if desc.media_type != mt.SIMPLE_SIGNING:
            continue
        signature = (desc.annotations or {}).get(SIGNATURE_ANNOTATION)
        if not signature:
            problems.append(f"layer {desc.digest} carries no signature annotation")
            continue
        with sig_image.source.open_blob(desc) as f:
            payload = verify_document(f.read(desc.size + 1), desc, f"signature payload {desc.digest}")
        try:
            key.verify(base64.b64decode(signature), payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            problems.append(f"the signature over payload {desc.digest} does not verify with the given key")
            continue
        doc = json.loads(payload)
        critical = doc.get("critical") or {}
        named = (critical.get("image") or {}).get("docker-manifest-digest")
        if critical.get("type") != PAYLOAD_TYPE or named != manifest_digest:
            problems.append(f"payload {desc.digest} signs {named}, not {manifest_digest}")
            continue
        return VerifiedSignature((critical.get("identity") or {}).get("docker-reference", ""), named, doc)
    if not problems:
        raise NotFoundError(f"no cosign signature was found for {manifest_digest}; sign the image first.")
    raise VerificationFailed(f"no valid signature for {manifest_digest}: {'; '.join(problems)}.")
