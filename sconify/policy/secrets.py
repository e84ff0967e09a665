"""Secrets, TLS certificates and encrypted volumes of one service: parsed from the command line, emitted as the
session's ``secrets``, ``images[].injection_files``, ``volumes`` and ``images[].volumes`` (CAS session language
v0.3). Every value here is a *declaration*: the CAS generates the key, certificate or volume key; sconify never
does (docs/session.md).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sconify.errors import UsageError

SECRET_KINDS = ("ascii", "binary", "private-key", "x509", "x509-ca")
# The parameters SCONE's session language knows for each kind (the subset sconify emits); lists are marked.
_PARAMS: dict[str, dict[str, str]] = {
    "ascii": {"size": "int", "export_public": "bool"},
    "binary": {"size": "int", "export_public": "bool"},
    "private-key": {"export_public": "bool"},
    "x509": {
        "private_key": "name", "issuer": "name", "common_name": "str", "dns": "list", "ip": "list",
        "endpoint": "endpoint", "valid_for": "str", "export_public": "bool",
    },
    "x509-ca": {"private_key": "name", "issuer": "name", "common_name": "str", "valid_for": "str",
                "export_public": "bool"},
}
# What a reference ``$$SCONE::NAME.PART$$`` may select, by kind (SCONE: .crt, .key, .chain of certificates).
PARTS = {"x509": ("crt", "key", "chain"), "x509-ca": ("crt", "key", "chain"), "private-key": ("key",)}
ENCODINGS = ("hex", "base64")
MAX_SIZE = 4096
DEFAULT_CA = "ca"

_SECRET_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_VOLUME_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # also a valid PVC name suffix
_DNS_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
_IP_RE = re.compile(r"^[0-9.]+$|^[0-9A-Fa-f:]+$")
REFERENCE_RE = re.compile(r"\$\$SCONE::([A-Za-z_][A-Za-z0-9_]*)(?:\.(crt|key|chain))?(?::(hex|base64))?\$\$")
_ANY_REFERENCE_RE = re.compile(r"\$\$SCONE::(.*?)\$\$")


@dataclass(frozen=True)
class SecretSpec:
    """A secret the CAS generates: its name, kind and SCONE parameters (lists as tuples)."""

    name: str
    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for key, value in self.params:
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class TlsFiles:
    """A certificate and its key put into the enclave's file system: ``endpoint`` is ``server`` or ``client``."""

    endpoint: str
    cert_path: str
    key_path: str
    dns: tuple[str, ...] = ()
    issuer: str | None = None  # the x509-ca that signs it (default: the service's CA)
    secret: str | None = None  # the x509 secret's name (default: derived from the service)


@dataclass(frozen=True)
class VolumeMount:
    """An encrypted volume mounted at ``path``; the CAS generates its key."""

    name: str
    path: str


