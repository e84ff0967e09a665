"""Authentication of event senders, one way per kind of source, every comparison in constant time.

- distribution and Harbor: the ``Authorization`` header must equal the configured value (the registry's
  ``notifications.endpoints[].headers``, Harbor's "auth header");
- GitHub: ``X-Hub-Signature-256: sha256=<hex>`` must be the HMAC-SHA256 of the raw body under the secret;
- Docker Hub (which can send no header): the secret is the last segment of the URL path.

A check returns None when the credential is right, else a short reason that names no secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from sconify.service.config import HEADER_KINDS, HMAC_KINDS, URL_KINDS, Source


def equal(expected: str, given: str) -> bool:
    """Constant-time comparison of a configured credential with what a request shows."""
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "surrogateescape"))


def github_signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body``."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def check_header(source: Source, headers: Mapping[str, str]) -> str | None:
    """The credentials that come before the body: the Authorization header (distribution, Harbor)."""
    if source.kind not in HEADER_KINDS:
        return None
    given = headers.get("Authorization")
    if not given:
        return "no Authorization header"
    return None if equal(source.credential, given) else "wrong Authorization header"


def check_url_secret(source: Source, given: str | None) -> str | None:
    """The secret in the URL (Docker Hub)."""
    if source.kind not in URL_KINDS:
        return None if given is None else "this source takes no secret in the URL"
    if not given:
        return "no secret in the URL"
    return None if equal(source.credential, given) else "wrong secret in the URL"


def check_body(source: Source, headers: Mapping[str, str], body: bytes) -> str | None:
    """The credential computed over the body (GitHub's HMAC)."""
    if source.kind not in HMAC_KINDS:
        return None
    given = headers.get("X-Hub-Signature-256")
    if not given:
        return "no X-Hub-Signature-256 header"
    return None if equal(github_signature(source.credential, body), given.strip()) else "wrong signature"
