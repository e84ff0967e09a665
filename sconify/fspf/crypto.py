"""The FSPF's keys and nonces: key derivation, chunk sealing and opening, metadata sealing, key files.

This is the only module that sees key material. Suite 1 (docs/fspf.md, "Cryptography"):

- ``PRK = HKDF-Extract(salt="sconify-fspf v1", IKM=volume key)``; every key is ``HKDF-Expand(PRK, info)``
  with a distinct ``info``, so keys for different purposes, files and modes are independent.
- A chunk's nonce is synthetic: the first 12 bytes of ``HMAC-SHA256(siv key, u64 index || plaintext)``.
  Reusing a volume key on purpose (for reproducible output) therefore never reuses a nonce for different
  data; equal inputs give equal outputs, which is what reproducibility asks for.
- Content taken from a verified source (a layer's tar stream, named by its DiffID) may instead be named by
  its position: ``HMAC-SHA256(siv key, "layer\0" || DiffID || u64 offset || u64 index)``; the position
  determines the plaintext, so this too never pairs one nonce with two plaintexts, and costs no pass over
  the content (docs/fspf.md, section 3.4).
- Chunks and metadata are sealed with AES-256-GCM under these nonces.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from sconify.errors import KeyMaterialError, NotFoundError
from sconify.fspf.format import (
    CHUNK_ENTRY_SIZE,
    KEY_ID_SIZE,
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    Header,
    RegionMode,
)

HKDF_SALT = b"sconify-fspf v1"
INFO_KEY_ID = b"key id"
INFO_METADATA = b"metadata"
INFO_FILE = b"file"
# Position nonces (section 3.4): the input begins with this label. Synthetic inputs begin with a u64 chunk
# index, which would have to exceed 2^56 to spell it, so the two kinds of input never meet.
POSITION_LABEL = b"layer\0"

# cryptography >= 45 writes into caller buffers; older versions allocate, which is slower but equal.
_HAS_INTO = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


class ChunkRejected(Exception):
    """Chunk ``index`` did not authenticate (internal; readers turn it into a Problem or IntegrityError)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


@dataclass(frozen=True)
class SourcePosition:
    """Where a file's content starts in a verified source stream: a layer's DiffID and a byte offset."""

    diff_id: str  # "sha256:<hex>"
    offset: int

    def nonce_prefix(self) -> bytes:
        algorithm, _, hexdigest = self.diff_id.partition(":")
        if algorithm != "sha256" or len(hexdigest) != 64:
            raise ValueError(f"a source position needs a sha256 DiffID, not {self.diff_id!r}")
        return POSITION_LABEL + bytes.fromhex(hexdigest) + struct.pack("<Q", self.offset)


