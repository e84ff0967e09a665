"""SIGSTRUCT, the enclave signature an SGX CPU checks at EINIT: build, parse, sign, verify, two-step signing.

Layout (Intel SDM Vol. 3D, "Enclave Signature Structure"), 1808 bytes, integers little-endian:

    0 HEADER (16)  16 VENDOR (4)  20 DATE (4, BCD yyyymmdd)  24 HEADER2 (16)  40 SWDEFINED (4)
    44 reserved (84)  128 MODULUS (384)  512 EXPONENT (4)  516 SIGNATURE (384)
    900 MISCSELECT (4)  904 MISCMASK (4)  908 CET_ATTRIBUTES (1)  909 CET_ATTRIBUTES_MASK (1)
    910 reserved (2)  912 ISVFAMILYID (16)  928 ATTRIBUTES (16)  944 ATTRIBUTEMASK (16)
    960 ENCLAVEHASH (32)  992 reserved (16)  1008 ISVEXTPRODID (16)  1024 ISVPRODID (2)
    1026 ISVSVN (2)  1028 reserved (12)  1040 Q1 (384)  1424 Q2 (384)

The signature is RSA-3072 with exponent 3, PKCS#1 v1.5 with SHA-256 over bytes 0..128 followed by
bytes 900..1028 (the "signing data", 256 bytes). MODULUS, SIGNATURE, Q1 and Q2 are stored
little-endian; Q1 = floor(S^2 / M) and Q2 = floor((S^3 - Q1*S*M) / M) let the CPU check the
signature without a division. MRSIGNER is SHA-256 of the 384 modulus bytes as stored.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from sconify.errors import IntegrityError, UsageError, VerificationFailed

SIGSTRUCT_SIZE = 1808
MODULUS_SIZE = 384
SIGNING_DATA_SIZE = 256
REQUIRED_EXPONENT = 3

HEADER1 = bytes.fromhex("06000000e10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")
VENDOR_NONE = 0
VENDOR_INTEL = 0x8086

ATTR_INIT = 0x01
ATTR_DEBUG = 0x02
ATTR_MODE64BIT = 0x04
ATTR_PROVISIONKEY = 0x10
ATTR_EINITTOKENKEY = 0x20
ATTR_KSS = 0x80

XFRM_LEGACY = 0x03  # x87 and SSE state: always enabled
# Strict by default: every ATTRIBUTES.FLAGS bit must match at EINIT (a production signature cannot
# start a debug enclave); XFRM may add AVX and AVX-512 state (bits 2, 5-7) but nothing else.
DEFAULT_ATTRIBUTES_MASK = 0xFFFF_FFFF_FFFF_FFFF
DEFAULT_XFRM_MASK = 0xFFFF_FFFF_FFFF_FF1B
DEFAULT_MISCMASK = 0xFFFF_FFFF

_HEADER = struct.Struct("<16sII16sI84x")
_BODY = struct.Struct("<IIBB2x16sQQQQ32s16x16sHH")
_OFF_MODULUS = 128
_OFF_EXPONENT = 512
_OFF_SIGNATURE = 516
_OFF_BODY = 900
_OFF_Q1 = 1040
_OFF_Q2 = 1424

assert _HEADER.size == 128 and _BODY.size == 128


def _to_bcd(day: datetime.date) -> int:
    return int(f"{day.year:04d}{day.month:02d}{day.day:02d}", 16)


def _from_bcd(value: int) -> datetime.date | None:
    text = f"{value:08x}"
    if not text.isdigit():
        return None
    try:
        return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def signing_date(text: str | None = None, environ: Mapping[str, str] | None = None) -> datetime.date:
    """The SIGSTRUCT date: ``text`` as YYYYMMDD, else SOURCE_DATE_EPOCH's UTC day, else today (UTC)."""
    env = os.environ if environ is None else environ
    if text is not None:
        try:
            return datetime.datetime.strptime(text.strip(), "%Y%m%d").date()
        except ValueError as exc:
            raise UsageError(f"signing date '{text}' is not a date in the form YYYYMMDD, such as 20240131.") from exc
    epoch = env.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).date()
        except (ValueError, OverflowError, OSError) as exc:
            raise UsageError(
                f"SOURCE_DATE_EPOCH '{epoch}' is not a number of seconds since 1970; fix or unset it."
            ) from exc
    return datetime.datetime.now(datetime.UTC).date()


