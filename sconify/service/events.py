"""Parsers for the push notifications registries send: the distribution registry's event envelopes (v1 and v2
media types), Harbor webhooks, GitHub package events and Docker Hub webhooks.

Each parser takes the raw body (and the request headers that matter) and returns a ``Delivery``: the pushed
images (``Push``: repository plus digest and/or tag), the events it skipped on purpose (pulls, blob uploads,
deletes, other packages) and the events it rejected as invalid (no digest nor tag, a malformed name). A body
that is not what the sender's format promises raises ``EventError`` with an HTTP status and one sentence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DISTRIBUTION_V1 = "application/vnd.docker.distribution.events.v1+json"
DISTRIBUTION_V2 = "application/vnd.docker.distribution.events.v2+json"
DISTRIBUTION_TYPES = (DISTRIBUTION_V1, DISTRIBUTION_V2)
JSON = "application/json"

# Manifest media types whose push is an image (or an index of images) to convert.
MANIFEST_TYPES = frozenset({
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
})

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$|^sha512:[0-9a-f]{128}$")
MAX_EVENTS = 1000  # events in one envelope; the registry sends a handful


class EventError(Exception):
    """A request the service refuses: ``status`` is the HTTP status, ``reason`` one sentence for the sender."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Push:
    """One pushed image: where, and as which digest and/or tag.

    ``stamp`` tells pushes of the same tag apart when there is no digest (the time the sender gives its event),
    so that a redelivered notification collapses with the first while a new push of the tag does not.
    """

    repository: str
    digest: str | None
    tag: str | None
    media_type: str | None = None
    event_id: str | None = None
    stamp: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Skipped:
    """An event the service does not act on (not a push of an image), or an invalid one, with why."""

    what: str
    reason: str


