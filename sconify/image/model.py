"""The image model: platforms, descriptors, and the lazily read ``Image`` and ``Layer`` every transport yields."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from sconify.errors import IntegrityError, UnsupportedError

if TYPE_CHECKING:
    from sconify.image.streams import DecompressingReader, VerifyingReader
from sconify.image import mediatypes as mt

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}


def check_digest(value: Any, what: str) -> str:
    """Return ``value`` if it is a well-formed ``sha256:``/``sha512:`` digest, else raise IntegrityError."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise IntegrityError(f"{what} has a malformed digest {value!r}; the image metadata is corrupt.")
    return value


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of some bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes for manifests and configs that sconify writes itself."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class Platform:
    """An OCI platform: operating system, architecture and optional variant."""

    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` as used by ``--platform``."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            from sconify.errors import UsageError

            raise UsageError(f"platform {text!r} is not of the form OS/ARCH[/VARIANT], e.g. linux/amd64.")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Platform:
        arch = str(obj.get("architecture", ""))
        return cls(
            os=str(obj.get("os", "")),
            architecture=_ARCH_ALIASES.get(arch, arch),
            variant=obj.get("variant") or None,
            os_version=obj.get("os.version") or None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        if self.os_version:
            out["os.version"] = self.os_version
        return out

    def matches(self, candidate: Platform) -> bool:
        """Whether ``candidate`` (from an index) satisfies this wanted platform."""
        if (self.os, self.architecture) != (candidate.os, candidate.architecture):
            return False
        if self.variant is None:
            return True
        norm = {"arm64": {"v8": None}}.get(self.architecture, {})
        return norm.get(self.variant, self.variant) == norm.get(candidate.variant or "", candidate.variant)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size, and optional extras."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = field(default=None, hash=False)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, obj: Any, what: str = "a descriptor") -> Descriptor:
        if not isinstance(obj, Mapping):
            raise IntegrityError(f"{what} is not a JSON object; the image metadata is corrupt.")
        size = obj.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"{what} has an invalid size {size!r}; the image metadata is corrupt.")
        platform = obj.get("platform")
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=check_digest(obj.get("digest"), what),
            size=size,
            annotations=dict(obj["annotations"]) if isinstance(obj.get("annotations"), Mapping) else None,
            platform=Platform.from_json(platform) if isinstance(platform, Mapping) else None,
            urls=tuple(obj.get("urls") or ()),
            artifact_type=obj.get("artifactType"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @property
    def hex(self) -> str:
        """The hexadecimal part of the digest."""
        return self.digest.split(":", 1)[1]

    @property
    def algorithm(self) -> str:
        return self.digest.split(":", 1)[0]


class Readable(Protocol):
    """Anything bytes are read from in bounded pieces."""

    def read(self, n: int = -1, /) -> bytes: ...


class Writable(Protocol):
    """Anything bytes are written to."""

    def write(self, data: bytes, /) -> int: ...


class BlobSource(Protocol):
    """Where a transport reads blobs from; returns raw, not yet verified bytes."""

    name: str

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """Open the blob named by ``desc`` for streaming; raise NotFoundError if it is absent."""
        ...


@dataclass(frozen=True)
class Layer:
    """One layer of an image: its blob descriptor, its DiffID, and where its bytes live."""

    descriptor: Descriptor
    diff_id: str
    source: BlobSource = field(compare=False, repr=False)

    def open_blob(self, *, verify_diff_id: bool = False) -> VerifyingReader:
        """The blob's raw bytes, verified against digest and size (and the DiffID if asked) as they stream."""
        from sconify.image.streams import open_verified_blob

        return open_verified_blob(self.source, self.descriptor, self.diff_id if verify_diff_id else None)

    def open_tar(self) -> DecompressingReader:
        """The layer's uncompressed tar stream, verified against digest, size and DiffID as it streams."""
        from sconify.image.streams import open_verified_tar

        return open_verified_tar(self.source, self.descriptor, self.diff_id)


def parse_json_document(data: bytes, what: str) -> dict[str, Any]:
    """Parse a manifest, index or config; corrupt bytes become one clear IntegrityError."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{what} is not valid JSON ({exc}); the image is corrupt.") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} is not a JSON object; the image is corrupt.")
    return obj


def sniff_manifest_type(data: bytes, declared: str | None, what: str) -> str:
    """The media type of a manifest or index from its declared type, its ``mediaType`` field or its shape."""
    obj = parse_json_document(data, what)
    if obj.get("schemaVersion") == 1:
        raise UnsupportedError(
            f"{what} uses Docker manifest schema 1, which is obsolete; push the image again with a current "
            "Docker or skopeo to get schema 2."
        )
    own = obj.get("mediaType")
    for candidate in (declared, own):
        if candidate in mt.INDEXES or candidate in mt.MANIFESTS:
            return str(candidate)
    if "manifests" in obj:
        return mt.OCI_INDEX
    if "layers" in obj and "config" in obj:
        return mt.OCI_MANIFEST
    raise UnsupportedError(f"{what} is neither an image manifest nor an index (media type {declared or own!r}).")


@dataclass(frozen=True)
class Image:
    """A single-platform image: exact manifest bytes, exact config bytes, and lazily read layers."""

    manifest_bytes: bytes
    media_type: str
    config_bytes: bytes
    source: BlobSource = field(compare=False, repr=False)
    name: str = ""

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return parse_json_document(self.manifest_bytes, f"the manifest of {self.name or 'the image'}")

    @cached_property
    def config(self) -> dict[str, Any]:
        return parse_json_document(self.config_bytes, f"the config of {self.name or 'the image'}")

    @property
    def digest(self) -> str:
        """The manifest digest, which names this image in a registry."""
        return sha256_digest(self.manifest_bytes)

    @property
    def family(self) -> str:
        return mt.family_of(self.media_type)

    @cached_property
    def config_descriptor(self) -> Descriptor:
        return Descriptor.from_json(self.manifest.get("config"), "the manifest's config descriptor")

    @cached_property
    def layers(self) -> tuple[Layer, ...]:
        raw = self.manifest.get("layers")
        if not isinstance(raw, list):
            raise IntegrityError(f"the manifest of {self.name or 'the image'} has no layer list; it is corrupt.")
        descs = [Descriptor.from_json(d, f"layer {i} of {self.name or 'the image'}") for i, d in enumerate(raw)]
        rootfs = self.config.get("rootfs") or {}
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(descs):
            raise IntegrityError(
                f"the config of {self.name or 'the image'} lists {len(diff_ids or [])} layer DiffIDs but the "
                f"manifest has {len(descs)} layers; the image is corrupt."
            )
        return tuple(
            Layer(desc, check_digest(diff, f"DiffID {i} of {self.name or 'the image'}"), self.source)
            for i, (desc, diff) in enumerate(zip(descs, diff_ids, strict=True))
        )

    @property
    def platform(self) -> Platform:
        return Platform.from_json(self.config)

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.manifest.get("annotations") or {})