def _today() -> datetime.date:
    return signing_date()


@dataclass(frozen=True)
class SigstructBody:
    """The signed part of a SIGSTRUCT: who signed it when, and which enclave with which attributes.

    Serialised as the 256 "signing data" bytes: the 128-byte header and the 128-byte body.
    """

    enclavehash: bytes
    attributes: int = ATTR_MODE64BIT
    xfrm: int = XFRM_LEGACY
    attributes_mask: int = DEFAULT_ATTRIBUTES_MASK
    xfrm_mask: int = DEFAULT_XFRM_MASK
    miscselect: int = 0
    miscmask: int = DEFAULT_MISCMASK
    isvprodid: int = 0
    isvsvn: int = 0
    date: datetime.date = field(default_factory=_today)
    vendor: int = VENDOR_NONE
    swdefined: int = 0
    isvfamilyid: bytes = bytes(16)
    isvextprodid: bytes = bytes(16)
    cet_attributes: int = 0
    cet_attributes_mask: int = 0

    def __post_init__(self) -> None:
        if len(self.enclavehash) != 32:
            raise UsageError("an enclave hash (MRENCLAVE) is 32 bytes, 64 hex digits; check the value given.")
        for name, value, bits in (("ISV product id", self.isvprodid, 16), ("ISV SVN", self.isvsvn, 16)):
            if not 0 <= value < (1 << bits):
                raise UsageError(f"{name} {value} is outside 0..{(1 << bits) - 1}; give a value in that range.")
        if self.vendor not in (VENDOR_NONE, VENDOR_INTEL):
            raise UsageError(f"vendor {self.vendor:#x} is neither 0 nor 0x8086 (Intel).")

    @classmethod
    def for_enclave(
        cls,
        mrenclave: bytes,
        debug: bool = False,
        date: datetime.date | None = None,
        isvprodid: int = 0,
        isvsvn: int = 0,
    ) -> SigstructBody:
        """The body sconify signs for an enclave: 64-bit, debug only if asked, strict masks."""
        return cls(
            enclavehash=mrenclave,
            attributes=ATTR_MODE64BIT | (ATTR_DEBUG if debug else 0),
            isvprodid=isvprodid,
            isvsvn=isvsvn,
            date=date if date is not None else signing_date(),
        )

    @property
    def debug(self) -> bool:
        """Whether the signature is for a debug enclave."""
        return bool(self.attributes & ATTR_DEBUG)

    def header_bytes(self) -> bytes:
        """Bytes 0..128 of the SIGSTRUCT."""
        return _HEADER.pack(HEADER1, self.vendor, _to_bcd(self.date), HEADER2, self.swdefined)

    def body_bytes(self) -> bytes:
        """Bytes 900..1028 of the SIGSTRUCT."""
        return _BODY.pack(
            self.miscselect, self.miscmask, self.cet_attributes, self.cet_attributes_mask, self.isvfamilyid,
            self.attributes, self.xfrm, self.attributes_mask, self.xfrm_mask, self.enclavehash,
            self.isvextprodid, self.isvprodid, self.isvsvn,
        )

    def signing_data(self) -> bytes:
        """The 256 bytes the RSA signature covers (PKCS#1 v1.5 with SHA-256)."""
        return self.header_bytes() + self.body_bytes()

    def signing_digest(self) -> bytes:
        """SHA-256 of the signing data: what a signer that takes a digest signs."""
        return hashlib.sha256(self.signing_data()).digest()

    @classmethod
    def from_signing_data(cls, data: bytes, name: str = "the signing data") -> SigstructBody:
        """Read the 256 signing-data bytes (header then body) back; reject anything malformed."""
        if len(data) != SIGNING_DATA_SIZE:
            raise IntegrityError(
                f"{name} is {len(data)} bytes, not the {SIGNING_DATA_SIZE} bytes of SIGSTRUCT signing data; "
                "export it again with `sconify enclave export-signing-data`."
            )
        return _parse_body(data[:128], data[128:], name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view of the signed fields."""
        return {
            "mrenclave": self.enclavehash.hex(),
            "attributes": f"{self.attributes:#018x}",
            "xfrm": f"{self.xfrm:#018x}",
            "attributes_mask": f"{self.attributes_mask:#018x}",
            "xfrm_mask": f"{self.xfrm_mask:#018x}",
            "debug": self.debug,
            "mode64bit": bool(self.attributes & ATTR_MODE64BIT),
            "miscselect": f"{self.miscselect:#010x}",
            "miscmask": f"{self.miscmask:#010x}",
            "isvprodid": self.isvprodid,
            "isvsvn": self.isvsvn,
            "date": self.date.isoformat(),
            "vendor": f"{self.vendor:#06x}",
        }


def _parse_body(header: bytes, body: bytes, name: str) -> SigstructBody:
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{name} is not a valid SIGSTRUCT: {why}; sign the enclave again.")

    h1, vendor, date_bcd, h2, swdefined = _HEADER.unpack(header)
    if h1 != HEADER1 or h2 != HEADER2:
        raise bad("its header bytes are not the fixed SIGSTRUCT header")
    if vendor not in (VENDOR_NONE, VENDOR_INTEL):
        raise bad(f"its vendor {vendor:#x} is neither 0 nor 0x8086")
    day = _from_bcd(date_bcd)
    if day is None:
        raise bad(f"its date {date_bcd:#010x} is not a BCD date yyyymmdd")
    (miscselect, miscmask, cet, cet_mask, familyid, attributes, xfrm, attributes_mask, xfrm_mask,
     enclavehash, extprodid, isvprodid, isvsvn) = _BODY.unpack(body)
    return SigstructBody(
        enclavehash=enclavehash, attributes=attributes, xfrm=xfrm, attributes_mask=attributes_mask,
        xfrm_mask=xfrm_mask, miscselect=miscselect, miscmask=miscmask, isvprodid=isvprodid, isvsvn=isvsvn,
        date=day, vendor=vendor, swdefined=swdefined, isvfamilyid=familyid, isvextprodid=extprodid,
        cet_attributes=cet, cet_attributes_mask=cet_mask,
    )


def compute_q1_q2(signature: int, modulus: int) -> tuple[int, int]:
    """Q1 = floor(S^2 / M), Q2 = floor((S^3 - Q1*S*M) / M): the CPU's helpers for checking S^3 mod M."""
    q1 = signature * signature // modulus
    q2 = (signature ** 3 - q1 * signature * modulus) // modulus
    return q1, q2


def _le(value: int, size: int = MODULUS_SIZE) -> bytes:
    return value.to_bytes(size, "little")


def mrsigner_of(modulus: int) -> bytes:
    """MRSIGNER: SHA-256 of the 384-byte little-endian modulus, as the CPU computes it at EINIT."""
    return hashlib.sha256(_le(modulus)).digest()


def _rsa_verifies(modulus: int, exponent: int, signature: int, data: bytes) -> bool:
    try:
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        key.verify(signature.to_bytes(MODULUS_SIZE, "big"), data, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, OverflowError):
        return False
    return True


@dataclass(frozen=True)
class Sigstruct:
    """A complete SIGSTRUCT: the signed body plus the signer's modulus, the signature and Q1, Q2."""

    body: SigstructBody
    modulus: int
    exponent: int
    signature: int
    q1: int
    q2: int

    @property
    def mrenclave(self) -> bytes:
        """The ENCLAVEHASH this signature is for."""
        return self.body.enclavehash

    @property
    def mrsigner(self) -> bytes:
        """SHA-256 of the modulus as stored: the signer's identity in attestation."""
        return mrsigner_of(self.modulus)

    def to_bytes(self) -> bytes:
        """The 1808 bytes of the SIGSTRUCT."""
        out = (
            self.body.header_bytes()
            + _le(self.modulus)
            + struct.pack("<I", self.exponent)
            + _le(self.signature)
            + self.body.body_bytes()
            + bytes(12)
            + _le(self.q1)
            + _le(self.q2)
        )
        assert len(out) == SIGSTRUCT_SIZE
        return out

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "the SIGSTRUCT") -> Sigstruct:
        """Parse a SIGSTRUCT file; reject a wrong size, header, vendor, date or exponent clearly."""
        if len(data) != SIGSTRUCT_SIZE:
            raise IntegrityError(
                f"{name} is {len(data)} bytes, not the {SIGSTRUCT_SIZE} bytes of a SIGSTRUCT; "
                "give the .sig file `sconify enclave sign` wrote."
            )
        body = _parse_body(data[:128], data[_OFF_BODY:_OFF_BODY + 128], name)
        (exponent,) = struct.unpack_from("<I", data, _OFF_EXPONENT)
        if exponent != REQUIRED_EXPONENT:
            raise IntegrityError(
                f"{name} is not a valid SIGSTRUCT: its exponent is {exponent}, SGX requires 3; sign the enclave again."
            )
        modulus = int.from_bytes(data[_OFF_MODULUS:_OFF_EXPONENT], "little")
        if modulus.bit_length() != MODULUS_SIZE * 8:
            raise IntegrityError(
                f"{name} is not a valid SIGSTRUCT: its modulus is not a 3072-bit number; sign the enclave again."
            )
        return cls(
            body=body,
            modulus=modulus,
            exponent=exponent,
            signature=int.from_bytes(data[_OFF_SIGNATURE:_OFF_BODY], "little"),
            q1=int.from_bytes(data[_OFF_Q1:_OFF_Q2], "little"),
            q2=int.from_bytes(data[_OFF_Q2:], "little"),
        )

    def problems(self) -> list[str]:
        """What is wrong with the signature (empty when it holds): RSA check, Q1, Q2."""
        found = []
        if not _rsa_verifies(self.modulus, self.exponent, self.signature, self.body.signing_data()):
            found.append("the RSA signature does not verify over the signed fields")
        q1, q2 = compute_q1_q2(self.signature, self.modulus)
        if q1 != self.q1:
            found.append("Q1 does not match the signature")
        if q2 != self.q2:
            found.append("Q2 does not match the signature")
        return found

    def verify(self, name: str = "the SIGSTRUCT") -> None:
        """Raise VerificationFailed unless the signature, Q1 and Q2 all hold."""
        found = self.problems()
        if found:
            raise VerificationFailed(f"{name} does not hold: {'; '.join(found)}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view: ``mrenclave`` and ``mrsigner`` as hex, the signed fields, whether it verifies."""
        out = self.body.to_dict()
        out["mrsigner"] = self.mrsigner.hex()
        out["signature_valid"] = not self.problems()
        return out


def _public_numbers(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> rsa.RSAPublicNumbers:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_numbers()


def sign(body: SigstructBody, key: rsa.RSAPrivateKey) -> Sigstruct:
    """Sign ``body`` with an RSA-3072, exponent-3 key: the complete SIGSTRUCT, Q1 and Q2 included."""
    numbers = _public_numbers(key)
    signature = int.from_bytes(key.sign(body.signing_data(), padding.PKCS1v15(), hashes.SHA256()), "big")
    q1, q2 = compute_q1_q2(signature, numbers.n)
    return Sigstruct(body, numbers.n, numbers.e, signature, q1, q2)


def attach_signature(
    body: SigstructBody, public_key: rsa.RSAPublicKey, signature: bytes, name: str = "the signature"
) -> Sigstruct:
    """The second step of two-step signing: a SIGSTRUCT from a signature made elsewhere (an HSM).

    ``signature`` is the 384-byte PKCS#1 v1.5 SHA-256 signature over ``body.signing_data()``, big-endian
    as signers write it. A signature that does not verify with ``public_key`` is refused.
    """
    numbers = _public_numbers(public_key)
    if len(signature) != MODULUS_SIZE:
        raise IntegrityError(
            f"{name} is {len(signature)} bytes, not the {MODULUS_SIZE} bytes of an RSA-3072 signature; "
            "sign the exported signing data with the enclave key (PKCS#1 v1.5, SHA-256)."
        )
    value = int.from_bytes(signature, "big")
    if not _rsa_verifies(numbers.n, numbers.e, value, body.signing_data()):
        raise VerificationFailed(
            f"{name} does not verify over the signing data with the given public key; "
            "sign exactly the exported 256 bytes (PKCS#1 v1.5, SHA-256) with the matching private key."
        )
    q1, q2 = compute_q1_q2(value, numbers.n)
    return Sigstruct(body, numbers.n, numbers.e, value, q1, q2)
