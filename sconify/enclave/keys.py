"""Enclave signing keys (RSA-3072, public exponent 3): the one place that creates, stores and loads them.

Private keys are PEM files written with mode 0600 from their first byte on: PKCS#1 when not
encrypted (what Intel's and SCONE's signing tools read), PKCS#8 with the best available encryption
when a passphrase is given. Loading accepts PKCS#1 and PKCS#8, encrypted or not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sconify.enclave._files import read_input
from sconify.enclave.sigstruct import mrsigner_of
from sconify.errors import KeyMaterialError
from sconify.secretfile import write_secret

ENCLAVE_KEY_BITS = 3072
ENCLAVE_KEY_EXPONENT = 3
PASSPHRASE_ENV = "SCONIFY_ENCLAVE_KEY_PASSPHRASE"
HOW_TO_MAKE = "make one with `sconify keys generate --enclave key.pem` (or `openssl genrsa -3 3072`)"


def generate_enclave_key() -> rsa.RSAPrivateKey:
    """A new RSA-3072 key with public exponent 3, as SGX requires for SIGSTRUCT."""
    return rsa.generate_private_key(public_exponent=ENCLAVE_KEY_EXPONENT, key_size=ENCLAVE_KEY_BITS)


def check_enclave_key(key: rsa.RSAPublicKey | rsa.RSAPrivateKey, name: str) -> None:
    """Raise KeyMaterialError unless ``key`` is RSA-3072 with exponent 3."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    numbers = public.public_numbers()
    if public.key_size != ENCLAVE_KEY_BITS or numbers.e != ENCLAVE_KEY_EXPONENT:
        raise KeyMaterialError(
            f"{name} is an RSA-{public.key_size} key with exponent {numbers.e}, but SGX enclave keys must be "
            f"RSA-3072 with exponent 3; {HOW_TO_MAKE}."
        )


def enclave_key_pem(key: rsa.RSAPrivateKey, passphrase: bytes | None = None) -> bytes:
    """PEM bytes of a private key: PKCS#1 in the clear, or encrypted PKCS#8 with a passphrase."""
    if passphrase:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def write_enclave_key(
    path: Path, key: rsa.RSAPrivateKey, passphrase: bytes | None = None, force: bool = False
) -> None:
    """Store a private key at ``path`` (mode 0600, atomically); an existing file is kept unless ``force``."""
    write_secret(Path(path), enclave_key_pem(key, passphrase), force=force, what="key")


def read_passphrase(passphrase_file: Path | None = None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The key passphrase from ``passphrase_file`` (first line) or SCONIFY_ENCLAVE_KEY_PASSPHRASE, if any."""
    if passphrase_file is not None:
        text = read_input(passphrase_file, "passphrase file", key=True)
        line = text.splitlines()[0] if text else b""
        if not line:
            raise KeyMaterialError(
                f"passphrase file {passphrase_file} is empty; write the passphrase on its first line."
            )
        return line
    env = os.environ if environ is None else environ
    value = env.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def _is_encrypted_pem(pem: bytes) -> bool:
    return b"ENCRYPTED" in pem.split(b"-----END", 1)[0]


def load_enclave_key(path: Path, passphrase: bytes | None = None) -> rsa.RSAPrivateKey:
    """Load and check an enclave signing key from a PEM file (PKCS#1 or PKCS#8, maybe encrypted)."""
    pem = read_input(path, "key file", key=True)
    name = f"key file {path}"
    if b"-----BEGIN" not in pem:
        raise KeyMaterialError(f"{name} is not a PEM private key; {HOW_TO_MAKE}.")
    encrypted = _is_encrypted_pem(pem)
    if encrypted and not passphrase:
        raise KeyMaterialError(
            f"{name} is encrypted; give its passphrase with --passphrase-file FILE or {PASSPHRASE_ENV}."
        )
    try:
        # OpenSSL's full check (primality of p and q) takes ~0.1 s for RSA-3072; a signature made and verified
        # once below catches an inconsistent key just as surely, in a few milliseconds.
        key = serialization.load_pem_private_key(
            pem, passphrase if encrypted else None, unsafe_skip_rsa_key_validation=True
        )
    except ValueError as exc:
        if encrypted:
            raise KeyMaterialError(f"{name} could not be decrypted: the passphrase is wrong.") from exc
        raise KeyMaterialError(f"{name} is not a readable PEM private key; {HOW_TO_MAKE}.") from exc
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(f"{name} could not be read as a private key ({exc}); {HOW_TO_MAKE}.") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyMaterialError(f"{name} is not an RSA key; SGX enclave keys are RSA-3072 with exponent 3; "
                               f"{HOW_TO_MAKE}.")
    check_enclave_key(key, name)
    probe = b"sconify: enclave key self-test"
    try:
        signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError) as exc:
        raise KeyMaterialError(f"{name} is inconsistent: a signature made with it does not verify; "
                               f"{HOW_TO_MAKE}.") from exc
    return key


def load_enclave_public_key(path: Path, passphrase: bytes | None = None) -> rsa.RSAPublicKey:
    """The public half of an enclave key from a PEM file: a public key (SPKI or PKCS#1) or a private key."""
    pem = read_input(path, "public key file", key=True)
    name = f"public key file {path}"
    if b"PRIVATE KEY-----" in pem:
        return load_enclave_key(path, passphrase).public_key()
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyMaterialError(
            f"{name} is not a PEM public key; export it with `openssl rsa -in key.pem -pubout`."
        ) from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyMaterialError(f"{name} is not an RSA key; SGX enclave keys are RSA-3072 with exponent 3.")
    check_enclave_key(key, name)
    return key


def mrsigner_of_key(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> bytes:
    """The MRSIGNER enclaves signed with this key get: SHA-256 of its little-endian modulus."""
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return mrsigner_of(public.public_numbers().n)
