"""Writing an image into a destination: blobs kept byte for byte where the destination can store them,
converted deterministically where it cannot, the manifest last."""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from sconify.image import mediatypes as mt
from sconify.image.model import Descriptor, Image, Layer, sha256_digest
from sconify.image.streams import CHUNK, GzipWriter, detect_compression, open_verified_blob
from sconify.image.transports.base import Destination
from sconify.progress import SILENT, Progress

log = logging.getLogger(__name__)

PARALLEL_LAYERS = 3


@dataclass(frozen=True)
class LayerCopy:
    """What happened to one layer: ``present``, ``mounted``, ``copied`` or ``converted``."""

    source: Descriptor
    written: Descriptor
    action: str


@dataclass(frozen=True)
class CopyResult:
    """The outcome of writing an image: what was read, what was written, and where."""

    source: str
    source_digest: str
    destination: str
    digest: str
    media_type: str
    layers: tuple[LayerCopy, ...]
    manifest_bytes: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_digest": self.source_digest,
            "destination": self.destination,
            "digest": self.digest,
            "media_type": self.media_type,
            "layers": [
                {"source": lc.source.digest, "digest": lc.written.digest, "size": lc.written.size, "action": lc.action}
                for lc in self.layers
            ],
        }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The bytes of a manifest sconify builds itself: compact JSON in the spec's key order."""
    return json.dumps(manifest, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def transfer_layer(layer: Layer, dest: Destination, family: str, progress: Progress = SILENT) -> LayerCopy:
    """Make one source layer present in the destination: kept, mounted, copied, or re-encoded if it must be."""
    desc = layer.descriptor
    hint = mt.compression_of(desc.media_type)
    wanted_type = mt.layer_type(family, hint) if hint is not None else desc.media_type
    if hint is not None and hint in dest.accepted_compressions:
        if dest.has_blob(desc):
            return LayerCopy(desc, replace(desc, media_type=wanted_type), "present")
        if dest.mount_blob(desc, layer.source):
            return LayerCopy(desc, replace(desc, media_type=wanted_type), "mounted")
        with progress.task(f"copy {desc.digest[7:19]}", desc.size) as bar:
            # A byte-for-byte copy checks digest and size; DiffIDs are checked wherever a layer's content is read.
            stream = open_verified_blob(layer.source, desc)
            try:
                dest.put_blob(desc, stream, bar.update)
            finally:
                stream.close()
        real = detect_compression(stream.head) if stream.head else hint
        if real != hint:
            log.warning("layer %s is labelled %s but holds %s data; fixing its media type", desc.digest, hint, real)
            wanted_type = mt.layer_type(family, real)
        return LayerCopy(desc, replace(desc, media_type=wanted_type), "copied")
    # The destination cannot keep this blob as it is: re-encode the verified tar deterministically.
    target = dest.preferred_compression
    writer = dest.new_blob(mt.layer_type(family, target))
    try:
        with progress.task(f"convert {desc.digest[7:19]}", desc.size) as bar, layer.open_tar() as tar:
            sink = GzipWriter(writer) if target == mt.GZIP else writer
            while chunk := tar.read(CHUNK):
                sink.write(chunk)
                bar.update(len(chunk))
            if isinstance(sink, GzipWriter):
                sink.close()
    except BaseException:
        writer.abort()
        raise
    written = writer.commit()
    return LayerCopy(desc, written, "converted")


def write_image(image: Image, dest: Destination, progress: Progress = SILENT) -> CopyResult:
    """Write ``image`` into ``dest`` and commit; on any error the destination is rolled back."""
    try:
        family = image.family if image.family in dest.families else dest.families[0]
        layers = image.layers
        with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_LAYERS, len(layers)))) as pool:
            copies = list(pool.map(lambda layer: transfer_layer(layer, dest, family, progress), layers))
        config_desc = image.config_descriptor
        config_type = mt.DOCKER_CONFIG if family == "docker" else mt.OCI_CONFIG
        if not dest.has_blob(config_desc):
            dest.put_blob(config_desc, io.BytesIO(image.config_bytes))
        unchanged = family == image.family and all(c.written == c.source for c in copies)
        if unchanged:
            data, media_type = image.manifest_bytes, image.media_type
        else:
            media_type = mt.DOCKER_MANIFEST if family == "docker" else mt.OCI_MANIFEST
            manifest: dict[str, Any] = {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": replace(config_desc, media_type=config_type).to_json(),
                "layers": [c.written.to_json() for c in copies],
            }
            if image.manifest.get("annotations") and family == "oci":
                manifest["annotations"] = image.manifest["annotations"]
            data = manifest_bytes(manifest)
        dest.put_manifest(data, media_type)
        where = dest.commit()
    except BaseException:
        dest.abort()
        raise
    return CopyResult(image.name, image.digest, where, sha256_digest(data), media_type, tuple(copies), data)
