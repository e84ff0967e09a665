"""Image references in skopeo's transport syntax: ``docker://``, ``oci:``, ``oci-archive:``,
``docker-archive:``, ``docker-daemon:``; a bare ``NAME[:TAG]`` means ``docker://``."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from sconify.errors import BadReferenceError

DOCKER = "docker"
OCI = "oci"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
DOCKER_DAEMON = "docker-daemon"
TRANSPORTS = (DOCKER, OCI, OCI_ARCHIVE, DOCKER_ARCHIVE, DOCKER_DAEMON)

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.?)+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")

# Transports skopeo knows and sconify does not: named so that the error says "unknown transport".
_OTHER_TRANSPORTS = ("dir", "containers-storage", "ostree", "sif", "tarball", "atomic")

_HINT = (
    "use docker://REGISTRY/REPO[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG], "
    "docker-archive:FILE[:NAME:TAG], docker-daemon:NAME[:TAG], or a bare NAME[:TAG]"
)


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. Fields that do not apply to the transport are None."""

    transport: str
    registry: str | None = None  # docker://; docker-daemon: uses it for the name only
    repository: str | None = None  # docker://, docker-daemon:, docker-archive: (name inside the archive)
    tag: str | None = None  # docker://, oci:, oci-archive:, docker-archive:, docker-daemon:
    digest: str | None = None  # docker://, docker-daemon: (image ID)
    path: str | None = None  # oci:, oci-archive:, docker-archive:
    index: int | None = None  # docker-archive:FILE:@N

    @property
    def name(self) -> str | None:
        """``registry/repository`` for named references, as Docker spells it (short for docker.io)."""
        if self.repository is None:
            return None
        if self.registry in (None, DEFAULT_REGISTRY):
            repo = self.repository
            return repo[len("library/") :] if repo.startswith("library/") else repo
        return f"{self.registry}/{self.repository}"

    @property
    def docker_name(self) -> str | None:
        """``name:tag`` or ``name@digest`` as Docker's CLI and archives spell it."""
        if self.name is None:
            return None
        if self.digest and not self.tag:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    def with_tag(self, tag: str | None) -> Reference:
        return replace(self, tag=tag, digest=None if tag else self.digest)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=digest)

    def __str__(self) -> str:
        if self.transport == DOCKER:
            out = f"docker://{self.registry}/{self.repository}"
            if self.tag:
                out += f":{self.tag}"
            if self.digest:
                out += f"@{self.digest}"
            return out
        if self.transport in (OCI, OCI_ARCHIVE):
            return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")
        if self.transport == DOCKER_ARCHIVE:
            if self.index is not None:
                return f"docker-archive:{self.path}:@{self.index}"
            return f"docker-archive:{self.path}" + (f":{self.docker_name}" if self.repository else "")
        if self.digest and not self.repository:
            return f"docker-daemon:{self.digest}"
        return f"docker-daemon:{self.docker_name}"


def _split_docker_name(text: str, original: str) -> tuple[str, str, str | None, str | None]:
    """Split ``[REGISTRY/]REPO[:TAG][@DIGEST]`` into normalised parts."""
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise BadReferenceError(
                f"{original!r} has a malformed digest {digest!r}; a digest looks like sha256:<64 hex digits>."
            )
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise BadReferenceError(f"{original!r} has an invalid tag {tag!r}; {_HINT}.")
    parts = text.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost" or parts[0].startswith("[")):
        registry, repo = parts[0], "/".join(parts[1:])
        if not _HOST_RE.match(registry):
            raise BadReferenceError(f"{original!r} has an invalid registry host {registry!r}; {_HINT}.")
    else:
        registry, repo = DEFAULT_REGISTRY, text
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repo:
        repo = f"library/{repo}"
    if not repo or not _REPO_RE.match(repo):
        raise BadReferenceError(
            f"{original!r} has an invalid repository name {repo!r} (lower-case letters, digits and . _ - / only); "
            f"{_HINT}."
        )
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return registry, repo, tag, digest


def parse_reference(text: str) -> Reference:
    """Parse a reference string; raise BadReferenceError with the accepted forms on anything else."""
    original = text
    text = text.strip()
    if not text:
        raise BadReferenceError(f"an empty image reference was given; {_HINT}.")
    if text.startswith("docker://"):
        return _docker(text[len("docker://") :], original)
    m = re.match(r"^([a-z][a-z0-9+.-]*):(.*)$", text, re.S)
    if m is None or m.group(1) not in TRANSPORTS:
        if m is not None and (m.group(2).startswith("//") or m.group(1) in _OTHER_TRANSPORTS):
            raise BadReferenceError(f"unknown transport {m.group(1)!r} in {original!r}; {_HINT}.")
        return _docker(text, original)  # a bare NAME[:TAG]
    transport, rest = m.group(1), m.group(2)
    if not rest:
        raise BadReferenceError(f"{original!r} names no path or image after '{transport}:'; {_HINT}.")
    if transport in (OCI, OCI_ARCHIVE):
        path, tag = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and "/" not in tail and head:
            path, tag = head, tail
            if not tag or len(tag) > 255:
                raise BadReferenceError(f"{original!r} has an invalid tag {tag!r}; {_HINT}.")
        return Reference(transport, path=path, tag=tag)
    if transport == DOCKER_ARCHIVE:
        path, colon, ref = rest.partition(":")
        if not path:
            raise BadReferenceError(f"{original!r} names no archive file; {_HINT}.")
        if not colon or not ref:
            return Reference(transport, path=path)
        if ref.startswith("@"):
            if not ref[1:].isdigit():
                raise BadReferenceError(f"{original!r} has an invalid image index {ref!r}; use @N with N >= 0.")
            return Reference(transport, path=path, index=int(ref[1:]))
        registry, repo, tag, digest = _split_docker_name(ref, original)
        if digest:
            raise BadReferenceError(f"{original!r}: a docker-archive reference takes NAME:TAG, not a digest.")
        return Reference(transport, path=path, registry=registry, repository=repo, tag=tag)
    # docker-daemon:
    if _DIGEST_RE.match(rest):
        return Reference(transport, digest=rest)
    registry, repo, tag, digest = _split_docker_name(rest, original)
    return Reference(transport, registry=registry, repository=repo, tag=tag, digest=digest)


def _docker(text: str, original: str) -> Reference:
    if not text:
        raise BadReferenceError(f"{original!r} names no image; {_HINT}.")
    registry, repo, tag, digest = _split_docker_name(text, original)
    return Reference(DOCKER, registry=registry, repository=repo, tag=tag, digest=digest)