class VolumeKey:
    """The 32-byte volume key. Its bytes leave this object only through :meth:`hex` and key files."""

    __slots__ = ("_material", "_prk", "_key_id")

    def __init__(self, material: bytes) -> None:
        if not isinstance(material, (bytes, bytearray)) or len(material) != KEY_SIZE:
            raise KeyMaterialError(
                f"An FSPF key must be {KEY_SIZE} bytes ({2 * KEY_SIZE} hex digits); give the key printed by "
                "`sconify fs protect`."
            )
        self._material = bytes(material)
        self._prk = hmac.digest(HKDF_SALT, self._material, "sha256")
        self._key_id = self._expand(INFO_KEY_ID, KEY_ID_SIZE)

    @classmethod
    def generate(cls) -> VolumeKey:
        """A fresh random key; the only place the FSPF draws randomness."""
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def from_hex(cls, text: str) -> VolumeKey:
        try:
            material = bytes.fromhex(text.strip())
        except ValueError:
            raise KeyMaterialError(
                f"The FSPF key is not hexadecimal; give {2 * KEY_SIZE} hex digits as printed by `sconify fs protect`."
            ) from None
        return cls(material)

    def hex(self) -> str:
        return self._material.hex()

    @property
    def key_id(self) -> bytes:
        """A public 16-byte fingerprint of the key, stored in the metadata header to name wrong keys."""
        return self._key_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VolumeKey) and hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(self._key_id)

    def __repr__(self) -> str:
        return f"VolumeKey(id={self._key_id.hex()})"

    def _expand(self, info: bytes, length: int) -> bytes:
        return HKDFExpand(hashes.SHA256(), length, info).derive(self._prk)

    def chunk_cipher(
        self, path: bytes, mode: RegionMode, chunk_size: int, position: SourcePosition | None = None
    ) -> ChunkCipher:
        """The cipher for the chunks of the file whose content is stored at volume path ``path``.

        Without ``position`` the nonces are synthetic (a MAC of each chunk's plaintext). With it they name
        the chunk's place in a verified source stream; the caller must then seal exactly the bytes found
        there, and must not let any output made from them leave the machine or be committed unless that
        stream verified.
        """
        if not mode.protected:
            raise ValueError("not-protected files have no cipher")
        info = INFO_FILE + struct.pack("<BI", mode, len(path)) + path
        material = self._expand(info, 2 * KEY_SIZE)
        return ChunkCipher(
            material[:KEY_SIZE], material[KEY_SIZE:], mode is RegionMode.ENCRYPTED, chunk_size,
            position.nonce_prefix() if position is not None else None,
        )

    def seal_metadata(self, header: Header, body: bytes) -> tuple[bytes, bytes]:
        """Seal the metadata body under ``header``; returns (the whole metadata file, the volume tag)."""
        enc_key, siv_key = _split(self._expand(INFO_METADATA, 2 * KEY_SIZE))
        nonce = hmac.digest(siv_key, header.prefix() + body, "sha256")[:NONCE_SIZE]
        header_bytes = replace(header, nonce=nonce).encode()
        sealed = AESGCM(enc_key).encrypt(nonce, body, header_bytes)
        return header_bytes + sealed, sealed[-TAG_SIZE:]

    def open_metadata(self, header_bytes: bytes, nonce: bytes, sealed: bytes) -> bytes:
        """Decrypt and authenticate the body (``sealed`` = ciphertext || tag); raises InvalidTag."""
        enc_key, _ = _split(self._expand(INFO_METADATA, 2 * KEY_SIZE))
        return AESGCM(enc_key).decrypt(nonce, sealed, header_bytes)


def _split(material: bytes) -> tuple[bytes, bytes]:
    return material[:KEY_SIZE], material[KEY_SIZE:]


