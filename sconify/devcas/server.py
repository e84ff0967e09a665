"""The development CAS's HTTP interface, over TLS on loopback or over a unix socket, and a small client for it.

    POST /v1/sessions   a session (YAML or JSON) -> 201 {"name", "hash"}; 400 with the problem
    POST /v1/configs    {"config_id", "mrenclave"} -> 200 the service's configuration; 403 nothing at all
    GET  /v1/health     {"development_only": true, "sessions": N}

Simulation mode only: the caller *states* its measurement, nothing proves it. Never use this for production.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import logging
import os
import socket
import socketserver
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from sconify.devcas.store import Refused, Store
from sconify.errors import NetworkError, NotFoundError, SconifyError, UsageError

log = logging.getLogger(__name__)
WARNING = ("sconify development CAS: FOR DEVELOPMENT AND TESTS ONLY. It cannot attest enclaves: any caller that "
           "states an allowed measurement gets the secrets. Never use it in production.")
MAX_BODY = 4 * 1024 * 1024


class _Handler(BaseHTTPRequestHandler):
    server_version = "sconify-dev-cas"
    store: Store

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s", format % args)  # never the bodies: they hold secrets

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Development-Only", "true")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_BODY:
            raise UsageError("the request needs a body of at most 4 MiB.")
        raw = self.rfile.read(length)
        try:
            return yaml.safe_load(raw)  # JSON is YAML
        except yaml.YAMLError:
            raise UsageError("the body is neither JSON nor YAML.") from None

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/v1/health":
            self._reply(200, {"development_only": True, "sessions": len(self.store.session_names())})
        else:
            self._reply(404, {"error": "no such endpoint"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            if self.path == "/v1/sessions":
                session = self._body()
                if not isinstance(session, dict):
                    raise UsageError("the body is not a session (a mapping).")
                digest = self.store.put_session(session)
                self._reply(201, {"name": session["name"], "hash": digest})
            elif self.path == "/v1/configs":
                body = self._body()
                if not isinstance(body, dict) or not isinstance(body.get("config_id"), str) \
                        or not isinstance(body.get("mrenclave"), str):
                    raise UsageError("give config_id and mrenclave.")
                config = self.store.configuration(body["config_id"], body["mrenclave"])
                self._reply(200, config.to_json())
            else:
                self._reply(404, {"error": "no such endpoint"})
        except Refused as exc:
            self._reply(403, {"error": exc.message})
        except NotFoundError as exc:
            self._reply(404, {"error": exc.message})
        except SconifyError as exc:
            self._reply(400, {"error": exc.message})


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        return request, ("unix", 0)  # http.server expects a (host, port) pair


def check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UsageError(f"the development CAS listens on loopback only, not {host}; use 127.0.0.1 or --unix.")


def self_signed(state: Path) -> tuple[Path, Path]:
    """The CAS's own TLS certificate for 127.0.0.1 and localhost, made once and kept in the state directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from sconify.secretfile import write_secret

    cert_path, key_path = state / "cas.crt", state / "cas.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sconify development CAS")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_secret(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), force=True, what="CAS key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_server(state: Path, *, host: str = "127.0.0.1", port: int = 8081, unix: Path | None = None,
                cert: Path | None = None, key: Path | None = None) -> tuple[socketserver.BaseServer, str, Store]:
    """A ready server (not yet serving), its address (``https://HOST:PORT`` or ``unix:PATH``) and its store."""
    from sconify.secretfile import make_private_dir

    make_private_dir(state)
    store = Store(state / "cas.sqlite")
    handler = type("Handler", (_Handler,), {"store": store})
    server: socketserver.BaseServer
    if unix is not None:
        with contextlib.suppress(FileNotFoundError):
            if Path(unix).is_socket():
                os.unlink(unix)
        server = _UnixServer(str(unix), handler)
        os.chmod(unix, 0o666)  # containers with other uids reach it through a shared volume
        return server, f"unix:{unix}", store
    check_loopback(host)
    if cert is None or key is None:
        cert, key = self_signed(state)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    tls_server = ThreadingHTTPServer((host, port), handler)
    tls_server.daemon_threads = True
    tls_server.socket = context.wrap_socket(tls_server.socket, server_side=True)
    return tls_server, f"https://{host}:{tls_server.server_address[1]}", store


# -- client ----------------------------------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(address: str, method: str, path: str, body: Any = None, *, cafile: Path | None = None,
            timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    """One request to a development CAS at ``address``; returns the status and the JSON body."""
    conn: http.client.HTTPConnection
    if address.startswith("unix:"):
        conn = _UnixConnection(address[5:], timeout)
    elif address.startswith("https://"):
        host, _, port = address[8:].rstrip("/").rpartition(":")
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
        conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=timeout)
    else:
        raise UsageError(f"CAS address {address!r} is neither https://HOST:PORT nor unix:PATH.")
    data = json.dumps(body).encode() if body is not None else None
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        payload = response.read()
    except OSError as exc:
        raise NetworkError(f"the CAS at {address} cannot be reached ({exc}); is `sconify cas serve` running?") from None
    finally:
        conn.close()
    try:
        return response.status, json.loads(payload or b"{}")
    except ValueError:
        raise NetworkError(f"the CAS at {address} answered something that is not JSON.") from None
