"""The ``oci:DIR[:TAG]`` transport: OCI image layouts on disk, read lazily and written atomically."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from sconify.errors import DestinationError, IntegrityError, NotFoundError
from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor, Image, Platform, Readable, parse_json_document
from sconify.image.streams import CHUNK
from sconify.image.transports.base import read_limited, resolve_image, verify_document

log = logging.getLogger(__name__)

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}


class OciLayoutStore:
    """Blobs and documents of an OCI layout directory (a BlobSource and DocumentStore)."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name

    def blob_path(self, desc: Descriptor) -> Path:
        return self.root / "blobs" / desc.algorithm / desc.hex

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        try:
            return open(self.blob_path(desc), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError:
            raise NotFoundError(
                f"blob {desc.digest} is missing from {self.name}; the layout is incomplete, copy the image again."
            ) from None

    def read_document(self, desc: Descriptor) -> bytes:
        with self.open_blob(desc) as f:
            return read_limited(f, f"document {desc.digest} in {self.name}")


def _read_index(root: Path, name: str) -> dict[str, Any]:
    if not root.is_dir():
        raise NotFoundError(f"{name}: directory {str(root)!r} does not exist; give the path of an OCI image layout.")
    layout = root / LAYOUT_FILE
    index = root / "index.json"
    if not layout.is_file() or not index.is_file():
        raise NotFoundError(
            f"{name}: {str(root)!r} is not an OCI image layout (no oci-layout or index.json file); "
            "give the directory that skopeo, umoci or sconify wrote."
        )
    try:
        version = json.loads(layout.read_text()).get("imageLayoutVersion")
    except (ValueError, AttributeError):
        version = None
    if version != "1.0.0":
        raise IntegrityError(f"{name}: oci-layout declares version {version!r}; only 1.0.0 is known.")
    return parse_json_document(index.read_bytes(), f"index.json of {name}")


def _entries(index: dict[str, Any], name: str) -> list[Descriptor]:
    raw = index.get("manifests")
    if not isinstance(raw, list):
        raise IntegrityError(f"index.json of {name} has no manifest list; it is corrupt.")
    return [Descriptor.from_json(d, f"an entry of index.json of {name}") for d in raw]


def open_oci_layout(
    root: Path, tag: str | None, platform: Platform | None, name: str, store: Any = None
) -> Image:
    """Open the image named by ``tag`` (or the only image) in an OCI layout.

    ``store`` replaces the layout's own blob directory (used for layouts packed in an archive).
    """
    index = _read_index(root, name)
    entries = _entries(index, name)
    store = store or OciLayoutStore(root, name)
    if tag is not None:
        chosen = [d for d in entries if (d.annotations or {}).get(REF_NAME) == tag]
        if not chosen:
            tags = sorted({(d.annotations or {}).get(REF_NAME, "") for d in entries} - {""})
            raise NotFoundError(
                f"{name}: tag {tag!r} is not in the layout (tags there: {', '.join(tags) or 'none'})."
            )
        desc = chosen[-1]
    elif len(entries) == 1:
        desc = entries[0]
    else:
        tags = sorted({(d.annotations or {}).get(REF_NAME, "") for d in entries} - {""})
        raise NotFoundError(
            f"{name} holds {len(entries)} images; name one with oci:DIR:TAG (tags: {', '.join(tags) or 'none'})."
        )
    top = store.read_document(desc)
    verify_document(top, desc, f"the manifest {desc.digest} in {name}")
    return resolve_image(store, store, top, desc.media_type or None, platform, name)


def _preallocate(fd: int, size: int) -> bool:
    """Reserve ``size`` bytes for a file about to be written (Linux ``fallocate``): the file system then
    allocates once instead of page by page, which halves the kernel's share of writing a big blob. Best
    effort: False where the call or the file system does not support it (never emulated by writing zeros)."""
    global _FALLOCATE
    if _FALLOCATE is None:
        try:
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).fallocate
            function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
            function.restype = ctypes.c_int
            _FALLOCATE = function
        except (OSError, AttributeError):
            _FALLOCATE = False
    return bool(_FALLOCATE) and _FALLOCATE(fd, 0, 0, size) == 0


_FALLOCATE: Any = None
PREALLOCATE_MIN = 8 << 20  # smaller blobs are not worth the call


