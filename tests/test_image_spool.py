"""The conversion's blob spool: a blob read whole is kept and served again; one read in part is not kept; local
(seekable) blobs pass through; the directory is private and goes away. (The real-registry test is in
test_convert_layers.py: each blob is fetched once in a whole conversion.)"""

from __future__ import annotations

import hashlib
import io
import os
import stat

from sconify.image.model import Descriptor
from sconify.image.spool import BlobSpool
from sconify.image.streams import open_verified_blob


class _Stream(io.RawIOBase):
    """Bytes that cannot seek, like a network body."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def,override]
        return self._data.readinto(buffer)


class _Source:
    name = "test source"

    def __init__(self, blobs: dict[str, bytes], seekable: bool = False) -> None:
        self.blobs = blobs
        self.opened: list[str] = []
        self.seekable = seekable

    def open_blob(self, desc: Descriptor):  # type: ignore[no-untyped-def]
        self.opened.append(desc.digest)
        data = self.blobs[desc.digest]
        return io.BytesIO(data) if self.seekable else _Stream(data)


def _desc(data: bytes) -> Descriptor:
    return Descriptor("application/octet-stream", "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_a_blob_read_whole_is_kept_and_served_again_verified() -> None:
    data = os.urandom(3 << 20)
    desc = _desc(data)
    source = _Source({desc.digest: data})
    with BlobSpool() as spool:
        assert stat.S_IMODE(spool.dir.stat().st_mode) == 0o700
        wrapped = spool.wrap(source)
        for _ in range(3):
            with open_verified_blob(wrapped, desc) as blob:
                assert blob.read() == data
        assert source.opened == [desc.digest] and spool.downloads == 1 and spool.reuses == 2
        assert wrapped.holds(desc.digest)
        directory = spool.dir
    assert not directory.exists()


def test_a_blob_read_in_part_is_not_kept() -> None:
    data = os.urandom(1 << 20)
    desc = _desc(data)
    source = _Source({desc.digest: data})
    with BlobSpool() as spool:
        wrapped = spool.wrap(source)
        with wrapped.open_blob(desc) as blob:
            blob.read(1000)
        assert not wrapped.holds(desc.digest) and list(spool.dir.iterdir()) == []
        with wrapped.open_blob(desc) as blob:
            assert blob.read() == data
        assert source.opened == [desc.digest, desc.digest] and wrapped.holds(desc.digest)


def test_local_blobs_pass_through_and_other_attributes_are_the_sources() -> None:
    data = b"local bytes"
    desc = _desc(data)
    source = _Source({desc.digest: data}, seekable=True)
    with BlobSpool() as spool:
        wrapped = spool.wrap(source)
        for _ in range(2):
            with wrapped.open_blob(desc) as blob:
                assert blob.read() == data
        assert source.opened == [desc.digest] * 2 and not wrapped.holds(desc.digest)
        assert wrapped.blobs is source.blobs  # e.g. a registry's name, which mounts need
