"""Helpers for the service tests (no tests here): run ``sconify serve`` as a real process and talk to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from infra.procs import die_with_parent, free_port, log_tail, wait_until

ROOT = Path(__file__).resolve().parents[1]
DIST_V1 = "application/vnd.docker.distribution.events.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def runtime_env() -> dict[str, str]:
    """The environment for conversions: the built-in runtime if it was built, else any static ELF."""
    env = dict(os.environ)
    if not (ROOT / "sconify" / "data" / "runtime" / "sconify-run").is_file():
        env.setdefault("SCONIFY_RUNTIME", "/usr/bin/busybox")
    return env


class Service:
    """A ``sconify serve`` process in its own process group, with its config, log and address."""

    def __init__(self, workdir: Path, config: dict[str, Any], port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.config = {"listen": f"127.0.0.1:{self.port}", "state_dir": str(workdir / "state"), **config}
        self.config_path = workdir / "service.yaml"
        self.log_path = workdir / "service.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Service:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sconify", "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=runtime_env(), cwd=self.workdir,
                preexec_fn=_new_group_dying_with_parent,
            )
        if not wait_until(self._answers, timeout, self.proc):
            tail = self.log()
            self.kill()
            raise RuntimeError(f"sconify serve did not answer within {timeout} s; log:\n{tail}")
        return self

    def _answers(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def log(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def post(self, path: str, body: bytes | str | dict | None = None, headers: dict[str, str] | None = None,
             **kwargs: Any) -> requests.Response:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return requests.post(self.url + path, data=data, headers=headers or {}, timeout=30, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        token = self.config.get("api_token")
        if token and path.startswith("/jobs") and "headers" not in kwargs:
            kwargs["headers"] = {"Authorization": f"Bearer {token}"}
        return requests.get(self.url + path, timeout=30, **kwargs)

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        resp = self.get("/jobs", params=params)
        resp.raise_for_status()
        return resp.json()["jobs"]

    def counts(self) -> dict[str, int]:
        return self.get("/jobs", params={"limit": 1}).json()["counts"]

    def wait_idle(self, timeout: float) -> dict[str, int]:
        """Wait until no job is queued or running; returns the counts."""
        deadline = time.monotonic() + timeout
        counts = self.counts()
        while time.monotonic() < deadline:
            counts = self.counts()
            if counts["queued"] == 0 and counts["running"] == 0:
                return counts
            time.sleep(0.2)
        raise AssertionError(f"jobs still pending after {timeout} s: {counts}\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the service and its workers (the whole process group), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, as an orderly shutdown; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def _new_group_dying_with_parent() -> None:
    os.setpgid(0, 0)
    die_with_parent()


def distribution_event(repository: str, digest: str | None, tag: str | None, *, action: str = "push",
                       media_type: str = OCI_MANIFEST, event_id: str = "e1") -> dict[str, Any]:
    """One event of a distribution registry notification, as the registry writes it."""
    target: dict[str, Any] = {"mediaType": media_type, "repository": repository, "size": 100, "length": 100}
    if digest:
        target["digest"] = digest
        target["url"] = f"http://registry/v2/{repository}/manifests/{digest}"
    if tag:
        target["tag"] = tag
    return {"id": event_id, "timestamp": "2025-01-01T00:00:00Z", "action": action, "target": target,
            "request": {"id": "r1", "addr": "127.0.0.1:1", "host": "registry", "method": "PUT",
                        "useragent": "test"},
            "actor": {}, "source": {"addr": "registry:5000", "instanceID": "i1"}}


def envelope(*events: dict[str, Any]) -> dict[str, Any]:
    return {"events": list(events)}


# -- a tiny CAS: HTTPS with a required client certificate, recording the sessions it is sent ----------------------


class CertificateSet:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files in ``directory``."""

    def __init__(self, directory: Path, client_name: str = "sconify-service") -> None:
        import datetime as dt
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
            return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))

        def issue(cn: str, usage: Any, san: Any = None) -> tuple[bytes, bytes]:
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                       .public_key(key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                       .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
            if san is not None:
                builder = builder.add_extension(san, critical=False)
            cert = builder.sign(ca_key, hashes.SHA256())
            return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

        server_cert, server_key = issue("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH,
                                        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
        client_cert, client_key = issue(client_name, ExtendedKeyUsageOID.CLIENT_AUTH)
        self.ca = directory / "ca.crt"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = directory / "server.crt", directory / "server.key"
        self.server_cert.write_bytes(server_cert)
        self.server_key.write_bytes(server_key)
        self.client_cert, self.client_key = directory / "client.crt", directory / "client.key"
        self.client_cert.write_bytes(client_cert)
        self.client_key.write_bytes(client_key)


class TinyCas:
    """``POST /v1/sessions`` over TLS; the TLS handshake requires a client certificate from ``clients_ca``."""

    def __init__(self, certs: CertificateSet, clients_ca: Path | None = None, status: int = 201) -> None:
        import http.server
        import ssl
        import threading

        self.sessions: list[dict[str, Any]] = []
        self.status = status
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                subject = dict(x[0] for x in peer.get("subject", ())) if peer else {}
                if self.path != "/v1/sessions":
                    self.send_response(404)
                    self.end_headers()
                    return
                owner.sessions.append({"body": body, "client": subject.get("commonName"),
                                       "content_type": self.headers.get("Content-Type")})
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"hash": "test"}')

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.server_cert, certs.server_key)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(clients_ca or certs.ca)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
