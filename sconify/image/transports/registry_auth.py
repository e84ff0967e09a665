"""Registry credentials and the distribution auth handshake: docker config files, credential helpers,
Basic and Bearer challenges, and bearer tokens cached per scope."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from oras.utils import iter_localhosts

from sconify.errors import AuthError, DestinationError, NetworkError, NotFoundError, UsageError

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io", "docker.io")
HELPER_TIMEOUT = 30.0
TOKEN_TIMEOUT = (10.0, 60.0)
# The token spec says a token without ``expires_in`` lives 60 seconds; renew a little before the end.
DEFAULT_TOKEN_LIFETIME = 60
RENEW_MARGIN = 10.0
CLIENT_ID = "sconify"


@dataclass(frozen=True)
class Credentials:
    """A registry account: user name and password, or a refresh token (docker's ``identitytoken``)."""

    username: str
    password: str = field(default="", repr=False)
    identity_token: str | None = field(default=None, repr=False)
    origin: str = ""  # where they came from, for error messages

    @property
    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header for these credentials."""
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: Mapping[str, str]


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*(?:,|$)')


def parse_challenges(header: str | None) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` header, which may hold several challenges (RFC 7235)."""
    out: list[Challenge] = []
    if not header:
        return out
    pos = 0
    while pos < len(header):
        m = _SCHEME_RE.match(header, pos)
        if m is None:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while (p := _PARAM_RE.match(header, pos)) is not None:
            quoted, bare = p.group(2), p.group(3)
            params[p.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            pos = p.end()
        out.append(Challenge(scheme, params))
    return out


def docker_config_path(authfile: str | None) -> Path | None:
    """The docker config file to read credentials from: ``authfile``, ``$DOCKER_CONFIG/config.json`` or
    ``~/.docker/config.json``; None when there is none."""
    if authfile:
        path = Path(authfile).expanduser()
        if not path.is_file():
            raise NotFoundError(f"the auth file {authfile!r} does not exist; give the path of a docker config.json.")
        return path
    env = os.environ.get("DOCKER_CONFIG")
    candidates = [Path(env) / "config.json"] if env else []
    candidates.append(Path.home() / ".docker" / "config.json")
    for path in candidates:
        if path.is_file():
            return path
    return None


def _host_of_key(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port``: how docker config keys name a registry."""
    key = re.sub(r"^[a-z]+://", "", key.strip())
    return key.split("/", 1)[0]


def _lookup_names(registry: str) -> list[str]:
    names = list(DOCKER_HUB_KEYS) if registry in DOCKER_HUB_KEYS else []
    # oras-py's helper: localhost and 127.0.0.1 name the same registry in config files.
    names += [n for n in iter_localhosts(registry) if n not in names]
    return names


def parse_creds(text: str) -> Credentials:
    """``USER:PASSWORD`` as given to ``--creds``."""
    username, colon, password = text.partition(":")
    if not username or not colon:
        raise UsageError("--creds takes USER:PASSWORD (both parts, separated by a colon).")
    return Credentials(username, password, origin="--creds")


def _from_helper(helper: str, server: str) -> Credentials | None:
    """Ask ``docker-credential-HELPER get`` for the credentials of ``server``; None if it has none."""
    exe = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [exe, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT, check=False
        )
    except FileNotFoundError:
        log.warning("the docker config names credential helper %s, which is not installed; ignoring it", exe)
        return None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {exe} did not answer within {HELPER_TIMEOUT:.0f} s; "
                        "fix it or pass --creds.") from None
    if proc.returncode != 0:
        message = (proc.stdout or proc.stderr).decode(errors="replace").strip()
        if "not found" not in message.lower():
            log.warning("credential helper %s failed for %s: %s", exe, server, message[:200])
        return None
    try:
        answer = json.loads(proc.stdout)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError):
        raise AuthError(f"credential helper {exe} gave an answer that is not credentials JSON; "
                        "fix it or pass --creds.") from None
    origin = f"credential helper {exe}"
    if username == "<token>":  # docker's convention for an identity (refresh) token
        return Credentials("", identity_token=secret, origin=origin)
    return Credentials(username, secret, origin=origin)


def _from_entry(entry: Any, origin: str) -> Credentials | None:
    if not isinstance(entry, Mapping):
        return None
    username, password = str(entry.get("username") or ""), str(entry.get("password") or "")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=False).decode()
        except (ValueError, UnicodeDecodeError):
            raise AuthError(f"the 'auth' entry in {origin} is not base64 of USER:PASSWORD; "
                            "log in again with docker login.") from None
        username, _, password = decoded.partition(":")
    token = entry.get("identitytoken") or None
    if not username and not password and not token:
        return None
    return Credentials(username, password, str(token) if token else None, origin)


def find_credentials(registry: str, creds: str | None = None, authfile: str | None = None) -> Credentials | None:
    """The credentials for ``registry``: ``--creds``, else the docker config (credential helpers first,
    then ``auths``); None when there are none."""
    if creds:
        return parse_creds(creds)
    path = docker_config_path(authfile)
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AuthError(f"cannot read the docker config {str(path)!r} ({exc}); fix it or pass --creds.") from None
    if not isinstance(config, Mapping):
        raise AuthError(f"the docker config {str(path)!r} is not a JSON object; fix it or pass --creds.")
    names = _lookup_names(registry)
    helpers = config.get("credHelpers") or {}
    auths = {_host_of_key(k): v for k, v in (config.get("auths") or {}).items()}
    for name in names:
        helper = helpers.get(name) if isinstance(helpers, Mapping) else None
        if helper:
            return _from_helper(str(helper), name)
    if config.get("credsStore"):
        server = "https://index.docker.io/v1/" if registry in DOCKER_HUB_KEYS else registry
        found = _from_helper(str(config["credsStore"]), server)
        if found is not None:
            return found
    for name in names:
        found = _from_entry(auths.get(_host_of_key(name)), f"{path}")
        if found is not None:
            return found
    return None


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic() deadline


class Authenticator:
    """The auth state of one client of one registry: the last challenge, the credentials (read once, when a
    challenge first needs them) and bearer tokens cached per scope set. Thread-safe."""

    def __init__(
        self,
        registry: str,
        session: requests.Session,
        load_credentials: Callable[[], Credentials | None],
        verify: Callable[[], Any],
    ) -> None:
        self.registry = registry
        self._session = session
        self._load = load_credentials
        self._verify = verify
        self._credentials: Credentials | None = None
        self._loaded = False
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._lock = threading.RLock()
        self.token_requests = 0  # for diagnostics and tests

    @property
    def credentials(self) -> Credentials | None:
        with self._lock:
            if not self._loaded:
                self._credentials = self._load()
                self._loaded = True
                if self._credentials is not None:
                    log.debug("credentials for %s from %s", self.registry, self._credentials.origin)
            return self._credentials

    def learn(self, header: str | None) -> bool:
        """Record the challenge of a 401 answer; True when it names a scheme we can answer."""
        challenges = {c.scheme: c for c in parse_challenges(header)}
        chosen = challenges.get("bearer") or challenges.get("basic")
        with self._lock:
            if chosen is None:
                return False
            self._challenge = chosen
            return True

    def authorization(self, scopes: tuple[str, ...]) -> str | None:
        """The ``Authorization`` header value for a request that needs ``scopes``, or None (anonymous)."""
        with self._lock:
            challenge = self._challenge
            if challenge is None:
                return None
            if challenge.scheme == "basic":
                creds = self.credentials
                return creds.basic if creds is not None and not creds.identity_token else None
            key = tuple(sorted(set(scopes)))
            token = self._tokens.get(key)
            if token is None or token.expires - time.monotonic() < RENEW_MARGIN:
                token = self._fetch_token(challenge, key)
                self._tokens[key] = token
            return f"Bearer {token.value}"

    def forget(self, scopes: tuple[str, ...]) -> None:
        """Drop the token for ``scopes`` (the registry refused it: expired or revoked)."""
        with self._lock:
            self._tokens.pop(tuple(sorted(set(scopes))), None)

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> _Token:
        realm = challenge.params.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise AuthError(f"registry {self.registry} asks for a bearer token but names no usable token server "
                            f"(realm {realm!r}); it is misconfigured.")
        wanted = list(scopes)
        if challenge.params.get("scope"):
            wanted += [s for s in challenge.params["scope"].split(" ") if s and s not in wanted]
        service = challenge.params.get("service")
        creds = self.credentials
        started = time.monotonic()
        self.token_requests += 1
        try:
            if creds is not None and creds.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token, "client_id": CLIENT_ID,
                        "scope": " ".join(wanted)}
                if service:
                    form["service"] = service
                resp = self._session.post(realm, data=form, timeout=TOKEN_TIMEOUT, verify=self._verify())
            else:
                params: list[tuple[str, str]] = [("service", service)] if service else []
                params += [("scope", s) for s in wanted]
                headers = {}
                if creds is not None:
                    params.append(("account", creds.username))
                    headers["Authorization"] = creds.basic
                resp = self._session.get(realm, params=params, headers=headers, timeout=TOKEN_TIMEOUT,
                                         verify=self._verify())
        except requests.RequestException as exc:
            raise NetworkError(f"cannot reach the token server {realm} of registry {self.registry} "
                               f"({_reason(exc)}); check the network.") from None
        with resp:
            if resp.status_code in (401, 403):
                raise self.refused_credentials()
            if resp.status_code != 200:
                raise NetworkError(f"the token server {realm} of registry {self.registry} answered HTTP "
                                   f"{resp.status_code} ({error_summary(resp)}).")
            try:
                body = resp.json()
                value = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                value, body = None, {}
        if not isinstance(value, str) or not value:
            raise AuthError(f"the token server {realm} of registry {self.registry} returned no token; "
                            "it is misconfigured.")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        log.debug("token for %s scopes %s, valid %s s", self.registry, wanted, lifetime)
        return _Token(value, started + float(lifetime))

    def refused_credentials(self) -> AuthError:
        creds = self.credentials
        if creds is None:
            return AuthError(f"registry {self.registry} requires credentials; pass them with --creds USER:PASSWORD "
                             f"(--src-creds/--dest-creds for copy) or run docker login {self.registry}.")
        who = f"user {creds.username!r}" if creds.username else "the identity token"
        return AuthError(f"registry {self.registry} refused the credentials of {who} (from {creds.origin}); "
                         f"check them, pass others with --creds USER:PASSWORD or run docker login {self.registry}.")

    def denied(self, repository: str, push: bool) -> AuthError | DestinationError:
        """The error for a request that was refused although we answered the challenge."""
        creds = self.credentials
        if creds is None or self._challenge is None or self._challenge.scheme == "basic":
            return self.refused_credentials()
        who = f"user {creds.username!r}" if creds.username else "the identity token"
        if push:
            return DestinationError(f"registry {self.registry} denied {who} push access to {repository}; "
                                    "ask for push rights or choose another destination.")
        return AuthError(f"registry {self.registry} denied {who} pull access to {repository}; check the name, "
                         f"or pass other credentials with --creds or docker login {self.registry}.")


def _reason(exc: BaseException) -> str:
    """A short reason for a connection failure, without urllib3's nested reprs."""
    text = str(exc)
    for needle, short in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host name"),
        ("Temporary failure in name resolution", "host name does not resolve"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
        ("CERTIFICATE_VERIFY_FAILED", "certificate verification failed"),
        ("WRONG_VERSION_NUMBER", "the server does not speak TLS"),
    ):
        if needle in text:
            return short
    return text[:160]


def error_summary(resp: requests.Response, limit: int = 200) -> str:
    """The registry's own error JSON (``CODE: message``) briefly, or the start of the body."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping) and isinstance(body.get("errors"), list):
        parts = []
        for err in body["errors"][:3]:
            if isinstance(err, Mapping):
                code, message = err.get("code"), err.get("message")
                parts.append(": ".join(str(x) for x in (code, message) if x))
        if parts:
            return "; ".join(parts)[:limit]
    text = (resp.text or "").strip().replace("\n", " ")
    return text[:limit] or (resp.reason or "no details")

