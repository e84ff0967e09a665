"""What every transport offers: a way to open an image for reading and a destination to write one into."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from sconify.errors import IntegrityError, NotFoundError, UnsupportedError
from sconify.image import mediatypes as mt
from sconify.image.model import (
    DEFAULT_PLATFORM,
    BlobSource,
    Descriptor,
    Image,
    Platform,
    Readable,
    parse_json_document,
    sha256_digest,
    sniff_manifest_type,
)

log = logging.getLogger(__name__)

# The largest manifest, index or config sconify reads into memory (they are JSON documents; 4 MiB is what
# the distribution spec lets registries refuse beyond).
MAX_DOCUMENT = 8 << 20


class BlobWriter(Protocol):
    """A blob being written whose digest and size are known only at the end."""

    def write(self, data: bytes) -> int: ...

    def commit(self) -> Descriptor:
        """Finish the blob and return its descriptor (digest and size of what was written)."""
        ...

    def abort(self) -> None: ...


class Destination(Protocol):
    """Where an image is written. Blobs first, then the manifest; nothing is visible before ``commit``."""

    name: str
    # Layer compressions this destination stores as they are; others are converted.
    accepted_compressions: frozenset[str]
    # The compression used when a layer must be (re)compressed or is newly written.
    preferred_compression: str
    # Manifest families it can store, preferred first ("oci", "docker").
    families: tuple[str, ...]
    # Whether blob bytes stay on this machine until ``commit`` (a layout or archive being staged), or leave it
    # while they are written (a registry upload). The converter seals with position nonces only when nothing
    # sealed from a stream that is not yet verified can leave the machine (docs/fspf.md, section 3.4).
    stages_locally: bool

    def has_blob(self, desc: Descriptor) -> bool: ...

    def put_blob(self, desc: Descriptor, stream: Readable, progress: Callable[[int], None] | None = None) -> None:
        """Store a blob whose descriptor is known; the stream is already verified by its reader."""
        ...

    def new_blob(self, media_type: str, size_hint: int | None = None) -> BlobWriter:
        """A writer for a new blob; ``size_hint``, when given, is about how many bytes will be written."""
        ...

    def mount_blob(self, desc: Descriptor, source: BlobSource) -> bool:
        """Make a blob present without copying its bytes, if the destination can; False otherwise."""
        ...

    def put_manifest(self, data: bytes, media_type: str) -> None:
        """Store the exact manifest bytes (after all blobs it needs) and name it by the reference's tag."""
        ...

    def commit(self) -> str:
        """Make everything visible atomically; returns a reference string naming what was written."""
        ...

    def abort(self) -> None:
        """Undo everything written so far (best effort for remote stores: nothing was tagged)."""
        ...


class DocumentStore(Protocol):
    """What the shared resolver needs from a source: documents by descriptor."""

    name: str

    def read_document(self, desc: Descriptor) -> bytes: ...


def read_limited(stream: BinaryIO, what: str, limit: int = MAX_DOCUMENT) -> bytes:
    """Read a JSON document from a stream, refusing absurd sizes."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise IntegrityError(f"{what} is larger than {limit} bytes; that is not an image document.")
    return data


def verify_document(data: bytes, desc: Descriptor, what: str) -> bytes:
    """Check a document's bytes against the descriptor that names it."""
    if len(data) != desc.size:
        raise IntegrityError(
            f"{what} has {len(data)} bytes but its descriptor declares {desc.size}; the source is corrupt."
        )
    actual = sha256_digest(data) if desc.algorithm == "sha256" else None
    if actual is not None and actual != desc.digest:
        raise IntegrityError(f"{what} has digest {actual} but {desc.digest} was expected; the source is corrupt.")
    return data


def select_platform(index: dict[str, Any], platform: Platform | None, what: str) -> Descriptor:
    """Choose the manifest for a platform in an index or manifest list."""
    want = platform or DEFAULT_PLATFORM
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise IntegrityError(f"{what} has no manifest list; it is corrupt.")
    descs = [Descriptor.from_json(e, f"an entry of {what}") for e in entries]
    for desc in descs:
        if desc.platform is not None and want.matches(desc.platform) and desc.media_type not in mt.INDEXES:
            return desc
    offered = sorted({str(d.platform) for d in descs if d.platform is not None})
    raise UnsupportedError(
        f"{what} has no image for platform {want} (it offers: {', '.join(offered) or 'none'}); "
        "choose one with --platform."
    )


def resolve_image(
    store: DocumentStore,
    source: BlobSource,
    top: bytes,
    top_type: str | None,
    platform: Platform | None,
    name: str,
    fetch_manifest: Callable[[Descriptor], bytes] | None = None,
) -> Image:
    """Turn top-level manifest bytes (maybe an index) into a verified single-platform ``Image``."""
    media_type = sniff_manifest_type(top, top_type, f"the manifest of {name}")
    data = top
    depth = 0
    while media_type in mt.INDEXES:
        depth += 1
        if depth > 4:
            raise IntegrityError(f"{name} nests indexes more than 4 deep; it is corrupt.")
        index = parse_json_document(data, f"the index of {name}")
        desc = select_platform(index, platform, f"the index of {name}")
        raw = fetch_manifest(desc) if fetch_manifest else store.read_document(desc)
        data = verify_document(raw, desc, f"the manifest {desc.digest} of {name}")
        media_type = sniff_manifest_type(data, desc.media_type or None, f"the manifest {desc.digest} of {name}")
    manifest = parse_json_document(data, f"the manifest of {name}")
    config_desc = Descriptor.from_json(manifest.get("config"), f"the config descriptor of {name}")
    config = verify_document(store.read_document(config_desc), config_desc, f"the config of {name}")
    image = Image(data, media_type, config, source, name)
    if platform is not None and not platform.matches(image.platform) and image.platform.architecture:
        raise UnsupportedError(
            f"{name} is for platform {image.platform}, not {platform}; choose its platform with --platform "
            "or another image."
        )
    return image


def not_found(what: str, hint: str) -> NotFoundError:
    return NotFoundError(f"{what} does not exist; {hint}.")
