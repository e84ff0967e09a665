"""``service.yaml``: its JSON Schema, and the validated, typed ``ServiceConfig`` the service runs from.

Relative paths in the file are taken relative to the file's directory. Credentials (the ``Authorization``
value a registry sends, the HMAC or URL secret of a webhook) are given inline, or better from a file
(``*_file``) or an environment variable (``*_env``), so that the config itself can be world-readable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sconify.errors import UsageError
from sconify.image.reference import parse_reference
from sconify.image.transports import TransportOptions

SOURCE_KINDS = ("distribution", "harbor", "github", "dockerhub")
# The credential each kind of source proves itself with.
HEADER_KINDS = ("distribution", "harbor")  # a static Authorization header
HMAC_KINDS = ("github",)  # HMAC-SHA256 of the body in X-Hub-Signature-256
URL_KINDS = ("dockerhub",)  # a secret in the URL path

DEFAULT_LISTEN = "127.0.0.1:8870"
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_LEASE = 60.0
DEFAULT_WORKERS = 2

# Route options: the names of ``sconify convert``'s flags (underscores or dashes).
OPTION_NAMES = (
    "encrypt", "authenticate", "plain", "heap", "stack", "threads", "dlopen", "allow_debug", "env", "command",
    "name", "namespace", "service", "cas", "las", "runtime", "chunk_size", "layer_compression",
)

_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"}
_PATH = {"type": "string", "minLength": 1}
_STRINGS = {"oneOf": [{"type": "string", "minLength": 1},
                      {"type": "array", "items": {"type": "string", "minLength": 1}}]}
_SIZE = {"oneOf": [{"type": "integer", "minimum": 4096}, {"type": "string", "minLength": 1}]}
_TRANSPORT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "creds": {"type": "string", "description": "USER:PASSWORD for the registry"},
        "authfile": _PATH,
        "tls_verify": {"type": "boolean"},
        "cert_dir": _PATH,
    },
}
_SECRET_KEYS = {
    "authorization": {"type": "string", "minLength": 1},
    "authorization_file": _PATH,
    "authorization_env": {"type": "string", "minLength": 1},
    "secret": {"type": "string", "minLength": 1},
    "secret_file": _PATH,
    "secret_env": {"type": "string", "minLength": 1},
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sconify service configuration",
    "type": "object",
    "additionalProperties": False,
    "required": ["sources", "routes"],
    "properties": {
        "listen": {"type": "string", "description": "HOST:PORT to listen on", "pattern": r"^.+:[0-9]{1,5}$"},
        "state_dir": {**_PATH, "description": "where the store, policies and cache live by default"},
        "store": {**_PATH, "description": "the SQLite job store (default: STATE_DIR/jobs.sqlite)"},
        "policy_dir": {**_PATH, "description": "policies, one 0700 directory per conversion"},
        "cache": {"oneOf": [_PATH, {"type": "boolean"}], "description": "per-layer cache dir, or false"},
        "broker": {"type": "string", "pattern": r"^rediss?://", "description": "Celery broker (Redis)"},
        "workers": {"type": "integer", "minimum": 0, "maximum": 64},
        "max_body": {"type": "integer", "minimum": 1024, "maximum": 64 << 20},
        "lease_seconds": {"type": "number", "minimum": 1},
        "api_token": {"type": "string", "minLength": 8},
        "api_token_file": _PATH,
        "api_token_env": {"type": "string", "minLength": 1},
        "retry": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "attempts": {"type": "integer", "minimum": 1, "maximum": 100},
                "backoff": {"type": "number", "minimum": 0},
                "max_backoff": {"type": "number", "minimum": 0},
            },
        },
        "cas": {
            "type": "object",
            "additionalProperties": False,
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "pattern": r"^https://"},
                "cert": _PATH,
                "key": _PATH,
                "ca": _PATH,
                "timeout": {"type": "number", "minimum": 0.1},
            },
        },
        "destination": _TRANSPORT,
        "sources": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": _NAME,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "registry"],
                "properties": {
                    "type": {"enum": list(SOURCE_KINDS)},
                    "registry": {"type": "string", "minLength": 1,
                                 "description": "HOST[:PORT] the pushed images are pulled from"},
                    **_SECRET_KEYS,
                    "pull": _TRANSPORT,
                },
            },
        },
        "routes": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["match", "destination"],
                "properties": {
                    "name": _NAME,
                    "match": {"type": "string", "minLength": 1},
                    "destination": {"type": "string", "minLength": 1},
                    "sources": {"type": "array", "items": _NAME},
                    "tag": {"type": "string", "minLength": 1},
                    "untagged_tag": {"type": "string", "minLength": 1},
                    "platform": {"type": "string"},
                    "rules": {"type": "array", "items": _PATH},
                    "secrets": _PATH,
                    "inject": _PATH,
                    "keys": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"fspf": _PATH, "enclave": _PATH, "sign": _PATH},
                    },
                    "options": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "encrypt": _STRINGS, "authenticate": _STRINGS, "plain": _STRINGS,
                            "heap": _SIZE, "stack": _SIZE, "threads": {"type": "integer", "minimum": 1},
                            "dlopen": {"enum": ["off", "protected", "unprotected"]},
                            "allow_debug": {"type": "boolean"},
                            "env": {"oneOf": [{"type": "array", "items": {"type": "string", "pattern": "="}},
                                              {"type": "object", "additionalProperties": {"type": "string"}}]},
                            "command": _STRINGS,
                            "name": {"type": "string"}, "namespace": {"type": "string"},
                            "service": {"type": "string"}, "cas": {"type": "string"}, "las": {"type": "string"},
                            "runtime": {"type": "string"},
                            "chunk_size": {"type": "integer", "minimum": 4096},
                            "layer_compression": {"enum": ["auto", "gzip", "none"]},
                        },
                    },
                },
            },
        },
    },
}

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
_TEMPLATE_FIELDS = ("tag", "digest", "digest_hex", "digest_short", "repository", "name")


@dataclass(frozen=True)
class Pull:
    """How images are read from or written to a registry (credentials, TLS)."""

    creds: str | None = field(default=None, repr=False)
    authfile: str | None = None
    tls_verify: bool | None = None
    cert_dir: str | None = None

    def transport(self) -> TransportOptions:
        return TransportOptions(creds=self.creds, authfile=self.authfile, tls_verify=self.tls_verify,
                                cert_dir=self.cert_dir)


@dataclass(frozen=True)
class Source:
    """One sender of events: its kind, the registry its images live in, and the credential it must show."""

    name: str
    kind: str
    registry: str
    credential: str = field(repr=False)
    pull: Pull = Pull()


@dataclass(frozen=True)
class RouteConfig:
    """One routing rule as written in the file (compiled by ``sconify.service.routes``)."""

    name: str
    match: str
    destination: str
    sources: tuple[str, ...] = ()
    tag: str = "{tag}"
    untagged_tag: str | None = None  # None: pushes by digest only are acknowledged and skipped
    platform: str | None = None
    rules: tuple[str, ...] = ()
    secrets: str | None = None
    inject: str | None = None
    fspf_key: str | None = None
    enclave_key: str | None = None
    sign_key: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Retry:
    """How often and how late a failed conversion is tried again (exponential backoff, capped)."""

    attempts: int = 5
    backoff: float = 10.0
    max_backoff: float = 600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th failure (1-based)."""
        return min(self.max_backoff, self.backoff * (2 ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Cas:
    """A CAS to upload each policy to: ``POST {url}/v1/sessions`` over TLS with a client certificate."""

    url: str
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``sconify serve`` runs from, validated."""

    host: str
    port: int
    state_dir: Path
    store: Path
    policy_dir: Path
    cache_dir: Path | None
    sources: Mapping[str, Source]
    routes: tuple[RouteConfig, ...]
    broker: str | None = None
    workers: int = DEFAULT_WORKERS
    max_body: int = DEFAULT_MAX_BODY
    lease_seconds: float = DEFAULT_LEASE
    retry: Retry = Retry()
    cas: Cas | None = None
    destination: Pull = Pull()
    api_token: str | None = field(default=None, repr=False)  # required as a Bearer token by GET /jobs
    path: Path | None = None

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    if error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)' was unexpected", error.message)
        allowed = sorted((error.schema.get("properties") or {}).keys())
        names = ", ".join(repr(e) for e in extra) or "a key"
        return f"{where}: {names} is not a known key here (known: {', '.join(allowed)})"
    if error.validator == "enum":
        return f"{where}: {error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "pattern":
        return f"{where}: {error.instance!r} does not have the required form"
    if error.validator == "oneOf":
        return f"{where}: {error.instance!r} has the wrong type or form"
    return f"{where}: {error.message}"


def validate(data: Any, what: str) -> None:
    """Raise UsageError naming every schema violation of ``data``."""
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = "; ".join(_describe(e) for e in errors[:8])
        more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
        raise UsageError(f"{what} is not a valid service configuration: {lines}{more}.")


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else base / path)


def _credential(name: str, kind: str, raw: Mapping[str, Any], base: Path) -> str:
    """The credential of source ``name``: inline, from a file, or from an environment variable."""
    stem = "authorization" if kind in HEADER_KINDS else "secret"
    other = "secret" if stem == "authorization" else "authorization"
    if any(k.startswith(other) for k in raw):
        raise UsageError(f"sources/{name}: a {kind} source proves itself with '{stem}' (or {stem}_file, "
                         f"{stem}_env), not '{other}'.")
    given = [k for k in (stem, f"{stem}_file", f"{stem}_env") if k in raw]
    if len(given) != 1:
        raise UsageError(f"sources/{name}: give exactly one of {stem}, {stem}_file or {stem}_env; every source "
                         "must authenticate its events.")
    return _secret_value(f"sources/{name}", stem, given[0], raw, base)


def _secret_value(where: str, stem: str, key: str, raw: Mapping[str, Any], base: Path) -> str:
    if key == stem:
        value = str(raw[key])
    elif key.endswith("_file"):
        path = Path(_resolve(base, raw[key]) or "")
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise UsageError(f"{where}: cannot read {key} {str(path)!r} ({exc.strerror}).") from None
    else:
        env = str(raw[key])
        value = os.environ.get(env, "")
        if not value:
            raise UsageError(f"{where}: the environment variable {env} named by {key} is unset or empty.")
    if len(value) < 8:
        raise UsageError(f"{where}: the {stem} is shorter than 8 characters; use a long random value.")
    return value


def _pull(raw: Mapping[str, Any] | None, base: Path) -> Pull:
    raw = raw or {}
    return Pull(creds=raw.get("creds"), authfile=_resolve(base, raw.get("authfile")),
                tls_verify=raw.get("tls_verify"), cert_dir=_resolve(base, raw.get("cert_dir")))


def _check_template(text: str, where: str) -> None:
    for name in re.findall(r"\{([^{}]*)\}", text):
        if name not in _TEMPLATE_FIELDS:
            raise UsageError(f"{where}: unknown field {{{name}}} in {text!r} (known: "
                             f"{', '.join('{' + f + '}' for f in _TEMPLATE_FIELDS)}).")


def _route(i: int, raw: Mapping[str, Any], base: Path, sources: Mapping[str, Source]) -> RouteConfig:
    name = str(raw.get("name") or f"route-{i}")
    where = f"routes/{i}"
    for src in raw.get("sources") or ():
        if src not in sources:
            raise UsageError(f"{where}: source {src!r} is not defined under 'sources' (defined: "
                             f"{', '.join(sorted(sources))}).")
    tag = str(raw.get("tag", "{tag}"))
    _check_template(tag, f"{where}/tag")
    untagged = raw.get("untagged_tag")
    if untagged is not None:
        _check_template(str(untagged), f"{where}/untagged_tag")
        if "{tag}" in str(untagged):
            raise UsageError(f"{where}/untagged_tag: {{tag}} is empty for pushes by digest; use {{digest_hex}} "
                             "or {digest_short}.")
    keys = raw.get("keys") or {}
    route = RouteConfig(
        name=name,
        match=str(raw["match"]),
        destination=str(raw["destination"]),
        sources=tuple(raw.get("sources") or ()),
        tag=tag,
        untagged_tag=str(untagged) if untagged is not None else None,
        platform=raw.get("platform"),
        rules=tuple(_resolve(base, r) or "" for r in raw.get("rules") or ()),
        secrets=_resolve(base, raw.get("secrets")),
        inject=_resolve(base, raw.get("inject")),
        fspf_key=_resolve(base, keys.get("fspf")),
        enclave_key=_resolve(base, keys.get("enclave")),
        sign_key=_resolve(base, keys.get("sign")),
        options=dict(raw.get("options") or {}),
    )
    from sconify.service.routes import compile_route  # checks the patterns and the destination

    compile_route(route)
    return route


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a pair."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise UsageError(f"listen address {text!r} is not HOST:PORT.")
    return host.strip("[]"), int(port)


def config_from_mapping(data: Any, base: Path, what: str = "the service configuration") -> ServiceConfig:
    """Validate a parsed ``service.yaml`` and build the ``ServiceConfig``; paths are relative to ``base``."""
    validate(data, what)
    state_dir = Path(_resolve(base, data.get("state_dir", "sconify-state")) or "")
    sources = {}
    for name, raw in data["sources"].items():
        registry = str(raw["registry"])
        try:
            parse_reference(f"docker://{registry}/probe/x:latest")
        except Exception:
            raise UsageError(f"sources/{name}: registry {registry!r} is not HOST[:PORT].") from None
        sources[name] = Source(name, raw["type"], registry, _credential(name, raw["type"], raw, base),
                               _pull(raw.get("pull"), base))
    routes = tuple(_route(i, r, base, sources) for i, r in enumerate(data["routes"]))
    cache = data.get("cache", True)
    cache_dir = (state_dir / "cache") if cache is True else (None if cache is False else Path(_resolve(base, cache)
                                                                                              or ""))
    retry_raw = data.get("retry") or {}
    cas = None
    if data.get("cas"):
        c = data["cas"]
        if bool(c.get("cert")) != bool(c.get("key")):
            raise UsageError("cas: give both 'cert' and 'key' (the client certificate and its private key).")
        cas = Cas(url=c["url"].rstrip("/"), cert=_resolve(base, c.get("cert")), key=_resolve(base, c.get("key")),
                  ca=_resolve(base, c.get("ca")), timeout=float(c.get("timeout", 30.0)))
    host, port = parse_listen(data.get("listen", DEFAULT_LISTEN))
    api_keys = [k for k in ("api_token", "api_token_file", "api_token_env") if k in data]
    if len(api_keys) > 1:
        raise UsageError("give at most one of api_token, api_token_file and api_token_env.")
    api_token = _secret_value("api_token", "api_token", api_keys[0], data, base) if api_keys else None
    return ServiceConfig(
        host=host,
        port=port,
        state_dir=state_dir,
        store=Path(_resolve(base, data.get("store")) or state_dir / "jobs.sqlite"),
        policy_dir=Path(_resolve(base, data.get("policy_dir")) or state_dir / "policies"),
        cache_dir=cache_dir,
        sources=sources,
        routes=routes,
        broker=data.get("broker"),
        workers=int(data.get("workers", DEFAULT_WORKERS)),
        max_body=int(data.get("max_body", DEFAULT_MAX_BODY)),
        lease_seconds=float(data.get("lease_seconds", DEFAULT_LEASE)),
        retry=Retry(attempts=int(retry_raw.get("attempts", Retry.attempts)),
                    backoff=float(retry_raw.get("backoff", Retry.backoff)),
                    max_backoff=float(retry_raw.get("max_backoff", Retry.max_backoff))),
        cas=cas,
        destination=_pull(data.get("destination"), base),
        api_token=api_token,
    )


def load_config(path: Path) -> ServiceConfig:
    """Read and validate ``service.yaml``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"service configuration {str(path)!r} does not exist; give the right --config.") from None
    except OSError as exc:
        raise UsageError(f"service configuration {str(path)!r} cannot be read ({exc.strerror}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML ({exc}).") from None
    config = config_from_mapping(data, path.absolute().parent, str(path))
    return _with_path(config, path)


def _with_path(config: ServiceConfig, path: Path) -> ServiceConfig:
    from dataclasses import replace

    return replace(config, path=path.absolute())