class _FileBlobWriter:
    """A blob streamed into a temporary file and moved into ``blobs/`` under its digest on commit."""

    def __init__(
        self,
        layout: OciLayoutDestination,
        media_type: str,
        known: Descriptor | None = None,
        size_hint: int | None = None,
    ) -> None:
        self._layout = layout
        self._known = known  # a blob whose reader verifies it: no second hash here
        self._media_type = media_type
        fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=layout.staging / "blobs" / "sha256")
        self._tmp = Path(tmp)
        expected = known.size if known is not None else size_hint
        self._reserved = expected if expected and expected >= PREALLOCATE_MIN and _preallocate(fd, expected) else 0
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> int:
        if self._known is None:
            self._hash.update(data)
        self._size += len(data)
        self._file.write(data)
        return len(data)

    def commit(self) -> Descriptor:
        if self._reserved > self._size:  # the reservation set the file's length: cut it back to what was written
            self._file.flush()
            os.ftruncate(self._file.fileno(), self._size)
        self._file.close()
        if self._known is not None:
            if self._size != self._known.size:
                self.abort()
                raise IntegrityError(
                    f"blob {self._known.digest} arrived with {self._size} bytes, not {self._known.size}."
                )
            desc = self._known
        else:
            desc = Descriptor(self._media_type, "sha256:" + self._hash.hexdigest(), self._size)
        self._layout._adopt(self._tmp, desc)
        return desc

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class OciLayoutDestination:
    """Writes one image into an OCI layout; a new layout appears only complete, an existing one is updated
    by adding blobs and replacing index.json atomically."""

    stages_locally = True
    accepted_compressions = frozenset({mt.GZIP, mt.ZSTD, mt.NONE})
    preferred_compression = mt.GZIP
    families: tuple[str, ...] = ("oci",)

    def __init__(self, root: Path, tag: str | None, name: str) -> None:
        self.root = root
        self.tag = tag
        self.name = name
        self._manifest: Descriptor | None = None
        self._new = not (root / "index.json").exists()
        if self._new:
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                raise DestinationError(
                    f"{name}: {str(root)!r} exists and is not an OCI layout; choose a new or empty directory."
                )
            parent = root.absolute().parent
            if not parent.is_dir():
                raise DestinationError(f"{name}: the parent directory {str(parent)!r} does not exist; create it first.")
            self.staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=parent))
        else:
            _read_index(root, name)  # validates the layout before we touch it
            self.staging = root
        (self.staging / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        self._added: list[Path] = []

    def _blob_path(self, desc: Descriptor) -> Path:
        return self.staging / "blobs" / desc.algorithm / desc.hex

    def _adopt(self, tmp: Path, desc: Descriptor) -> None:
        target = self._blob_path(desc)
        if target.exists():
            tmp.unlink()
            return
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        self._added.append(target)

    def has_blob(self, desc: Descriptor) -> bool:
        path = self._blob_path(desc)
        return path.is_file() and path.stat().st_size == desc.size

    def put_blob(self, desc: Descriptor, stream: Readable, progress: Callable[[int], None] | None = None) -> None:
        # The stream comes from a verifying reader (promise 3), which raises before the end on any mismatch.
        writer = _FileBlobWriter(self, desc.media_type, desc)
        try:
            while chunk := stream.read(CHUNK):
                writer.write(chunk)
                if progress is not None:
                    progress(len(chunk))
        except BaseException:
            writer.abort()
            raise
        got = writer.commit()
        if got.digest != desc.digest or got.size != desc.size:
            raise IntegrityError(
                f"blob {desc.digest} arrived as {got.digest} ({got.size} bytes); the source is corrupt."
            )

    def link_blob(self, desc: Descriptor, path: Path) -> bool:
        """Make a blob present by hard-linking a local file of known size (sconify's own cache); False if not
        possible (another file system), and the caller copies instead."""
        if Path(path).stat().st_size != desc.size:
            return False
        target = self._blob_path(desc)
        if target.exists():
            return True
        try:
            os.link(path, target)
        except OSError:
            return False
        self._added.append(target)
        return True

    def new_blob(self, media_type: str, size_hint: int | None = None) -> _FileBlobWriter:
        return _FileBlobWriter(self, media_type, size_hint=size_hint)

    def mount_blob(self, desc: Descriptor, source: object) -> bool:
        return False

    def put_document(self, data: bytes, media_type: str) -> Descriptor:
        writer = _FileBlobWriter(self, media_type)
        writer.write(data)
        return writer.commit()

    def put_manifest(self, data: bytes, media_type: str, platform: Platform | None = None) -> None:
        desc = self.put_document(data, media_type)
        annotations = {REF_NAME: self.tag} if self.tag else None
        self._manifest = Descriptor(media_type, desc.digest, desc.size, annotations, platform)

    def commit(self) -> str:
        if self._manifest is None:
            raise DestinationError(f"{self.name}: nothing was written (no manifest); this is a bug in sconify.")
        if self._new:
            index: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
        else:
            index = _read_index(self.root, self.name)
        kept = [
            d
            for d in index.get("manifests", [])
            if not (self.tag and (d.get("annotations") or {}).get(REF_NAME) == self.tag)
            and not (not self.tag and d.get("digest") == self._manifest.digest)
        ]
        index["manifests"] = kept + [self._manifest.to_json()]
        _write_atomic(self.staging / "index.json", json.dumps(index, indent=2).encode() + b"\n")
        _write_atomic(self.staging / LAYOUT_FILE, json.dumps(LAYOUT_VERSION).encode())
        if self._new:
            try:
                if self.root.exists():
                    self.root.rmdir()  # an empty directory the user made for us
                os.replace(self.staging, self.root)
            except OSError as exc:
                self.abort()
                raise DestinationError(f"{self.name}: cannot move the layout into place ({exc}).") from None
        self._added.clear()
        return f"oci:{self.root}" + (f":{self.tag}" if self.tag else "") + f"@{self._manifest.digest}"

    def abort(self) -> None:
        if self._new:
            shutil.rmtree(self.staging, ignore_errors=True)
        else:
            for path in self._added:
                with contextlib.suppress(OSError):
                    path.unlink()
        self._added.clear()


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