@dataclass(frozen=True)
class Delivery:
    """What one request carried."""

    pushes: tuple[Push, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    invalid: tuple[Skipped, ...] = ()
    pong: bool = False  # a sender's test ping
    extra: Mapping[str, Any] = field(default_factory=dict)


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lower-cased, without parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventError(400, f"the body is not valid JSON ({exc.__class__.__name__}: {exc}).") from None
    except RecursionError:
        raise EventError(400, "the body is not valid JSON (nested too deeply).") from None


def _object(body: bytes, what: str) -> dict[str, Any]:
    data = _load(body)
    if not isinstance(data, dict):
        raise EventError(400, f"the body is not a JSON object, as a {what} is.")
    return data


def _require_json(content_type: str | None, what: str) -> None:
    kind = media_type(content_type)
    if kind != JSON:
        raise EventError(415, f"a {what} must be sent as {JSON}, not {kind or 'no media type'}.")


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def check_push(repository: Any, digest: Any, tag: Any, what: str) -> tuple[str, str | None, str | None]:
    """Validate the names of a push; raise ValueError with the reason."""
    repo = _str(repository)
    if repo is None:
        raise ValueError(f"{what} names no repository")
    if not _REPO_RE.match(repo) or len(repo) > 255:
        raise ValueError(f"{what} names an invalid repository {repo[:100]!r}")
    dig = _str(digest)
    tg = _str(tag)
    if dig is None and tg is None:
        raise ValueError(f"{what} for {repo} has neither a digest nor a tag")
    if dig is not None and not _DIGEST_RE.match(dig):
        raise ValueError(f"{what} for {repo} has a malformed digest {dig[:80]!r}")
    if tg is not None and not _TAG_RE.match(tg):
        raise ValueError(f"{what} for {repo} has an invalid tag {tg[:80]!r}")
    return repo, dig, tg


def parse_distribution(body: bytes, content_type: str | None) -> Delivery:
    """A distribution registry notification envelope: ``{"events": [...]}``; only manifest pushes count."""
    kind = media_type(content_type)
    if kind not in DISTRIBUTION_TYPES:
        raise EventError(415, f"a registry notification must be sent as {DISTRIBUTION_V1} or {DISTRIBUTION_V2}, "
                              f"not {kind or 'no media type'}.")
    data = _object(body, "notification envelope")
    events = data.get("events")
    if not isinstance(events, list):
        raise EventError(400, "the notification envelope has no 'events' list.")
    if len(events) > MAX_EVENTS:
        raise EventError(413, f"the envelope holds {len(events)} events, more than {MAX_EVENTS}.")
    pushes, skipped, invalid = [], [], []
    for i, event in enumerate(events):
        what = f"event {i}"
        if not isinstance(event, dict):
            invalid.append(Skipped(what, "not a JSON object"))
            continue
        event_id = _str(event.get("id"))
        what = f"event {event_id or i}"
        action = event.get("action")
        target = event.get("target")
        if not isinstance(target, dict):
            invalid.append(Skipped(what, "it has no target"))
            continue
        if action != "push":
            skipped.append(Skipped(what, f"action {action!r}, not a push"))
            continue
        mtype = _str(target.get("mediaType"))
        if mtype not in MANIFEST_TYPES:
            skipped.append(Skipped(what, f"a push of {mtype or 'something without a media type'}, not of an image "
                                         "manifest"))
            continue
        try:
            repo, digest, tag = check_push(target.get("repository"), target.get("digest"), target.get("tag"), what)
        except ValueError as exc:
            invalid.append(Skipped(what, str(exc)))
            continue
        pushes.append(Push(repo, digest, tag, mtype, event_id, _str(event.get("timestamp"))))
    return Delivery(tuple(pushes), tuple(skipped), tuple(invalid))


HARBOR_PUSH = ("PUSH_ARTIFACT", "pushImage")


def parse_harbor(body: bytes, content_type: str | None) -> Delivery:
    """A Harbor webhook (``PUSH_ARTIFACT``, or ``pushImage`` of Harbor 1.x): one push per resource."""
    _require_json(content_type, "Harbor webhook")
    data = _object(body, "Harbor webhook")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise EventError(400, "the Harbor webhook has no 'type'.")
    if kind not in HARBOR_PUSH:
        return Delivery(skipped=(Skipped("webhook", f"type {kind!r}, not a push"),))
    event_data = data.get("event_data")
    if not isinstance(event_data, dict):
        raise EventError(400, "the Harbor webhook has no 'event_data' object.")
    repo_info = event_data.get("repository")
    if not isinstance(repo_info, dict):
        raise EventError(400, "the Harbor webhook has no 'event_data.repository' object.")
    repository = _str(repo_info.get("repo_full_name"))
    if repository is None and _str(repo_info.get("namespace")) and _str(repo_info.get("name")):
        repository = f"{repo_info['namespace']}/{repo_info['name']}"
    resources = event_data.get("resources")
    if not isinstance(resources, list) or not resources:
        raise EventError(400, "the Harbor webhook has no 'event_data.resources' list.")
    stamp = str(data.get("occur_at")) if data.get("occur_at") is not None else None
    pushes, invalid = [], []
    for i, res in enumerate(resources[:MAX_EVENTS]):
        what = f"resource {i}"
        if not isinstance(res, dict):
            invalid.append(Skipped(what, "not a JSON object"))
            continue
        try:
            repo, digest, tag = check_push(repository, res.get("digest"), res.get("tag"), what)
        except ValueError as exc:
            invalid.append(Skipped(what, str(exc)))
            continue
        pushes.append(Push(repo, digest, tag, None, None, stamp))
    return Delivery(tuple(pushes), (), tuple(invalid))


GITHUB_EVENTS = ("package", "registry_package")
GITHUB_ACTIONS = ("published", "updated")


def parse_github(body: bytes, content_type: str | None, event: str | None) -> Delivery:
    """A GitHub ``package`` (or ``registry_package``) event for a container image; ``ping`` is answered."""
    kind = media_type(content_type)
    if kind == "application/x-www-form-urlencoded":
        raise EventError(415, "the GitHub webhook sends form data; set its content type to application/json.")
    _require_json(content_type, "GitHub webhook")
    data = _object(body, "GitHub webhook")
    if event == "ping":
        return Delivery(pong=True)
    if event not in GITHUB_EVENTS:
        if not event:
            raise EventError(400, "the GitHub webhook has no X-GitHub-Event header.")
        return Delivery(skipped=(Skipped("webhook", f"GitHub event {event!r}, not a package event"),))
    action = data.get("action")
    if action not in GITHUB_ACTIONS:
        return Delivery(skipped=(Skipped("webhook", f"package action {action!r}, not a publication"),))
    package = data.get(event) or data.get("package") or data.get("registry_package")
    if not isinstance(package, dict):
        raise EventError(400, f"the GitHub {event} event has no '{event}' object.")
    ptype = str(package.get("package_type") or "").lower()
    if ptype not in ("container", "docker"):
        return Delivery(skipped=(Skipped("webhook", f"a {ptype or 'typeless'} package, not a container image"),))
    name = _str(package.get("name"))
    owner = _dict(package.get("owner"))
    namespace = _str(package.get("namespace")) or _str(owner.get("login"))
    if name is None or namespace is None:
        raise EventError(400, "the GitHub package event names no package or owner.")
    version = package.get("package_version")
    if not isinstance(version, dict):
        raise EventError(400, "the GitHub package event has no 'package_version' object.")
    tag_info = _dict(_dict(version.get("container_metadata")).get("tag"))
    digest = _str(tag_info.get("digest")) or _str(version.get("version")) or _str(version.get("name"))
    if digest is not None and not digest.startswith("sha"):
        digest = None  # a version name, not a digest
    tag = _str(tag_info.get("name"))
    repository = f"{namespace}/{name}".lower()
    try:
        repo, dig, tg = check_push(repository, digest, tag, "package event")
    except ValueError as exc:
        return Delivery(invalid=(Skipped("package event", str(exc)),))
    stamp = _str(version.get("updated_at")) or _str(version.get("created_at"))
    return Delivery((Push(repo, dig, tg, None, _str(str(version.get("id") or "")), stamp),))


def parse_dockerhub(body: bytes, content_type: str | None) -> Delivery:
    """A Docker Hub webhook: a tag was pushed (Docker Hub sends no digest; it is resolved at conversion)."""
    _require_json(content_type, "Docker Hub webhook")
    data = _object(body, "Docker Hub webhook")
    push = data.get("push_data")
    repo = data.get("repository")
    if not isinstance(push, dict) or not isinstance(repo, dict):
        raise EventError(400, "the Docker Hub webhook has no 'push_data' and 'repository' objects.")
    name = _str(repo.get("repo_name"))
    if name is not None and "/" not in name:
        name = f"library/{name}"
    try:
        repository, digest, tag = check_push(name, None, push.get("tag"), "webhook")
    except ValueError as exc:
        return Delivery(invalid=(Skipped("webhook", str(exc)),))
    stamp = push.get("pushed_at")
    return Delivery((Push(repository, digest, tag, None, None, str(stamp) if stamp is not None else None),),
                    extra={"callback_url": _str(data.get("callback_url"))})


def parse(kind: str, body: bytes, headers: Mapping[str, str]) -> Delivery:
    """Parse a body sent by a source of ``kind`` (``distribution``, ``harbor``, ``github``, ``dockerhub``)."""
    content_type = headers.get("Content-Type")
    if kind == "distribution":
        return parse_distribution(body, content_type)
    if kind == "harbor":
        return parse_harbor(body, content_type)
    if kind == "github":
        return parse_github(body, content_type, headers.get("X-GitHub-Event"))
    if kind == "dockerhub":
        return parse_dockerhub(body, content_type)
    raise ValueError(f"unknown source kind {kind!r}")
