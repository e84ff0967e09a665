"""The public SGX test vectors (Fortanix rust-sgx): SGXS parsing, MRENCLAVE, SIGSTRUCT, Q1/Q2, MRSIGNER."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sconify.enclave.sgxs import (
    FLAGS_TCS,
    PageRange,
    eadd_record,
    ecreate_record,
    eextend_record,
    iter_sgxs,
    mrenclave,
    parse_sgxs,
)
from sconify.enclave.sigstruct import Sigstruct, compute_q1_q2, mrsigner_of

# Facts stated in shared/vectors/sgx/README.md, not computed by sconify.
VECTOR_MRENCLAVE = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
VECTOR_ENCLAVE_SIZE = 0x40000
VECTOR_SSA_FRAME_SIZE = 1
VECTOR_SGXS_LENGTH = 46720


def _vector_dir() -> Path | None:
    candidates = [Path(__file__).resolve().parents[2] / "shared/vectors/sgx"]
    if os.environ.get("SCONIFY_SGX_VECTORS"):
        candidates.append(Path(os.environ["SCONIFY_SGX_VECTORS"]))
    for candidate in candidates:
        if (candidate / "test_enclave.sgxs").is_file() and (candidate / "test_enclave.sig").is_file():
            return candidate
    return None


VECTORS = _vector_dir()
pytestmark = pytest.mark.skipif(VECTORS is None, reason="SGX test vectors (shared/vectors/sgx) not present")


@pytest.fixture(scope="module")
def sgxs_bytes() -> bytes:
    assert VECTORS is not None
    return (VECTORS / "test_enclave.sgxs").read_bytes()


@pytest.fixture(scope="module")
def sig_bytes() -> bytes:
    assert VECTORS is not None
    return (VECTORS / "test_enclave.sig").read_bytes()


def _walk(stream: bytes) -> list[tuple[bytes, int, int, bytes]]:
    """An independent, minimal reading of the vector: (tag, field1, field2, data) per record."""
    out = []
    pos = 0
    while pos < len(stream):
        tag = stream[pos:pos + 8]
        if tag == b"ECREATE\0":
            ssa, size = struct.unpack_from("<IQ", stream, pos + 8)
            out.append((tag, ssa, size, b""))
            pos += 64
        elif tag == b"EADD\0\0\0\0":
            offset, flags = struct.unpack_from("<QQ", stream, pos + 8)
            out.append((tag, offset, flags, b""))
            pos += 64
        else:
            assert tag == b"EEXTEND\0"
            (offset,) = struct.unpack_from("<Q", stream, pos + 8)
            out.append((tag, offset, 0, stream[pos + 64:pos + 320]))
            pos += 320
    return out


def test_vector_sgxs_parses_with_the_readme_facts(sgxs_bytes: bytes) -> None:
    summary = parse_sgxs(sgxs_bytes, "test_enclave.sgxs")
    assert summary.mrenclave.hex() == VECTOR_MRENCLAVE
    assert summary.ssa_frame_size == VECTOR_SSA_FRAME_SIZE
    assert summary.size == VECTOR_ENCLAVE_SIZE
    assert summary.length == VECTOR_SGXS_LENGTH
    records = _walk(sgxs_bytes)
    assert summary.pages == sum(1 for r in records if r[0].startswith(b"EADD"))
    assert summary.measured_chunks == sum(1 for r in records if r[0].startswith(b"EEXTEND"))
    # The vector has one thread control structure; the parse must find it with its flags.
    tcs_pages = [r for r in summary.ranges if r.flags == FLAGS_TCS]
    assert sum(r.pages for r in tcs_pages) == sum(1 for r in records if r[0].startswith(b"EADD") and r[2] == FLAGS_TCS)


def test_vector_sgxs_parses_the_same_from_a_file_object(sgxs_bytes: bytes) -> None:
    assert VECTORS is not None
    with open(VECTORS / "test_enclave.sgxs", "rb") as f:
        summary = parse_sgxs(f, "test_enclave.sgxs")
    assert summary == parse_sgxs(sgxs_bytes)


def test_record_writers_rebuild_the_vector_byte_for_byte(sgxs_bytes: bytes) -> None:
    rebuilt = []
    for tag, a, b, data in _walk(sgxs_bytes):
        if tag == b"ECREATE\0":
            rebuilt.append(ecreate_record(a, b))
        elif tag.startswith(b"EADD"):
            rebuilt.append(eadd_record(a, b))
        else:
            rebuilt.append(eextend_record(a) + data)
    assert b"".join(rebuilt) == sgxs_bytes


def test_stream_writer_recomputes_the_vector_mrenclave(sgxs_bytes: bytes) -> None:
    # Every page of the vector is fully measured: rebuild it as page ranges with their contents.
    records = _walk(sgxs_bytes)
    ranges = []
    pages: dict[int, tuple[int, dict[int, bytes]]] = {}
    for tag, a, b, data in records[1:]:
        if tag.startswith(b"EADD"):
            pages[a] = (b, {})
        else:
            pages[a & ~0xFFF][1][a & 0xFFF] = data
    for offset in sorted(pages):
        flags, chunks = pages[offset]
        assert sorted(chunks) == list(range(0, 4096, 256))
        ranges.append(PageRange(offset, 1, flags, True, b"".join(chunks[k] for k in sorted(chunks))))
    digest = mrenclave(iter_sgxs(records[0][1], records[0][2], ranges))
    assert digest.hex() == VECTOR_MRENCLAVE


def test_vector_sigstruct_parses_and_its_enclavehash_is_the_sgxs_hash(sig_bytes: bytes, sgxs_bytes: bytes) -> None:
    sig = Sigstruct.from_bytes(sig_bytes, "test_enclave.sig")
    assert sig.mrenclave.hex() == VECTOR_MRENCLAVE
    assert sig.mrenclave == hashlib.sha256(sgxs_bytes).digest()
    assert sig.exponent == 3
    assert sig.to_bytes() == sig_bytes


def test_vector_signature_verifies(sig_bytes: bytes) -> None:
    sig = Sigstruct.from_bytes(sig_bytes)
    assert sig.problems() == []
    sig.verify()
    # The same check done directly with the stored fields, as the README states it.
    n = int.from_bytes(sig_bytes[128:512], "little")
    e = int.from_bytes(sig_bytes[512:516], "little")
    s = int.from_bytes(sig_bytes[516:900], "little")
    rsa.RSAPublicNumbers(e, n).public_key().verify(
        s.to_bytes(384, "big"), sig_bytes[0:128] + sig_bytes[900:1028], padding.PKCS1v15(), hashes.SHA256()
    )


def test_vector_q1_q2_are_recomputed(sig_bytes: bytes) -> None:
    n = int.from_bytes(sig_bytes[128:512], "little")
    s = int.from_bytes(sig_bytes[516:900], "little")
    stored_q1 = int.from_bytes(sig_bytes[1040:1424], "little")
    stored_q2 = int.from_bytes(sig_bytes[1424:1808], "little")
    assert compute_q1_q2(s, n) == (stored_q1, stored_q2)
    # Their definition, checked without division: Q1 = floor(S^2/M), Q2 = floor((S^3 - Q1*S*M)/M),
    # and what remains is S^3 mod M, the signature's message representative.
    assert 0 <= s * s - stored_q1 * n < n
    rest = s ** 3 - stored_q1 * s * n - stored_q2 * n
    assert 0 <= rest < n
    assert rest == pow(s, 3, n)


def test_vector_mrsigner_is_sha256_of_the_stored_modulus(sig_bytes: bytes) -> None:
    sig = Sigstruct.from_bytes(sig_bytes)
    assert sig.mrsigner == hashlib.sha256(sig_bytes[128:512]).digest()
    assert mrsigner_of(int.from_bytes(sig_bytes[128:512], "little")) == sig.mrsigner


def test_vector_signature_breaks_when_a_signed_byte_changes(sig_bytes: bytes) -> None:
    tampered = bytearray(sig_bytes)
    tampered[1024] ^= 0x01  # ISVPRODID, inside the signed body
    problems = Sigstruct.from_bytes(bytes(tampered)).problems()
    assert problems == ["the RSA signature does not verify over the signed fields"]
