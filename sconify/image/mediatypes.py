"""Media types of the OCI image spec and Docker's schema 2, and the mapping between the two families."""

from __future__ import annotations

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"

INDEXES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIGS = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYERS = frozenset(
    {
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_NONDIST,
        OCI_LAYER_NONDIST_GZIP,
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER,
        DOCKER_FOREIGN_LAYER,
    }
)

# Compression names used throughout sconify.
GZIP = "gzip"
ZSTD = "zstd"
NONE = "none"

_OCI_LAYER_BY_COMPRESSION = {NONE: OCI_LAYER, GZIP: OCI_LAYER_GZIP, ZSTD: OCI_LAYER_ZSTD}
# Docker schema 2 has no zstd layer type; registries and engines accept the OCI one inside it.
_DOCKER_LAYER_BY_COMPRESSION = {NONE: DOCKER_LAYER, GZIP: DOCKER_LAYER_GZIP, ZSTD: OCI_LAYER_ZSTD}


def layer_type(family: str, compression: str) -> str:
    """The layer media type for a manifest family (``oci`` or ``docker``) and a compression name."""
    table = _OCI_LAYER_BY_COMPRESSION if family == "oci" else _DOCKER_LAYER_BY_COMPRESSION
    return table[compression]


def family_of(manifest_type: str) -> str:
    """``oci`` or ``docker``: the family a manifest or index media type belongs to."""
    return "docker" if manifest_type in (DOCKER_MANIFEST, DOCKER_LIST) else "oci"


def to_oci(media_type: str) -> str:
    """The OCI media type equivalent to a Docker one (unchanged if already OCI or unknown)."""
    return {
        DOCKER_LIST: OCI_INDEX,
        DOCKER_MANIFEST: OCI_MANIFEST,
        DOCKER_CONFIG: OCI_CONFIG,
        DOCKER_LAYER_GZIP: OCI_LAYER_GZIP,
        DOCKER_LAYER: OCI_LAYER,
        DOCKER_FOREIGN_LAYER: OCI_LAYER_NONDIST_GZIP,
    }.get(media_type, media_type)


def compression_of(media_type: str) -> str | None:
    """The compression a layer media type declares, or None when it does not say.

    This is only a hint: sconify detects the real compression from the bytes.
    """
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return GZIP
    if media_type.endswith("+zstd"):
        return ZSTD
    if media_type.endswith(".tar"):
        return NONE
    return None
