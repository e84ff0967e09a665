"""The development CAS's state: sessions, generated secrets and volume keys in one SQLite file (mode 0600), and
the rule that turns a config id plus a measurement into a service's configuration, or into nothing."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets as random
import sqlite3
import string
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sconify.errors import NotFoundError, UsageError, VerificationFailed
from sconify.policy.secrets import REFERENCE_RE
from sconify.policy.session_schema import session_errors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (name TEXT PRIMARY KEY, body TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (session TEXT NOT NULL, name TEXT NOT NULL, definition TEXT NOT NULL,
                                    value TEXT NOT NULL, PRIMARY KEY (session, name));
CREATE TABLE IF NOT EXISTS volumes (session TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL,
                                    PRIMARY KEY (session, name));
"""
_ASCII = string.ascii_letters + string.digits


class Refused(VerificationFailed):
    """The caller did not present a configuration id and measurement the session allows."""


@dataclass(frozen=True)
class ServiceConfig:
    """What a service gets after presenting an allowed measurement: the fields of the session's service (so the
    runtime reads them as it reads a session file) with secrets filled in, the files and the volume keys."""

    mrenclave: str
    command: str  # as in the session: split with shlex rules
    environment: dict[str, str]
    pwd: str
    fspf: dict[str, str] | None  # fspf_path, fspf_key, fspf_tag
    injection_files: list[dict[str, str]]  # path, content_base64
    volumes: list[dict[str, str]]  # name, path, key (hex)

    def to_json(self) -> dict[str, Any]:
        return {"mrenclaves": [self.mrenclave], "command": self.command, "environment": self.environment,
                "pwd": self.pwd, **(self.fspf or {}), "injection_files": self.injection_files,
                "volumes": self.volumes}


