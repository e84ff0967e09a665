"""No plaintext of an encrypted file appears anywhere in the protected output (promise 1).

The output of both writers is searched: the directory volume (every stored file and the metadata) and
the layer tar the streaming writer produces for the converter. Encrypted files hold text that is easy
to find (repeated lines, zeros, a file that equals its hard link's and its symlink's name), and the
search looks for every 16-byte window of each plaintext, at every offset.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from sconify.fspf import RegionTable, VolumeKey, VolumeWriter, protect_directory
from sconify.image.tarfs import Entry, LayerWriter, read_layer

CHUNK = 4096
WINDOW = 16
SECRETS = {
    "app/secret.py": b"API_TOKEN = 'tok-3f9a1c77'  # do not leak\n" * 300,
    "app/zeros.bin": bytes(5 * CHUNK),
    "app/small.txt": b"short secret!!!!",
    "app/nested/keys.pem": b"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    b"-----END PRIVATE KEY-----\n",
    "app/random.bin": os.urandom(3 * CHUNK + 11),
}
PUBLIC = {"lib/readme.txt": b"this one is only authenticated\n", "etc/hosts": b"127.0.0.1 localhost\n"}


def _windows(data: bytes) -> set[bytes]:
    return {data[i : i + WINDOW] for i in range(0, max(1, len(data) - WINDOW + 1))}


def _assert_no_window_of(secrets: dict[str, bytes], blob: bytes) -> None:
    for name, plaintext in secrets.items():
        leaked = [w for w in _windows(plaintext) if w in blob]
        assert not leaked, f"{name}: {len(leaked)} plaintext windows found, e.g. {leaked[0]!r}"


def _tree(root: Path) -> None:
    for name, data in {**SECRETS, **PUBLIC}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.link(root / "app/secret.py", root / "app/secret-link.py")


def test_no_window_of_an_encrypted_file_is_in_the_directory_volume(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _tree(src)
    key = VolumeKey.generate()
    regions = RegionTable.of(["encrypted:/app", "authenticated:/lib"])
    protect_directory(src, tmp_path / "out", regions, key, chunk_size=CHUNK, workers=2)
    stored = b"".join(p.read_bytes() for p in sorted((tmp_path / "out").rglob("*")) if p.is_file())
    _assert_no_window_of(SECRETS, stored)
    assert bytes.fromhex(key.hex()) not in stored and key.hex().encode() not in stored
    # the search does find what is meant to be readable
    assert PUBLIC["lib/readme.txt"] in stored and PUBLIC["etc/hosts"] in stored


def test_no_window_of_an_encrypted_file_is_in_the_layer_the_writer_streams(tmp_path: Path) -> None:
    key = VolumeKey.generate()
    writer = VolumeWriter(RegionTable.of(["encrypted:/app"]), key, chunk_size=CHUNK)
    layer = io.BytesIO()
    with LayerWriter(layer) as tar:
        for name, data in sorted({**SECRETS, **PUBLIC}.items()):
            entry = Entry.file(name, len(data))
            out = writer.protect(entry, io.BytesIO(data))
            tar.add(out.entry, out.content)
        for entry, content in writer.finish().entries():
            tar.add(entry, content)
    blob = layer.getvalue()
    # tar pads with zeros, so the zero-filled file is searched for in its own member only
    _assert_no_window_of({k: v for k, v in SECRETS.items() if v.strip(b"\0")}, blob)
    stored = {entry.path: content.read() for entry, content in read_layer(io.BytesIO(blob)) if content is not None}
    _assert_no_window_of({"app/zeros.bin": SECRETS["app/zeros.bin"]}, stored["app/zeros.bin"])
    assert len(stored["app/zeros.bin"]) == len(SECRETS["app/zeros.bin"])
    assert PUBLIC["etc/hosts"] in blob
