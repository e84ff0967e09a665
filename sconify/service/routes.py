"""Routing: which pushed repositories are converted, to which destination, with which options.

A route's ``match`` is a repository pattern where ``*`` stands for one or more characters other than ``/`` and
``**`` for one or more characters of any kind; the first route (in file order) whose pattern matches the whole
repository, and whose ``sources`` (if given) name the event's source, wins. The ``destination`` is a
``docker://`` or ``oci:`` reference without a tag whose wildcards are filled, in order, with what the match's
wildcards captured (``vendor/*`` -> ``docker://reg/confidential/*``). The destination tag comes from the
route's ``tag`` template (default ``{tag}``, the pushed tag).

The service never converts what it pushed itself: an event for a repository that some route's destination
names (in the registry of the event's source), or for a cosign signature tag, is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sconify.errors import BadReferenceError, UsageError
from sconify.image.reference import DOCKER, OCI, Reference, parse_reference

if TYPE_CHECKING:
    from sconify.service.config import RouteConfig, ServiceConfig

_WILDCARD = re.compile(r"\*\*|\*")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# Tags cosign and its kin attach to an image: never images to convert.
_ARTIFACT_TAG = re.compile(r"^sha(256|512)-[0-9a-f]{64,128}(\.(sig|att|sbom))?$")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _WILDCARD.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append("(.+)" if m.group(0) == "**" else "([^/]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, captures: tuple[str, ...]) -> str:
    parts = iter(captures)
    return _WILDCARD.sub(lambda _m: next(parts), template)


@dataclass(frozen=True)
class Route:
    """A compiled route: the match regex, the destination template, and the route's settings."""

    config: RouteConfig
    regex: re.Pattern[str]
    wildcards: int
    dest_wildcards: int
    dest_transport: str
    dest_registry: str | None
    dest_regex: re.Pattern[str] | None  # the destination repositories, for loop detection (docker:// only)

    @property
    def name(self) -> str:
        return self.config.name

    def captures(self, source: str, repository: str) -> tuple[str, ...] | None:
        """What the wildcards captured, or None when this route does not take the repository."""
        if self.config.sources and source not in self.config.sources:
            return None
        m = self.regex.match(repository)
        return m.groups() if m else None

    def destination_base(self, captures: tuple[str, ...]) -> str:
        """The destination without its tag."""
        return _fill(self.config.destination, captures if self.dest_wildcards else ())

    def destination(self, captures: tuple[str, ...], repository: str, tag: str | None, digest: str | None
                    ) -> Reference:
        """The destination reference for an image of ``repository`` pushed as ``tag`` and/or ``digest``."""
        template = self.config.tag if tag else self.config.untagged_tag
        if template is None:
            raise UsageError(f"route {self.name} does not convert pushes by digest only (set untagged_tag).")
        hexpart = digest.split(":", 1)[1] if digest else ""
        try:
            text = template.format(tag=tag or "", digest=digest or "", digest_hex=hexpart,
                                   digest_short=hexpart[:12], repository=repository.replace("/", "-"),
                                   name=repository.rsplit("/", 1)[-1])
        except (KeyError, IndexError, ValueError):
            raise UsageError(f"route {self.name}: the tag template {template!r} cannot be filled.") from None
        if "{digest" in template and not digest:
            raise UsageError(f"route {self.name}: the tag template {template!r} needs a digest and the event has "
                             "none.")
        if not _TAG_RE.match(text):
            raise UsageError(f"route {self.name}: the destination tag {text!r} made from {template!r} is not a "
                             "valid tag.")
        return parse_reference(f"{self.destination_base(captures)}:{text}")


def compile_route(config: RouteConfig) -> Route:
    """Check a route's patterns and destination and compile them; UsageError names what is wrong."""
    where = f"route {config.name}"
    if not config.match.strip("/") or " " in config.match:
        raise UsageError(f"{where}: match {config.match!r} is not a repository pattern such as 'vendor/*'.")
    wildcards = len(_WILDCARD.findall(config.match))
    dest_wildcards = len(_WILDCARD.findall(config.destination))
    if dest_wildcards not in (0, wildcards):
        raise UsageError(f"{where}: the destination {config.destination!r} has {dest_wildcards} wildcards but the "
                         f"match {config.match!r} has {wildcards}; use the same number, or none.")
    probe = _WILDCARD.sub("x", config.destination)
    try:
        ref = parse_reference(probe)
    except BadReferenceError as exc:
        raise UsageError(f"{where}: the destination {config.destination!r} is not an image reference "
                         f"({exc.message}).") from None
    if ref.transport not in (DOCKER, OCI):
        raise UsageError(f"{where}: the destination must be docker://REGISTRY/REPO or oci:DIR, not "
                         f"{ref.transport}:.")
    if ref.digest or (ref.transport == DOCKER and probe.rsplit("/", 1)[-1].count(":")) or \
            (ref.transport == OCI and ref.tag):
        raise UsageError(f"{where}: the destination {config.destination!r} must not carry a tag or digest; the "
                         "tag comes from the route's 'tag' template.")
    if ref.transport == DOCKER and not config.destination.startswith("docker://"):
        raise UsageError(f"{where}: write the destination with its transport, docker://{ref.registry}/"
                         f"{ref.repository}.")
    dest_regex = None
    if ref.transport == DOCKER:
        assert ref.repository is not None
        repo_template = config.destination[len("docker://") :]
        head, _, rest = repo_template.partition("/")
        if rest and head == ref.registry:
            repo_template = rest
        elif "/" not in repo_template:  # docker.io's official images live under library/
            repo_template = "library/" + repo_template
        dest_regex = _pattern_regex(repo_template)
    return Route(config, _pattern_regex(config.match), wildcards, dest_wildcards, ref.transport,
                 ref.registry if ref.transport == DOCKER else None, dest_regex)


def _same_registry(a: str | None, b: str | None) -> bool:
    def norm(x: str | None) -> str:
        x = (x or "").lower()
        return "docker.io" if x in ("index.docker.io", "registry-1.docker.io") else x

    return norm(a) == norm(b)


@dataclass(frozen=True)
class Decision:
    """What to do with one pushed image: convert with ``route`` (and its captures) or ignore, and why."""

    route: Route | None
    captures: tuple[str, ...] = ()
    reason: str = ""


class Router:
    """The compiled routes of a service configuration."""

    def __init__(self, config: ServiceConfig) -> None:
        self.routes = tuple(compile_route(r) for r in config.routes)

    def is_own(self, registry: str, repository: str) -> bool:
        """Whether ``repository`` in ``registry`` is a destination of some route (the service's own push)."""
        return any(r.dest_regex is not None and _same_registry(r.dest_registry, registry)
                   and r.dest_regex.match(repository) for r in self.routes)

    def decide(self, source: str, registry: str, repository: str, tag: str | None, digest: str | None) -> Decision:
        """Route one pushed image, or say why it is ignored."""
        if self.is_own(registry, repository):
            return Decision(None, reason="a destination of the service (its own push)")
        if tag and _ARTIFACT_TAG.match(tag):
            return Decision(None, reason="a signature or attestation tag")
        for route in self.routes:
            captures = route.captures(source, repository)
            if captures is None:
                continue
            if not tag and route.config.untagged_tag is None:
                return Decision(None, reason=f"pushed by digest only and route {route.name} has no untagged_tag")
            return Decision(route, captures)
        return Decision(None, reason="no route matches the repository")