class Store:
    """Sessions and their secrets, persistent across restarts; safe for the server's threads."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.exists():
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)  # it will hold keys: private from the first byte
            os.close(fd)
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    # -- sessions -------------------------------------------------------------------------------------------

    def put_session(self, session: Mapping[str, Any]) -> str:
        """Store (or replace) a session and generate the secrets it declares; returns the session's hash."""
        problems = session_errors(session)
        if problems:
            raise UsageError(f"the session is not one the development CAS accepts: {problems[0]}.")
        body = json.dumps(session, sort_keys=True)
        digest = hashlib.sha256(body.encode()).hexdigest()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?)", (session["name"], body, digest))
                self._generate(session["name"], session.get("secrets") or [])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return digest

    def session_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM sessions ORDER BY name")]

    def _generate(self, session: str, declared: list[Mapping[str, Any]]) -> None:
        existing = {
            name: (json.loads(d), json.loads(v))
            for name, d, v in self._db.execute("SELECT name, definition, value FROM secrets WHERE session = ?",
                                               (session,))
        }
        values: dict[str, dict[str, str]] = {n: v for n, (d, v) in existing.items()}
        pending = {s["name"]: dict(s) for s in declared}
        for name, definition in list(pending.items()):  # an unchanged declaration keeps its value
            if name in existing and existing[name][0] == definition:
                pending.pop(name)
        while pending:
            progressed = False
            for name, definition in list(pending.items()):
                deps = [definition.get(k) for k in ("private_key", "issuer") if definition.get(k)]
                if any(d in pending for d in deps):
                    continue
                for dep in deps:
                    if dep not in values:
                        raise UsageError(f"the secret {name!r} refers to {dep!r}, which the session does not declare.")
                values[name] = _make_secret(definition, values)
                self._db.execute("INSERT OR REPLACE INTO secrets VALUES (?, ?, ?, ?)",
                                 (session, name, json.dumps(definition, sort_keys=True), json.dumps(values[name])))
                pending.pop(name)
                progressed = True
            if not progressed:
                raise UsageError(f"the secrets {', '.join(sorted(pending))} refer to each other in a cycle.")

    # -- configurations -------------------------------------------------------------------------------------

    def configuration(self, config_id: str, mrenclave: str) -> ServiceConfig:
        """The configuration of ``config_id`` for an enclave measured as ``mrenclave``; ``Refused`` when the
        session does not allow that measurement, ``NotFoundError`` when there is no such service."""
        session_name, _, service_name = config_id.rpartition("/")
        row = self._db.execute("SELECT body FROM sessions WHERE name = ?", (session_name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no session {session_name!r} on this CAS.")
        session = json.loads(row[0])
        service = next((s for s in session["services"] if s["name"] == service_name), None)
        if service is None:
            raise NotFoundError(f"the session {session_name!r} has no service {service_name!r}.")
        if mrenclave.lower() not in {m.lower() for m in service["mrenclaves"]}:
            raise Refused(f"the measurement presented for {config_id} is not one the session allows.")
        values = {n: json.loads(v) for n, v in self._db.execute(
            "SELECT name, value FROM secrets WHERE session = ?", (session_name,))}
        image: dict[str, Any] = next(
            (i for i in session.get("images") or [] if i["name"] == service.get("image_name")), {}
        )
        files = [
            {"path": f["path"], "content_base64": base64.b64encode(_substitute(f["content"], values)).decode()}
            for f in image.get("injection_files") or []
        ]
        volumes = [{"name": v["name"], "path": v["path"], "key": self._volume_key(session_name, v["name"])}
                   for v in image.get("volumes") or []]
        environment = {k: _substitute(str(v), values, env=True).decode("utf-8", "surrogateescape")
                       for k, v in (service.get("environment") or {}).items()}
        fspf = None
        if service.get("fspf_path"):
            fspf = {k: service[k] for k in ("fspf_path", "fspf_key", "fspf_tag")}
        return ServiceConfig(mrenclave.lower(), service["command"], environment, service.get("pwd") or "/", fspf, files,
                             volumes)

    def _volume_key(self, session: str, volume: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT key FROM volumes WHERE session = ? AND name = ?", (session, volume))
            found = row.fetchone()
            if found:
                return str(found[0])
            key = random.token_hex(32)  # the CAS makes a volume's key on first use; nobody else ever sees it
            self._db.execute("INSERT INTO volumes VALUES (?, ?, ?)", (session, volume, key))
            return key


def _substitute(raw: str, values: Mapping[str, Mapping[str, str]], *, env: bool = False) -> bytes:
    """``raw`` with every ``$$SCONE::...$$`` replaced by the secret's bytes (a binary secret in an environment
    variable without an encoding is written as hex: a variable cannot hold every byte)."""
    out = bytearray()
    pos = 0
    for match in REFERENCE_RE.finditer(raw):
        out += raw[pos:match.start()].encode()
        name, part, encoding = match.group(1), match.group(2), match.group(3)
        secret = values.get(name)
        if secret is None:
            raise NotFoundError(f"the session refers to the secret {name!r} but does not declare it.")
        value = base64.b64decode(secret[part or "value"]) if (part or "value") in secret else b""
        if encoding is None and env and secret.get("binary"):
            encoding = "hex"
        if encoding == "hex":
            value = value.hex().encode()
        elif encoding == "base64":
            value = base64.b64encode(value)
        out += value
        pos = match.end()
    out += raw[pos:].encode()
    return bytes(out)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(values: Mapping[str, Mapping[str, str]], name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(base64.b64decode(values[name]["key"]), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _make_secret(definition: Mapping[str, Any], values: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """A fresh value for one declared secret (base64 of each part)."""
    kind = definition["kind"]
    if kind == "ascii":
        text = "".join(random.choice(_ASCII) for _ in range(int(definition.get("size", 32))))
        return {"value": _b64(text.encode())}
    if kind == "binary":
        return {"value": _b64(os.urandom(int(definition.get("size", 32)))), "binary": "1"}
    if kind == "private-key":
        pem = _pem_key(ec.generate_private_key(ec.SECP256R1()))
        return {"value": _b64(pem), "key": _b64(pem)}
    # x509 and x509-ca
    key = _load_key(values, definition["private_key"]) if definition.get("private_key") else \
        ec.generate_private_key(ec.SECP256R1())
    is_ca = kind == "x509-ca"
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(definition.get("common_name") or
                                                                     definition["name"]))])
    issuer_name, issuer_key, chain = subject, key, b""
    if definition.get("issuer"):
        issuer = values[definition["issuer"]]
        issuer_cert = x509.load_pem_x509_certificate(base64.b64decode(issuer["crt"]))
        issuer_name, issuer_key = issuer_cert.subject, _load_key(values, definition["issuer"])
        chain = base64.b64decode(issuer["chain"])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650 if is_ca else 365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in definition.get("dns") or []]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in definition.get("ip") or []]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        usage = {"server": [ExtendedKeyUsageOID.SERVER_AUTH], "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}.get(
            definition.get("endpoint", ""), [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False), critical=True)
    cert = builder.sign(issuer_key, hashes.SHA256())
    crt = cert.public_bytes(serialization.Encoding.PEM)
    return {"crt": _b64(crt), "key": _b64(_pem_key(key)), "chain": _b64(crt + chain), "value": _b64(crt)}
