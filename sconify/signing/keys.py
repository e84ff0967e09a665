"""Image-signing keys: ECDSA P-256 in PKCS#8 PEM (optionally passphrase-protected) and PKIX public keys."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sconify.errors import KeyMaterialError
from sconify.secretfile import read_secret, write_secret

PASSPHRASE_ENV = "SCONIFY_SIGN_KEY_PASSPHRASE"
_HOW = "make one with `sconify keys generate --cosign PREFIX`"


@dataclass(frozen=True)
class CosignKeyPair:
    private_path: Path
    public_path: Path


def generate_cosign_keys(prefix: Path, passphrase: bytes | None = None, force: bool = False) -> CosignKeyPair:
    """Write ``PREFIX.key`` (PKCS#8 PEM, 0600, encrypted when a passphrase is given) and ``PREFIX.pub``."""
    key = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    write_secret(private_path, private_pem, force=force, what="signing key")
    public_path.write_bytes(public_pem)
    return CosignKeyPair(private_path, public_path)


def load_signing_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    """Load an ECDSA P-256 private key (PKCS#8 or SEC1 PEM); the passphrase may come from the environment."""
    data = read_secret(path, "signing key")
    if b"SIGSTORE PRIVATE KEY" in data:
        raise KeyMaterialError(
            f"{path} is in cosign's own encrypted format, which sconify does not read; "
            f"export it as PKCS#8 PEM or {_HOW}."
        )
    if passphrase is None and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError:
        raise KeyMaterialError(
            f"signing key {path} is encrypted; give its passphrase with --sign-passphrase-file or ${PASSPHRASE_ENV}."
        ) from None
    except ValueError:
        raise KeyMaterialError(
            f"signing key {path} cannot be read: wrong passphrase or not a PEM private key; {_HOW}."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyMaterialError(f"signing key {path} is not an ECDSA P-256 key, which cosign expects; {_HOW}.")
    return key


def load_verify_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a PEM public key (PKIX) or take the public half of a private key file."""
    data = read_secret(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyMaterialError(f"{path} is not a PEM public key; give the .pub file written with the key.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyMaterialError(f"public key {path} is not an ECDSA P-256 key.")
    return key
