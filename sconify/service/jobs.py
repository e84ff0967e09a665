"""The conversion job a routed push becomes: plain data for the durable store, and its idempotency key.

The spec snapshots the route's options and key paths, so that a queued job does not change meaning when the
configuration does; registry credentials are not in it (the worker takes them from the configuration by the
source's name). The key is a hash of (source registry, repository, digest, destination): duplicates of a push
collapse into one job. A push that names only a tag is keyed by the tag and the sender's event time instead,
so that redeliveries collapse while a later push of the same tag makes a new job; its digest is resolved
when the job runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sconify.image.reference import Reference
from sconify.service.config import RouteConfig, Source
from sconify.service.events import Push
from sconify.service.routes import Route

SPEC_KIND = "sconify.service.conversion/1"


@dataclass(frozen=True)
class ServiceJob:
    """One conversion the service owes: a pushed image and where its confidential twin goes."""

    source_name: str
    registry: str
    repository: str
    tag: str | None
    digest: str | None
    destination: str
    route: str
    options: dict[str, Any] = field(default_factory=dict)
    platform: str | None = None
    rules: tuple[str, ...] = ()
    secrets: str | None = None
    inject: str | None = None
    fspf_key: str | None = None
    enclave_key: str | None = None
    sign_key: str | None = None
    event: dict[str, Any] = field(default_factory=dict)
    kind: str = SPEC_KIND

    @property
    def source(self) -> str:
        """The pushed image as a ``docker://`` reference (tag and digest as the event named them)."""
        out = f"docker://{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    def key(self) -> str:
        """The idempotency key (see the module's docstring)."""
        what = self.digest or f"tag:{self.tag}@{self.event.get('stamp') or ''}"
        text = json.dumps([SPEC_KIND, self.registry.lower(), self.repository, what, self.destination])
        return "service:" + hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rules"] = list(self.rules)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceJob:
        if data.get("kind") != SPEC_KIND:
            raise ValueError(f"not a service conversion job (kind {data.get('kind')!r})")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["rules"] = tuple(known.get("rules") or ())
        return cls(**known)


def make_job(source: Source, push: Push, route: Route, captures: tuple[str, ...]) -> ServiceJob:
    """The job for a routed push (raises UsageError when the route cannot name a destination for it)."""
    dest: Reference = route.destination(captures, push.repository, push.tag, push.digest)
    rc: RouteConfig = route.config
    return ServiceJob(
        source_name=source.name,
        registry=source.registry,
        repository=push.repository,
        tag=push.tag,
        digest=push.digest,
        destination=str(dest),
        route=rc.name,
        options=dict(rc.options),
        platform=rc.platform,
        rules=rc.rules,
        secrets=rc.secrets,
        inject=rc.inject,
        fspf_key=rc.fspf_key,
        enclave_key=rc.enclave_key,
        sign_key=rc.sign_key,
        event=push.to_json(),
    )


def policy_dir_for(base: Path, destination: Reference, source_digest: str) -> Path:
    """Where the policy of one conversion goes: ``BASE/<destination repository>/<algorithm>-<hex>`` named by the
    pushed image's digest, so that each pushed image keeps its own policy."""
    if destination.name:
        repo = f"{destination.registry}/{destination.repository}"
    else:
        repo = "oci/" + str(destination.path or "image").strip("/")
    parts = [re.sub(r"[^A-Za-z0-9_.-]+", "_", p) for p in repo.split("/") if p and p not in (".", "..")]
    return Path(base, *parts, source_digest.replace(":", "-"))
