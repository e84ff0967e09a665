"""Transports: one module per kind of image store, each with the same two verbs (open an image, write one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sconify.image.model import Image, Platform
from sconify.image.reference import DOCKER, DOCKER_ARCHIVE, DOCKER_DAEMON, OCI, OCI_ARCHIVE, Reference
from sconify.image.transports.base import Destination


@dataclass(frozen=True)
class TransportOptions:
    """Options that only some transports use (credentials, TLS, daemon address)."""

    # docker://: "user:password" for the source/destination, a docker config dir, TLS switches.
    creds: str | None = None
    authfile: str | None = None
    tls_verify: bool | None = None  # None: verify, except plain HTTP on loopback registries
    cert_dir: str | None = None
    # docker-daemon:
    daemon_host: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def open_image(ref: Reference, platform: Platform | None = None, options: TransportOptions | None = None) -> Image:
    """Open the image a reference names, choosing ``platform`` from an index (default linux/amd64)."""
    options = options or TransportOptions()
    if ref.transport == OCI:
        from sconify.image.transports.oci import open_oci_layout

        return open_oci_layout(Path(ref.path or "."), ref.tag, platform, str(ref))
    if ref.transport == OCI_ARCHIVE:
        from sconify.image.transports.oci_archive import open_oci_archive

        return open_oci_archive(Path(ref.path or "."), ref.tag, platform, str(ref))
    if ref.transport == DOCKER_ARCHIVE:
        from sconify.image.transports.docker_archive import open_docker_archive

        return open_docker_archive(ref, platform)
    if ref.transport == DOCKER_DAEMON:
        from sconify.image.transports.daemon import open_daemon_image

        return open_daemon_image(ref, platform, options)
    assert ref.transport == DOCKER
    from sconify.image.transports.registry import open_registry_image

    return open_registry_image(ref, platform, options)


def open_destination(ref: Reference, options: TransportOptions | None = None) -> Destination:
    """A destination that writes an image where the reference says; nothing is visible before commit."""
    options = options or TransportOptions()
    if ref.transport == OCI:
        from sconify.image.transports.oci import OciLayoutDestination

        return OciLayoutDestination(Path(ref.path or "."), ref.tag, str(ref))
    if ref.transport == OCI_ARCHIVE:
        from sconify.image.transports.oci_archive import OciArchiveDestination

        return OciArchiveDestination(Path(ref.path or "."), ref.tag, str(ref))
    if ref.transport == DOCKER_ARCHIVE:
        from sconify.image.transports.docker_archive import DockerArchiveDestination

        return DockerArchiveDestination(ref)
    if ref.transport == DOCKER_DAEMON:
        from sconify.image.transports.daemon import DaemonDestination

        return DaemonDestination(ref, options)
    assert ref.transport == DOCKER
    from sconify.image.transports.registry import RegistryDestination

    return RegistryDestination(ref, options)