class ChunkCipher:
    """Seals and opens the chunks of one file; the buffers are the caller's, to avoid copies."""

    __slots__ = ("_aead", "_siv", "_positional", "encrypted", "chunk_size")

    def __init__(
        self, enc_key: bytes, siv_key: bytes, encrypted: bool, chunk_size: int, position: bytes | None = None
    ) -> None:
        self._aead = AESGCM(enc_key)
        self._siv = hmac.new(siv_key, position or b"", digestmod=hashlib.sha256)
        self._positional = position is not None
        self.encrypted = encrypted
        self.chunk_size = chunk_size

    def seal(self, first_index: int, data: memoryview, out: memoryview | None, entries: memoryview) -> None:
        """Seal the chunks in ``data`` (whole chunks, the last may be short) starting at chunk ``first_index``.

        Encrypted: ciphertext goes to ``out``, which must be ``len(data) + 16`` bytes (each chunk's tag lands
        in the 16 bytes after it, which the next chunk then overwrites). Authenticated: ``out`` is unused
        and the stored bytes are ``data`` itself. ``entries`` receives 28 bytes (nonce, tag) per chunk.
        """
        size = self.chunk_size
        total = len(data)
        aead = self._aead
        base = self._siv
        synthetic = not self._positional
        encrypted = self.encrypted
        e = 0
        for index, offset in enumerate(range(0, total, size), first_index):
            end = min(offset + size, total)
            chunk = data[offset:end]
            mac = base.copy()
            mac.update(index.to_bytes(8, "little"))
            if synthetic:
                mac.update(chunk)
            nonce = mac.digest()[:NONCE_SIZE]
            entries[e : e + NONCE_SIZE] = nonce
            if encrypted:
                assert out is not None
                if _HAS_INTO:
                    aead.encrypt_into(nonce, chunk, None, out[offset : end + TAG_SIZE])
                else:
                    out[offset : end + TAG_SIZE] = aead.encrypt(nonce, bytes(chunk), None)
                entries[e + NONCE_SIZE : e + CHUNK_ENTRY_SIZE] = out[end : end + TAG_SIZE]
            else:
                entries[e + NONCE_SIZE : e + CHUNK_ENTRY_SIZE] = aead.encrypt(nonce, b"", chunk)
            e += CHUNK_ENTRY_SIZE

    def open(self, first_index: int, data: memoryview, length: int, entries: bytes, out: memoryview | None) -> None:
        """Authenticate (and for encrypted files decrypt into ``out``) the chunks in ``data[:length]``.

        ``entries`` are the chunks' 28-byte metadata entries. Raises ChunkRejected with the lowest index
        that fails. Encrypted chunks are opened last to first: each tag is written into the 16 bytes after
        its chunk (``data`` must have 16 spare bytes after ``length``), which belong to a chunk already
        opened, so ``data`` is consumed and must not be used afterwards.
        """
        size = self.chunk_size
        aead = self._aead
        starts = range(0, length, size)
        rejected = None
        if self.encrypted:
            assert out is not None
            for pos in reversed(range(len(starts))):
                offset = starts[pos]
                end = min(offset + size, length)
                e = pos * CHUNK_ENTRY_SIZE
                data[end : end + TAG_SIZE] = entries[e + NONCE_SIZE : e + CHUNK_ENTRY_SIZE]
                try:
                    if _HAS_INTO:
                        aead.decrypt_into(
                            entries[e : e + NONCE_SIZE], data[offset : end + TAG_SIZE], None, out[offset:end]
                        )
                    else:
                        sealed = bytes(data[offset : end + TAG_SIZE])
                        out[offset:end] = aead.decrypt(entries[e : e + NONCE_SIZE], sealed, None)
                except InvalidTag:
                    rejected = pos
        else:
            for pos, offset in enumerate(starts):
                e = pos * CHUNK_ENTRY_SIZE
                try:
                    aead.decrypt(
                        entries[e : e + NONCE_SIZE],
                        entries[e + NONCE_SIZE : e + CHUNK_ENTRY_SIZE],
                        data[offset : offset + size if offset + size < length else length],
                    )
                except InvalidTag:
                    rejected = pos
                    break
        if rejected is not None:
            raise ChunkRejected(first_index + rejected)


# -- key files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFile:
    """What a key file holds: the volume key and, usually, the volume tag."""

    key: VolumeKey
    tag: bytes | None


def parse_tag(text: str) -> bytes:
    try:
        tag = bytes.fromhex(text.strip())
    except ValueError:
        tag = b""
    if len(tag) != TAG_SIZE:
        raise KeyMaterialError(
            f"The FSPF tag must be {2 * TAG_SIZE} hex digits; give the tag printed by `sconify fs protect`."
        )
    return tag


def read_key_file(path: str | os.PathLike[str]) -> KeyFile:
    """Read a key file: the JSON object ``{"key": HEX, "tag": HEX}`` written by ``fs protect``, or bare hex."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"The key file {path} does not exist; give the file written by --keys-out.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyMaterialError(f"The key file {path} cannot be read ({exc}); check its path and permissions.") from None
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            key = VolumeKey.from_hex(str(obj["key"]))
        except (ValueError, KeyError, TypeError):
            raise KeyMaterialError(
                f"The key file {path} is not a JSON object with a hex 'key'; give the file written by --keys-out."
            ) from None
        tag = parse_tag(str(obj["tag"])) if obj.get("tag") else None
        return KeyFile(key, tag)
    return KeyFile(VolumeKey.from_hex(text), None)


def write_key_file(path: str | os.PathLike[str], key: VolumeKey, tag: bytes) -> None:
    """Write ``{"key", "tag"}`` as JSON with mode 0600, atomically (through ``sconify.secretfile``)."""
    from sconify.secretfile import write_secret

    payload = json.dumps({"key": key.hex(), "tag": tag.hex()}, indent=2, sort_keys=True) + "\n"
    write_secret(Path(path), payload.encode(), force=True, what="FSPF key")
