"""docs/fspf.md is precise enough for a second reader: this one is written from the document alone.

It uses only hashlib/hmac, struct and the bare AES-256-GCM primitive (no sconify.fspf code) to open a
volume made by ``protect_directory``, and checks every derivation the document states, including the
synthetic nonces, against the files and the plaintext.
"""

from __future__ import annotations

import hmac
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sconify.fspf import RegionTable, VolumeKey, protect_directory

CHUNK = 4096


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, section 2.3."""
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


class SpecReader:
    """A reader of FSPF version 1 following docs/fspf.md sections 3 to 5."""

    def __init__(self, metadata: bytes, key: bytes, expected_tag: bytes) -> None:
        self.prk = hmac.digest(b"sconify-fspf v1", key, "sha256")
        magic, version, suite, chunk, body_len, key_id, nonce, reserved = struct.unpack_from(
            "<8sHHIQ16s12s12s", metadata
        )
        assert (magic, version, suite, reserved) == (b"SCNYFSPF", 1, 1, bytes(12))
        assert len(metadata) == 64 + body_len + 16
        assert key_id == hkdf_expand(self.prk, b"key id", 16)
        assert metadata[-16:] == expected_tag
        meta_keys = hkdf_expand(self.prk, b"metadata", 64)
        body = AESGCM(meta_keys[:32]).decrypt(nonce, metadata[64:], metadata[:64])
        assert nonce == hmac.digest(meta_keys[32:], metadata[:40] + body, "sha256")[:12]
        self.chunk = chunk
        self._parse(body)

    def _parse(self, body: bytes) -> None:
        pos = 0

        def take(fmt: str) -> tuple:
            nonlocal pos
            values = struct.unpack_from(fmt, body, pos)
            pos += struct.calcsize(fmt)
            return values

        def string() -> bytes:
            nonlocal pos
            (length,) = take("<I")
            value = body[pos : pos + length]
            pos += length
            return value

        (region_count,) = take("<I")
        self.regions = []
        for _ in range(region_count):
            (mode,) = take("<B3x")
            self.regions.append((string(), mode))
        (record_count,) = take("<Q")
        self.records = {}
        for _ in range(record_count):
            kind, protection, zero, st_mode, uid, gid, mtime_ns = take("<BBHIIIq")
            path = string()
            (xattr_count,) = take("<I")
            xattrs = [(string(), string()) for _ in range(xattr_count)]
            record = {
                "kind": kind,
                "protection": protection,
                "st_mode": st_mode,
                "mtime_ns": mtime_ns,
                "uid": uid,
                "gid": gid,
                "xattrs": xattrs,
            }
            if kind == 1:
                (size,) = take("<Q")
                count = -(-size // self.chunk)
                record["size"] = size
                record["chunks"] = [
                    (body[pos + 28 * i : pos + 28 * i + 12], body[pos + 28 * i + 12 : pos + 28 * i + 28])
                    for i in range(count)
                ]
                pos += 28 * count
            elif kind in (3, 4):
                record["target"] = string()
            elif kind == 5:
                record["dev"] = take("<II")
            self.records[path] = record
        assert pos == len(body)

    def file_keys(self, path: bytes) -> tuple[bytes, bytes]:
        record = self.records[path]
        if record["kind"] == 4:
            path = record["target"]
            record = self.records[path]
        info = b"file" + struct.pack("<BI", record["protection"], len(path)) + path
        material = hkdf_expand(self.prk, info, 64)
        return material[:32], material[32:]

    def read(self, root: Path, path: bytes) -> bytes:
        record = self.records[path]
        content = self.records[record["target"]] if record["kind"] == 4 else record
        enc_key, nonce_key = self.file_keys(path)
        stored = (root / path[1:].decode("utf-8", "surrogateescape")).read_bytes()
        assert len(stored) == content["size"]
        plain = bytearray()
        for index, (nonce, tag) in enumerate(content["chunks"]):
            piece = stored[index * self.chunk : (index + 1) * self.chunk]
            if content["protection"] == 2:
                chunk = AESGCM(enc_key).decrypt(nonce, piece + tag, None)
            else:
                assert AESGCM(enc_key).decrypt(nonce, tag, piece) == b""
                chunk = piece
            assert nonce == hmac.digest(nonce_key, struct.pack("<Q", index) + chunk, "sha256")[:12]
            plain += chunk
        return bytes(plain)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "app" / "deep").mkdir(parents=True)
    (src / "lib").mkdir()
    (src / "etc").mkdir()
    (src / "app" / "main.py").write_bytes(b"print('secret')\n" * 1000)
    (src / "app" / "deep" / "exact").write_bytes(os.urandom(2 * CHUNK))
    (src / "app" / "empty").write_bytes(b"")
    with open(os.fsencode(src / "app") + b"/caf\xc3\xa9-\xff", "wb") as handle:  # not UTF-8
        handle.write(b"x" * (CHUNK + 1))
    os.link(src / "app" / "main.py", src / "app" / "deep" / "hard")
    os.symlink("../main.py", src / "app" / "deep" / "sym")
    (src / "lib" / "libz.so").write_bytes(os.urandom(3 * CHUNK + 17))
    (src / "etc" / "plain.conf").write_bytes(b"not protected")
    os.setxattr(src / "app" / "main.py", "user.origin", b"vendor")
    return src


def test_an_independent_reader_opens_a_volume_from_the_document_alone(tree: Path, tmp_path: Path) -> None:
    key = bytes(range(32))
    regions = RegionTable.of(["encrypted:/app", "authenticated:/lib"])
    result = protect_directory(tree, tmp_path / "out", regions, VolumeKey(key), chunk_size=CHUNK)
    out = tmp_path / "out"
    reader = SpecReader((out / ".sconify/fspf/volume.fspf").read_bytes(), key, result.tag)

    assert reader.regions == [(b"/", 0), (b"/app", 2), (b"/lib", 1)]
    assert sorted(reader.records) == list(reader.records)  # sorted by path bytes
    expected_paths = {
        b"/app",
        b"/app/deep",
        b"/app/deep/exact",
        b"/app/deep/hard",
        b"/app/deep/sym",
        b"/app/empty",
        b"/app/main.py",
        b"/app/caf\xc3\xa9-\xff",
        b"/lib",
        b"/lib/libz.so",
    }
    assert set(reader.records) == expected_paths
    for path in expected_paths:
        record = reader.records[path]
        source = tree / path[1:].decode("utf-8", "surrogateescape")
        st = os.lstat(source)
        assert record["st_mode"] == st.st_mode and record["mtime_ns"] == st.st_mtime_ns
        if record["kind"] in (1, 4):
            assert reader.read(out, path) == source.read_bytes()
    assert reader.records[b"/app/deep/sym"]["target"] == b"../main.py"
    assert reader.records[b"/app/deep/hard"]["target"] == b"/app/main.py"
    assert reader.records[b"/app/main.py"]["xattrs"] == [(b"user.origin", b"vendor")]
    assert reader.records[b"/app/empty"]["chunks"] == []
    # encrypted files are stored as ciphertext of the same length, authenticated ones as they are
    assert (out / "app/main.py").read_bytes() != (tree / "app/main.py").read_bytes()
    assert (out / "lib/libz.so").read_bytes() == (tree / "lib/libz.so").read_bytes()
    assert (out / "etc/plain.conf").read_bytes() == b"not protected"
