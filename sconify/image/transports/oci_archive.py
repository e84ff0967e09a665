"""The ``oci-archive:FILE[:TAG]`` transport: an OCI layout packed in a tar file."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from sconify.errors import DestinationError, IntegrityError, NotFoundError
from sconify.image.model import Descriptor, Image, Platform
from sconify.image.streams import CHUNK
from sconify.image.transports.base import read_limited
from sconify.image.transports.oci import OciLayoutDestination, open_oci_layout


class _MemberReader(io.RawIOBase):
    """The bytes of one tar member, read with ``pread`` so that any number of readers share one descriptor."""

    def __init__(self, fd: int, offset: int, size: int, what: str) -> None:
        super().__init__()
        self._what = what
        self._fd = fd
        self._offset = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"cannot seek before the start of {self._what}")
        self._pos = base + offset
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self.read(CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        n = min(n, self._size - self._pos)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._offset + self._pos)
        if not data:
            raise IntegrityError(f"{self._what} ends early; the archive is truncated.")
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class TarMemberStore:
    """Random access to the members of an uncompressed tar file by name, without extracting it."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 - lives as long as the image
        except FileNotFoundError:
            raise NotFoundError(f"{name}: file {str(path)!r} does not exist; give the path of the archive.") from None
        except (tarfile.TarError, OSError) as exc:
            raise IntegrityError(f"{name}: {str(path)!r} is not a readable tar archive ({exc}).") from None
        self.members: dict[str, tarfile.TarInfo] = {}
        for info in self._tar.getmembers():
            self.members[os.path.normpath(info.name).lstrip("/")] = info

    def open_member(self, member: str) -> BinaryIO:
        info = self.members.get(os.path.normpath(member).lstrip("/"))
        if info is None or not info.isfile():
            raise NotFoundError(f"{self.name}: {member!r} is missing from the archive; the archive is incomplete.")
        # pread on the shared descriptor: several layers are read by several threads at once.
        fileobj = self._tar.fileobj
        assert fileobj is not None
        return _MemberReader(fileobj.fileno(), info.offset_data, info.size, f"{member} in {self.name}")  # type: ignore[return-value,attr-defined]

    def read_member(self, member: str) -> bytes:
        with self.open_member(member) as f:
            return read_limited(f, f"{member} in {self.name}")

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        return self.open_member(f"blobs/{desc.algorithm}/{desc.hex}")

    def read_document(self, desc: Descriptor) -> bytes:
        with self.open_blob(desc) as f:
            return read_limited(f, f"document {desc.digest} in {self.name}")


def open_oci_archive(path: Path, tag: str | None, platform: Platform | None, name: str) -> Image:
    """Open an image in an oci-archive by unpacking only its small documents into a temporary layout."""
    store = TarMemberStore(path, name)
    if "index.json" not in store.members or "oci-layout" not in store.members:
        raise NotFoundError(f"{name}: {str(path)!r} holds no OCI layout (no index.json); is it a docker-archive?")
    # Read index.json through the layout code by presenting the archive's documents as a layout.
    tmp = Path(tempfile.mkdtemp(prefix="sconify-ociarchive-"))
    try:
        (tmp / "index.json").write_bytes(store.read_member("index.json"))
        (tmp / "oci-layout").write_bytes(store.read_member("oci-layout"))
        image = open_oci_layout(tmp, tag, platform, name, store=store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return image


class OciArchiveDestination(OciLayoutDestination):
    """Writes an OCI layout into a temporary directory, then packs it into FILE atomically on commit."""

    def __init__(self, path: Path, tag: str | None, name: str) -> None:
        if path.exists() and not path.is_file():
            raise DestinationError(f"{name}: {str(path)!r} exists and is not a file; choose another path.")
        if not path.absolute().parent.is_dir():
            raise DestinationError(f"{name}: directory {str(path.absolute().parent)!r} does not exist; create it.")
        self.archive = path
        self._work = Path(tempfile.mkdtemp(prefix=".sconify-archive-", dir=path.absolute().parent))
        layout = self._work / "layout"
        if path.exists():  # add to an existing archive, as skopeo does
            with tarfile.open(path, "r:") as tar:
                tar.extractall(layout, filter="data")
        super().__init__(layout, tag, name)

    def commit(self) -> str:
        where = super().commit()
        fd, tmp = tempfile.mkstemp(prefix=f".{self.archive.name}.", dir=self.archive.absolute().parent)
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(self.root.rglob("*")):
                    info = tar.gettarinfo(str(path), arcname=str(path.relative_to(self.root)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    info.mode = 0o755 if info.isdir() else 0o644
                    if info.isfile():
                        with open(path, "rb") as member:
                            tar.addfile(info, member)
                    else:
                        tar.addfile(info)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.archive)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            shutil.rmtree(self._work, ignore_errors=True)
        return f"oci-archive:{self.archive}" + (f":{self.tag}" if self.tag else "") + where[where.rfind("@") :]

    def abort(self) -> None:
        super().abort()
        shutil.rmtree(self._work, ignore_errors=True)
