"""A conversion reads most layers two or three times (the analysis's header pass and file fetches, then the layer
pass); from a registry each read would be another download. ``BlobSpool`` keeps the raw bytes of every blob read
from a remote source in a private temporary directory the first time they stream by, and serves later reads
from there. Every read, first or later, still goes through the caller's verifying reader: the spool saves
downloads, not checks.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO

from sconify.image.model import BlobSource, Descriptor
from sconify.image.streams import ReadStream, is_seekable

log = logging.getLogger(__name__)


class BlobSpool:
    """Blobs kept for the length of one conversion, in a directory only this user can read; ``close`` removes it."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sconify-spool-", dir=parent))  # mode 0700
        self._done: dict[str, Path] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self.downloads = 0  # blobs fetched from the source (and kept)
        self.reuses = 0  # reads served from the spool

    def wrap(self, source: BlobSource) -> SpooledSource:
        return SpooledSource(source, self)

    def _lookup(self, digest: str) -> Path | None:
        with self._lock:
            path = self._done.get(digest)
            if path is not None:
                self.reuses += 1
            return path

    def _claim(self, digest: str) -> Path | None:
        """A temporary path to keep ``digest`` in, or None when another read is keeping it already."""
        with self._lock:
            if digest in self._busy or digest in self._done:
                return None
            self._busy.add(digest)
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self.dir)
        os.close(fd)
        return Path(tmp)

    def _finish(self, digest: str, tmp: Path, complete: bool) -> None:
        with self._lock:
            self._busy.discard(digest)
            if complete and digest not in self._done:
                final = self.dir / digest.replace(":", "-")
                os.replace(tmp, final)
                self._done[digest] = final
                self.downloads += 1
                return
        tmp.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> BlobSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpooledSource:
    """A BlobSource that reads through a ``BlobSpool``; everything else (a registry's name, for mounts) is the
    wrapped source's."""

    def __init__(self, inner: BlobSource, spool: BlobSpool) -> None:
        self._inner = inner
        self._spool = spool
        self.name = inner.name

    def __getattr__(self, item: str) -> Any:
        if item.startswith("_"):  # never for private names (copying or unpickling asks before _inner exists)
            raise AttributeError(item)
        return getattr(self._inner, item)

    def holds(self, digest: str) -> bool:
        """Whether the blob was read whole (and verified by that read) and is kept here."""
        with self._spool._lock:
            return digest in self._spool._done

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        kept = self._spool._lookup(desc.digest)
        if kept is not None:
            return open(kept, "rb")  # noqa: SIM115 - the caller closes it
        raw = self._inner.open_blob(desc)
        if is_seekable(raw):  # a local file: reading it again costs nothing
            return raw
        tmp = self._spool._claim(desc.digest)
        if tmp is None:
            return raw
        return _Keeping(raw, desc, tmp, self._spool)  # type: ignore[return-value]


class _Keeping(ReadStream):
    """Passes a blob through and writes a copy into the spool; the copy counts only if the blob was read whole."""

    def __init__(self, raw: BinaryIO, desc: Descriptor, tmp: Path, spool: BlobSpool) -> None:
        super().__init__()
        self._raw = raw
        self._desc = desc
        self._tmp = tmp
        self._spool = spool
        self._copy: BinaryIO | None = open(tmp, "wb")  # noqa: SIM115 - closed at the end or on close()
        self._count = 0

    def read(self, n: int | None = -1) -> bytes:
        data = self._raw.read(-1 if n is None else n)
        if self._copy is None:
            return data
        if data:
            try:
                self._copy.write(data)
            except OSError as exc:  # no room to keep it: the conversion goes on, the blob is fetched again later
                log.warning("cannot keep blob %s for reuse (%s); it will be downloaded again", self._desc.digest, exc)
                self._drop()
                return data
            self._count += len(data)
        if (not data and n != 0) or n is None or n < 0:  # the end of the blob (a read of "all" reaches it)
            self._end(self._count == self._desc.size)
        return data

    def _end(self, complete: bool) -> None:
        copy, self._copy = self._copy, None
        if copy is not None:
            try:
                copy.close()
            except OSError:
                complete = False
            self._spool._finish(self._desc.digest, self._tmp, complete)

    def _drop(self) -> None:
        self._end(False)

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            self._end(False)
            super().close()