@dataclass(frozen=True)
class ServiceSecrets:
    """Everything of one service beyond command and environment that the session declares."""

    secrets: tuple[SecretSpec, ...] = ()
    tls: tuple[TlsFiles, ...] = ()
    ca_files: tuple[tuple[str, str], ...] = ()  # (path in the enclave, x509-ca secret whose certificate goes there)
    volumes: tuple[VolumeMount, ...] = ()
    ca: str = DEFAULT_CA  # the application's CA: issues the certificates unless a TlsFiles names another
    ca_common_name: str | None = None
    declare_ca: bool = True  # False when another part of the application declares the CA
    external: tuple[tuple[str, str], ...] = ()  # (name, kind) of secrets the application declares elsewhere

    def __bool__(self) -> bool:
        return bool(self.secrets or self.tls or self.ca_files or self.volumes)

    def uses_ca(self) -> bool:
        return bool(self.tls or self.ca_files)

    def session_secrets(self, service: str) -> list[dict[str, Any]]:
        """The ``secrets`` entries: the CA (when used and declared here), each TLS key and certificate, then the
        user's own secrets."""
        out: list[dict[str, Any]] = []
        if self.uses_ca() and self.declare_ca and not any(s.name == self.ca for s in self.secrets):
            out.append(
                SecretSpec(self.ca, "x509-ca", (("common_name", self.ca_common_name or f"{service} CA"),)).to_json()
            )
        for tls in self.tls:
            name = tls.secret or tls_secret_name(service, tls.endpoint)
            out.append(SecretSpec(f"{name}_key", "private-key").to_json())
            params: list[tuple[str, Any]] = [
                ("private_key", f"{name}_key"),
                ("issuer", tls.issuer or self.ca),
                ("common_name", tls.dns[0] if tls.dns else service),
            ]
            if tls.dns:
                params.append(("dns", tls.dns))
            params.append(("endpoint", tls.endpoint))
            out.append(SecretSpec(name, "x509", tuple(params)).to_json())
        out.extend(s.to_json() for s in self.secrets)
        return out

    def injection_files(self, service: str) -> list[dict[str, str]]:
        """The ``images[].injection_files``: certificates, keys and CA certificates at their paths."""
        out: list[dict[str, str]] = []
        for tls in self.tls:
            name = tls.secret or tls_secret_name(service, tls.endpoint)
            out.append({"path": tls.cert_path, "content": f"$$SCONE::{name}.crt$$"})
            out.append({"path": tls.key_path, "content": f"$$SCONE::{name}.key$$"})
        for path, ca in self.ca_files:
            out.append({"path": path, "content": f"$$SCONE::{ca}.crt$$"})
        return out

    def session_volumes(self) -> list[dict[str, Any]]:
        """The session's ``volumes``: names only; the CAS creates each volume's key on first use."""
        return [{"name": v.name} for v in self.volumes]

    def image_volumes(self) -> list[dict[str, str]]:
        return [{"name": v.name, "path": v.path} for v in self.volumes]

    def secret_names(self, service: str) -> set[str]:
        return {s["name"] for s in self.session_secrets(service)}


def tls_secret_name(service: str, endpoint: str) -> str:
    """The x509 secret of a service's server or client certificate (a valid secret name)."""
    return f"{secret_stem(service)}_{endpoint}"


