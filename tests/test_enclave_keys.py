"""Enclave signing keys: generation, 0600 atomic storage, PKCS#1/PKCS#8 loading, passphrases, wrong keys."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sconify.enclave.keys import (
    PASSPHRASE_ENV,
    generate_enclave_key,
    load_enclave_key,
    load_enclave_public_key,
    mrsigner_of_key,
    read_passphrase,
    write_enclave_key,
)
from sconify.errors import DestinationError, KeyMaterialError


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_enclave_key()


def _n(k: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> int:
    public = k.public_key() if isinstance(k, rsa.RSAPrivateKey) else k
    return public.public_numbers().n


def test_generated_key_is_rsa_3072_with_exponent_3(key: rsa.RSAPrivateKey) -> None:
    assert key.key_size == 3072
    assert key.public_key().public_numbers().e == 3


def test_key_is_written_0600_as_pkcs1_and_loads_back(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "enclave.pem"
    write_enclave_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert _n(load_enclave_key(path)) == _n(key)
    assert [p.name for p in tmp_path.iterdir()] == ["enclave.pem"]  # no temporary file left


def test_an_existing_key_is_kept_unless_forced(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "enclave.pem"
    path.write_text("precious")
    with pytest.raises(DestinationError) as err:
        write_enclave_key(path, key)
    assert "already exists" in err.value.message and "--force" in err.value.message
    assert path.read_text() == "precious"
    write_enclave_key(path, key, force=True)
    assert _n(load_enclave_key(path)) == _n(key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_directory_is_a_clear_error(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    with pytest.raises(DestinationError) as err:
        write_enclave_key(tmp_path / "nope" / "k.pem", key)
    assert "does not exist" in err.value.message


def test_encrypted_pkcs8_needs_the_right_passphrase(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "enclave.pem"
    write_enclave_key(path, key, passphrase=b"correct horse")
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert _n(load_enclave_key(path, b"correct horse")) == _n(key)
    with pytest.raises(KeyMaterialError) as missing:
        load_enclave_key(path)
    assert "is encrypted" in missing.value.message and PASSPHRASE_ENV in missing.value.message
    with pytest.raises(KeyMaterialError) as wrong:
        load_enclave_key(path, b"battery staple")
    assert "passphrase is wrong" in wrong.value.message


@pytest.mark.parametrize(
    ("fmt", "encryption"),
    [
        (serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        (serialization.PrivateFormat.TraditionalOpenSSL, serialization.BestAvailableEncryption(b"pw")),
        (serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")),
    ],
    ids=["pkcs8", "pkcs1-encrypted", "pkcs8-encrypted"],
)
def test_pem_variants_load(key: rsa.RSAPrivateKey, tmp_path: Path, fmt: serialization.PrivateFormat,
                           encryption: serialization.KeySerializationEncryption) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, encryption))
    assert _n(load_enclave_key(path, b"pw")) == _n(key)


def test_a_key_made_by_openssl_loads(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    path = tmp_path / "openssl.pem"
    subprocess.run([openssl, "genrsa", "-3", "-out", str(path), "3072"], check=True, capture_output=True)
    loaded = load_enclave_key(path)
    assert loaded.key_size == 3072 and loaded.public_key().public_numbers().e == 3


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: rsa.generate_private_key(3, 2048), "RSA-2048 key with exponent 3"),
        (lambda: rsa.generate_private_key(65537, 3072), "RSA-3072 key with exponent 65537"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "is not an RSA key"),
    ],
    ids=["small", "exponent", "ec"],
)
def test_wrong_keys_say_how_to_make_a_right_one(tmp_path: Path, make: object, expected: str) -> None:
    path = tmp_path / "wrong.pem"
    wrong = make()  # type: ignore[operator]
    path.write_bytes(wrong.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    with pytest.raises(KeyMaterialError) as err:
        load_enclave_key(path)
    assert expected in err.value.message
    assert "sconify keys generate --enclave key.pem" in err.value.message
    assert err.value.exit_code == 10


BROKEN_PEM = b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"


@pytest.mark.parametrize(("content", "expected"), [(b"not a key", "not a PEM private key"),
                                                   (BROKEN_PEM, "not a readable PEM private key")])
def test_garbage_key_files_are_refused(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(content)
    with pytest.raises(KeyMaterialError) as err:
        load_enclave_key(path)
    assert expected in err.value.message


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError) as err:
        load_enclave_key(tmp_path / "absent.pem")
    assert "does not exist" in err.value.message


def test_public_key_from_spki_pkcs1_or_private_key(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    public = key.public_key()
    spki = tmp_path / "spki.pem"
    spki.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    pkcs1 = tmp_path / "pkcs1.pem"
    pkcs1.write_bytes(public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    private = tmp_path / "private.pem"
    write_enclave_key(private, key)
    for path in (spki, pkcs1, private):
        assert _n(load_enclave_public_key(path)) == _n(key)
    assert mrsigner_of_key(key) == mrsigner_of_key(public)


def test_passphrase_from_file_or_environment(tmp_path: Path) -> None:
    f = tmp_path / "pass"
    f.write_bytes(b"from file\nsecond line ignored\n")
    assert read_passphrase(f, {PASSPHRASE_ENV: "from env"}) == b"from file"
    assert read_passphrase(None, {PASSPHRASE_ENV: "from env"}) == b"from env"
    assert read_passphrase(None, {}) is None
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(KeyMaterialError):
        read_passphrase(empty, {})


def _der_int(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_len(len(body)) + body


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def test_an_inconsistent_key_is_refused_when_it_loads(key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    """OpenSSL's slow full check is skipped; a key whose signatures do not verify is still refused at load.

    The PKCS#1 file is written by hand (cryptography will not build such a key): this key's primes and private
    exponents with another key's RSA-3072, exponent-3 modulus.
    """
    import base64

    n = key.private_numbers()
    other = generate_enclave_key().public_key().public_numbers()
    fields = (0, other.n, other.e, n.d, n.p, n.q, n.dmp1, n.dmq1, n.iqmp)
    body = b"".join(_der_int(v) for v in fields)
    der = b"\x30" + _der_len(len(body)) + body
    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    pem = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----\n"
    (tmp_path / "bad.pem").write_text(pem)
    with pytest.raises(KeyMaterialError, match="inconsistent.*does not verify"):
        load_enclave_key(tmp_path / "bad.pem")
