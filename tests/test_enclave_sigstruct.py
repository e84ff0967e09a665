"""SIGSTRUCT: its byte layout, signing, verification, two-step signing and rejection of malformed files."""

from __future__ import annotations

import datetime
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from sconify.enclave.keys import generate_enclave_key
from sconify.enclave.sigstruct import (
    Sigstruct,
    SigstructBody,
    attach_signature,
    sign,
    signing_date,
)
from sconify.errors import IntegrityError, UsageError, VerificationFailed

MRENCLAVE = hashlib.sha256(b"an enclave").digest()
DAY = datetime.date(2024, 1, 31)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_enclave_key()


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return generate_enclave_key()


def _body(**kw: object) -> SigstructBody:
    args: dict[str, object] = {"mrenclave": MRENCLAVE, "date": DAY, "isvprodid": 7, "isvsvn": 3}
    args.update(kw)
    return SigstructBody.for_enclave(**args)  # type: ignore[arg-type]


def test_signed_sigstruct_has_the_sdm_layout(key: rsa.RSAPrivateKey) -> None:
    raw = sign(_body(debug=True), key).to_bytes()
    assert len(raw) == 1808
    assert raw[0:16] == bytes.fromhex("06000000e10000000000010000000000")
    assert raw[16:20] == bytes(4)  # vendor
    assert raw[20:24] == bytes([0x31, 0x01, 0x24, 0x20])  # 2024-01-31 as BCD 0x20240131, little-endian
    assert raw[24:40] == bytes.fromhex("01010000600000006000000001000000")
    n = key.public_key().public_numbers().n
    assert raw[128:512] == n.to_bytes(384, "little")
    assert struct.unpack_from("<I", raw, 512)[0] == 3
    assert struct.unpack_from("<QQQQ", raw, 928) == (0x6, 0x3, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFF1B)
    assert raw[960:992] == MRENCLAVE
    assert struct.unpack_from("<HH", raw, 1024) == (7, 3)
    # The signature is PKCS#1 v1.5 / SHA-256 over bytes 0..128 and 900..1028, stored little-endian.
    s = int.from_bytes(raw[516:900], "little")
    key.public_key().verify(s.to_bytes(384, "big"), raw[0:128] + raw[900:1028], padding.PKCS1v15(), hashes.SHA256())
    assert int.from_bytes(raw[1040:1424], "little") == s * s // n
    assert int.from_bytes(raw[1424:1808], "little") == (s ** 3 - (s * s // n) * s * n) // n


def test_sign_verify_show_round_trip(key: rsa.RSAPrivateKey) -> None:
    sig = sign(_body(), key)
    parsed = Sigstruct.from_bytes(sig.to_bytes())
    assert parsed == sig
    parsed.verify()
    shown = parsed.to_dict()
    assert shown["mrenclave"] == MRENCLAVE.hex()
    assert shown["mrsigner"] == hashlib.sha256(sig.to_bytes()[128:512]).hexdigest()
    assert (shown["debug"], shown["isvprodid"], shown["isvsvn"], shown["date"]) == (False, 7, 3, "2024-01-31")
    assert shown["signature_valid"] is True


def test_signing_is_deterministic(key: rsa.RSAPrivateKey) -> None:
    assert sign(_body(), key).to_bytes() == sign(_body(), key).to_bytes()


def test_debug_sets_the_attribute_and_changes_the_signature(key: rsa.RSAPrivateKey) -> None:
    plain, debug = sign(_body(), key), sign(_body(debug=True), key)
    assert not plain.body.debug and debug.body.debug
    assert plain.signature != debug.signature


@pytest.mark.parametrize(
    ("offset", "what"),
    [(20, "the RSA signature does not verify"), (1024, "the RSA signature does not verify"),
     (960, "the RSA signature does not verify"), (1100, "Q1 does not match"), (1500, "Q2 does not match")],
)
def test_a_changed_byte_is_found(key: rsa.RSAPrivateKey, offset: int, what: str) -> None:
    raw = bytearray(sign(_body(), key).to_bytes())
    raw[offset] ^= 0x01
    sig = Sigstruct.from_bytes(bytes(raw))
    assert any(what in p for p in sig.problems())
    with pytest.raises(VerificationFailed):
        sig.verify("enclave.sig")


def test_two_step_signing_with_the_data_signed_elsewhere(key: rsa.RSAPrivateKey) -> None:
    body = _body()
    data = body.signing_data()
    assert len(data) == 256
    restored = SigstructBody.from_signing_data(data)
    assert restored == body
    # The "HSM": a plain PKCS#1 v1.5 SHA-256 signature over the exported bytes, big-endian.
    detached = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    sig = attach_signature(restored, key.public_key(), detached)
    assert sig.to_bytes() == sign(body, key).to_bytes()
    # Signers that take the digest produce the same signature.
    assert body.signing_digest() == hashlib.sha256(data).digest()
    from_digest = key.sign(body.signing_digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    assert attach_signature(restored, key.public_key(), from_digest) == sig


def test_two_step_refuses_a_signature_that_does_not_verify(key: rsa.RSAPrivateKey,
                                                            other_key: rsa.RSAPrivateKey) -> None:
    body = _body()
    by_other = other_key.sign(body.signing_data(), padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(VerificationFailed) as err:
        attach_signature(body, key.public_key(), by_other, "signature file s.bin")
    assert "signature file s.bin does not verify" in err.value.message
    other_data = key.sign(_body(isvsvn=4).signing_data(), padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(VerificationFailed):
        attach_signature(body, key.public_key(), other_data)
    with pytest.raises(IntegrityError) as short:
        attach_signature(body, key.public_key(), b"\x01" * 100)
    assert "100 bytes, not the 384 bytes" in short.value.message


def test_malformed_signing_data_is_refused() -> None:
    with pytest.raises(IntegrityError) as err:
        SigstructBody.from_signing_data(b"\0" * 255, "data.bin")
    assert "data.bin is 255 bytes" in err.value.message
    with pytest.raises(IntegrityError):
        SigstructBody.from_signing_data(b"\0" * 256, "data.bin")


def _mutated(raw: bytes, offset: int, new: bytes) -> bytes:
    return raw[:offset] + new + raw[offset + len(new):]


@pytest.fixture(scope="module")
def good(key: rsa.RSAPrivateKey) -> bytes:
    return sign(_body(), key).to_bytes()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda raw: raw[:1807], "is 1807 bytes, not the 1808 bytes"),
        (lambda raw: raw + b"\0", "is 1809 bytes"),
        (lambda raw: _mutated(raw, 0, b"\x07"), "header bytes are not the fixed SIGSTRUCT header"),
        (lambda raw: _mutated(raw, 30, b"\xff"), "header bytes are not the fixed SIGSTRUCT header"),
        (lambda raw: _mutated(raw, 16, struct.pack("<I", 0x1234)), "vendor 0x1234"),
        (lambda raw: _mutated(raw, 20, struct.pack("<I", 0x20241399)), "not a BCD date"),
        (lambda raw: _mutated(raw, 20, struct.pack("<I", 0x2024013A)), "not a BCD date"),
        (lambda raw: _mutated(raw, 512, struct.pack("<I", 65537)), "exponent is 65537, SGX requires 3"),
        (lambda raw: _mutated(raw, 128, bytes(384)), "modulus is not a 3072-bit number"),
    ],
)
def test_malformed_sigstruct_is_rejected(good: bytes, change: object, expected: str) -> None:
    with pytest.raises(IntegrityError) as err:
        Sigstruct.from_bytes(change(good), "enclave.sig")  # type: ignore[operator]
    assert err.value.message.startswith("enclave.sig is ")
    assert expected in err.value.message


def test_intel_vendor_is_accepted(good: bytes) -> None:
    assert Sigstruct.from_bytes(_mutated(good, 16, struct.pack("<I", 0x8086))).body.vendor == 0x8086


def test_signing_date_sources() -> None:
    assert signing_date("20240131", {}) == DAY
    assert signing_date(None, {"SOURCE_DATE_EPOCH": "1706659200"}) == DAY  # 2024-01-31T00:00:00Z
    assert signing_date("20240131", {"SOURCE_DATE_EPOCH": "0"}) == DAY
    assert signing_date(None, {}) == datetime.datetime.now(datetime.UTC).date()
    with pytest.raises(UsageError):
        signing_date("2024-01-31", {})
    with pytest.raises(UsageError):
        signing_date(None, {"SOURCE_DATE_EPOCH": "yesterday"})


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"isvprodid": 70000}, "ISV product id 70000"), ({"isvsvn": -1}, "ISV SVN -1"),
     ({"mrenclave": b"short"}, "32 bytes")],
)
def test_body_values_out_of_range_are_refused(kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(UsageError) as err:
        _body(**kwargs)
    assert expected in err.value.message