def secret_stem(text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return stem if stem[:1].isalpha() or stem[:1] == "_" else f"s_{stem}"


# -- parsing the command line ----------------------------------------------------------------------------------


def _enclave_path(value: str, option: str) -> str:
    if not value or "\0" in value or not value.startswith("/"):
        raise UsageError(f"{option}: {value!r} is not an absolute path in the enclave's file system; give /path.")
    norm = posixpath.normpath(value)
    if norm == "/" or norm.startswith("/.sconify") or ".." in norm.split("/"):
        raise UsageError(f"{option}: {value!r} cannot hold a file; give a path such as /etc/tls/server.crt.")
    return norm


def parse_tls(value: str, endpoint: str) -> TlsFiles:
    """``PATH_CERT,PATH_KEY[,san=dns:NAME,...]`` of ``--tls-server`` or ``--tls-client``."""
    option = f"--tls-{endpoint}"
    parts = [p.strip() for p in value.split(",")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UsageError(f"{option} {value!r} is not PATH_CERT,PATH_KEY[,san=dns:NAME,...].")
    cert, key = _enclave_path(parts[0], option), _enclave_path(parts[1], option)
    if cert == key:
        raise UsageError(f"{option} {value!r} puts the certificate and the key at the same path; give two paths.")
    dns: list[str] = []
    for extra in parts[2:]:
        kind, _, name = extra.partition("=")[2].partition(":")
        if not extra.startswith("san=") or kind != "dns" or not name:
            raise UsageError(f"{option}: {extra!r} is not san=dns:NAME (the only extra the option takes).")
        if endpoint != "server":
            raise UsageError(f"{option}: a client certificate takes no san=; give it on --tls-server.")
        if not _DNS_RE.match(name):
            raise UsageError(f"{option}: {name!r} is not a DNS name.")
        dns.append(name)
    return TlsFiles(endpoint, cert, key, tuple(dns))


def parse_volume(value: str) -> VolumeMount:
    """``NAME:/path`` of ``--volume``."""
    name, sep, path = value.partition(":")
    if not sep:
        raise UsageError(f"--volume {value!r} is not NAME:/path.")
    if not _VOLUME_NAME_RE.match(name):
        raise UsageError(
            f"--volume: {name!r} is not a volume name (lower-case letters, digits and '-', at most 63)."
        )
    return VolumeMount(name, _enclave_path(path, "--volume"))


def _param(kind: str, name: str, key: str, raw: str) -> Any:
    typ = _PARAMS[kind].get(key)
    where = f"--secret {name}"
    if typ is None:
        known = ", ".join(sorted(_PARAMS[kind])) or "none"
        raise UsageError(f"{where}: a {kind} secret takes no parameter {key!r} (it takes: {known}).")
    if typ == "int":
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_SIZE:
            raise UsageError(f"{where}: {key}={raw!r} must be a whole number of bytes from 1 to {MAX_SIZE}.")
        return int(raw)
    if typ == "bool":
        if raw not in ("true", "false"):
            raise UsageError(f"{where}: {key}={raw!r} must be true or false.")
        return raw == "true"
    if typ == "name":
        return check_secret_name(raw, f"{where}: {key}")
    if typ == "endpoint":
        if raw not in ("server", "client"):
            raise UsageError(f"{where}: endpoint={raw!r} must be server or client.")
        return raw
    if typ == "list":
        items = tuple(i for i in raw.split(";") if i)
        check = _DNS_RE if key == "dns" else _IP_RE
        for item in items:
            if not check.match(item):
                raise UsageError(f"{where}: {item!r} is not a valid {key} entry.")
        return items
    if not raw:
        raise UsageError(f"{where}: {key} is empty.")
    return raw


def check_secret_name(value: str, what: str) -> str:
    if not _SECRET_NAME_RE.match(value):
        raise UsageError(
            f"{what} {value!r} is not a secret name (a letter or '_', then letters, digits or '_'; at most 64)."
        )
    return value


def parse_secret(value: str) -> SecretSpec:
    """``NAME=KIND[:KEY=VALUE,...]`` of ``--secret`` (lists such as ``dns`` separated by ';')."""
    name, sep, rest = value.partition("=")
    if not sep or not rest:
        raise UsageError(f"--secret {value!r} is not NAME=KIND[:PARAMS] (e.g. db_password=ascii:size=24).")
    check_secret_name(name, "--secret")
    kind, _, raw_params = rest.partition(":")
    if kind not in SECRET_KINDS:
        raise UsageError(f"--secret {name}: {kind!r} is not a secret kind; use one of {', '.join(SECRET_KINDS)}.")
    params: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in raw_params.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise UsageError(f"--secret {name}: {item!r} is not KEY=VALUE.")
        if key in params:
            raise UsageError(f"--secret {name}: {key} is given twice.")
        params[key] = _param(kind, name, key, raw)
    if kind in ("ascii", "binary"):
        params.setdefault("size", 32)
    return SecretSpec(name, kind, tuple(params.items()))


def parse_service_secrets(
    *,
    tls_server: Sequence[str] = (),
    tls_client: Sequence[str] = (),
    tls_ca: Sequence[str] = (),
    volumes: Sequence[str] = (),
    secrets: Sequence[str] = (),
    ca: str = DEFAULT_CA,
) -> ServiceSecrets:
    """The options of ``sconify convert`` as one checked ``ServiceSecrets``."""
    if len(tls_server) > 1 or len(tls_client) > 1:
        raise UsageError("--tls-server and --tls-client may each be given once per service.")
    result = ServiceSecrets(
        secrets=tuple(parse_secret(s) for s in secrets),
        tls=tuple([parse_tls(v, "server") for v in tls_server] + [parse_tls(v, "client") for v in tls_client]),
        ca_files=tuple((_enclave_path(p, "--tls-ca"), ca) for p in tls_ca),
        volumes=tuple(parse_volume(v) for v in volumes),
        ca=ca,
    )
    return result


# -- checks -------------------------------------------------------------------------------------------------


def check_service_secrets(
    spec: ServiceSecrets,
    service: str,
    environment: Iterable[tuple[str, str]],
    extra_secrets: Sequence[Mapping[str, Any]] = (),
    extra_injections: Sequence[Mapping[str, Any]] = (),
    known: Mapping[str, str] | None = None,
) -> None:
    """Check names, references and paths: every ``$$SCONE::...$$`` names a declared secret (and a part its kind
    has), references between secrets resolve, no name, path or volume is used twice. ``known`` adds secrets
    declared elsewhere in the application (name -> kind)."""
    kinds: dict[str, str] = {**dict(spec.external), **dict(known or {})}
    own: set[str] = set()
    for entry in [*spec.session_secrets(service), *extra_secrets]:
        name, kind = str(entry.get("name")), str(entry.get("kind"))
        if name in own:
            raise UsageError(f"the secret {name!r} is declared twice; give each secret one name.")
        own.add(name)
        kinds[name] = kind
    for entry in [*spec.session_secrets(service), *extra_secrets]:
        for key in ("private_key", "issuer"):
            ref = entry.get(key)
            if ref is None:
                continue
            want = "private-key" if key == "private_key" else "x509-ca"
            if kinds.get(str(ref)) != want:
                raise UsageError(
                    f"the secret {entry['name']!r} names {key}={ref!r}, which is not a declared {want} secret; "
                    f"declare it with --secret {ref}={want}."
                )
    for name, value in environment:
        _check_references(value, kinds, f"--env {name}")
    paths: set[str] = set()
    for entry in [*spec.injection_files(service), *extra_injections]:
        path = str(entry.get("path"))
        if path in paths:
            raise UsageError(f"two files are injected at {path}; give each its own path.")
        paths.add(path)
        _check_references(str(entry.get("content", "")), kinds, f"the injected file {path}")
    names: set[str] = set()
    mounts: set[str] = set()
    for volume in spec.volumes:
        if volume.name in names:
            raise UsageError(f"--volume {volume.name} is given twice; give each volume one name.")
        if volume.path in mounts:
            raise UsageError(f"--volume: two volumes are mounted at {volume.path}; give each its own path.")
        names.add(volume.name)
        mounts.add(volume.path)
        for path in paths:
            if path == volume.path or path.startswith(volume.path.rstrip("/") + "/"):
                raise UsageError(
                    f"the injected file {path} lies inside the volume {volume.name} at {volume.path}; inject it "
                    "elsewhere."
                )


def _check_references(text: str, kinds: Mapping[str, str], where: str) -> None:
    for match in _ANY_REFERENCE_RE.finditer(text):
        parsed = REFERENCE_RE.fullmatch(match.group(0))
        if parsed is None:
            raise UsageError(
                f"{where}: {match.group(0)!r} is not a secret reference; write $$SCONE::NAME$$ "
                "(or NAME.crt, NAME.key, NAME.chain, with :hex or :base64)."
            )
        name, part = parsed.group(1), parsed.group(2)
        if name not in kinds:
            raise UsageError(f"{where} refers to the secret {name!r}, which is not declared; add --secret {name}=KIND.")
        kind = kinds[name]
        if part is None and kind in PARTS and kind != "private-key":
            raise UsageError(f"{where}: the {kind} secret {name!r} needs a part: {name}.crt, {name}.key or "
                             f"{name}.chain.")
        if part is not None and part not in PARTS.get(kind, ()):
            raise UsageError(f"{where}: a {kind} secret has no part .{part}.")


def references(text: str) -> list[tuple[str, str | None, str | None]]:
    """The secret references in a string: (name, part, encoding) each."""
    return [(m.group(1), m.group(2), m.group(3)) for m in REFERENCE_RE.finditer(text)]

