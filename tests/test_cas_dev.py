"""The development CAS (``sconify cas serve``): accepts an application's session, generates its secrets and
certificates, hands a service its configuration only for an allowed measurement, keeps everything across
restarts, and the certificates it issues make mutual TLS work between exactly the named peers."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_app_convert import app_document
from test_convert_support import (
    Keys,
    keys,  # noqa: F401 (fixture)
    real_runtime,
)

from sconify.build.runtime import RUNTIME_ENV
from sconify.devcas.server import request


class Cas:
    """A ``sconify cas serve`` process and how to reach it."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sconify", "cas", "serve", "--state", str(state), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        assert self.address, self.proc.stderr.read() if self.proc.stderr else ""
        self.cafile = state / "cas.crt" if self.address.startswith("https://") else None

    def call(self, method: str, path: str, body=None):
        return request(self.address, method, path, body, cafile=self.cafile)

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err


@pytest.fixture(scope="module")
def application(tmp_path_factory, fixture_image, keys: Keys):  # noqa: F811
    """The two-service application of test_app_convert, converted in-process once."""
    from sconify.application import convert_app, load_app

    base = tmp_path_factory.mktemp("cas-app")
    (base / "images").mkdir()
    path = base / "app.yaml"
    path.write_text(yaml.safe_dump(app_document(fixture_image("busybox-sh").reference, base / "images")))
    with pytest.MonkeyPatch.context() as mp:
        if not real_runtime():
            mp.setenv(RUNTIME_ENV, "/usr/bin/busybox")
        result = convert_app(load_app(path), policy_out=base / "policy", enclave_key_file=keys.enclave)
    session = yaml.safe_load((base / "policy" / "session.yml").read_text())
    return session, {s["name"]: s["mrenclave"] for s in result.report["services"]}


@pytest.fixture
def cas(tmp_path: Path) -> Iterator[Cas]:
    server = Cas(tmp_path / "state", "--listen", "127.0.0.1:0")
    yield server
    server.stop()


def _files(config: dict) -> dict[str, bytes]:
    return {f["path"]: base64.b64decode(f["content_base64"]) for f in config["injection_files"]}


def test_allowed_measurement_gets_its_configuration(cas: Cas, application) -> None:
    session, mrenclaves = application
    status, body = cas.call("POST", "/v1/sessions", session)
    assert status == 201, body
    status, server = cas.call("POST", "/v1/configs", {"config_id": "demo/shop/server",
                                                      "mrenclave": mrenclaves["server"]})
    assert status == 200, server
    password = server["environment"]["DB_PASSWORD"]
    assert len(password) == 20 and password.isalnum() and "SCONE" not in password
    assert server["command"] == session["services"][0]["command"]
    assert server["fspf_key"] == session["services"][0]["fspf_key"]
    assert server["mrenclaves"] == [mrenclaves["server"]]
    assert [(v["name"], v["path"]) for v in server["volumes"]] == [("data", "/var/lib/server")]
    assert len(bytes.fromhex(server["volumes"][0]["key"])) == 32
    files = _files(server)
    cert = x509.load_pem_x509_certificate(files["/tls/server.crt"])
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["server", "server.local"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    key = __import__("cryptography.hazmat.primitives.serialization", fromlist=["x"]).load_pem_private_key(
        files["/tls/server.key"], None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    # The volume key is made once and kept.
    _, again = cas.call("POST", "/v1/configs", {"config_id": "demo/shop/server", "mrenclave": mrenclaves["server"]})
    assert again["volumes"] == server["volumes"]


def test_a_measurement_not_in_the_session_gets_nothing(cas: Cas, application) -> None:
    session, mrenclaves = application
    cas.call("POST", "/v1/sessions", session)
    for config_id, mrenclave in [
        ("demo/shop/server", "00" * 32),
        ("demo/shop/server", mrenclaves["client"]),  # another service's enclave
    ]:
        status, body = cas.call("POST", "/v1/configs", {"config_id": config_id, "mrenclave": mrenclave})
        assert status == 403
        assert set(body) == {"error"} and "BEGIN" not in body["error"]
    status, body = cas.call("POST", "/v1/configs", {"config_id": "demo/shop/nobody", "mrenclave": "00" * 32})
    assert status == 404 and set(body) == {"error"}


def test_bad_sessions_are_refused_with_the_problem(cas: Cas, application) -> None:
    session, _ = application
    broken = json.loads(json.dumps(session))
    broken["services"][0]["mrenclaves"] = ["not-hex"]
    status, body = cas.call("POST", "/v1/sessions", broken)
    assert status == 400 and "services/0/mrenclaves/0" in body["error"]
    status, body = cas.call("GET", "/v1/health")
    assert status == 200 and body == {"development_only": True, "sessions": 0}


def test_state_survives_a_restart_and_is_private(tmp_path: Path, application) -> None:
    session, mrenclaves = application
    state = tmp_path / "state"
    first = Cas(state, "--listen", "127.0.0.1:0")
    try:
        first.call("POST", "/v1/sessions", session)
        _, before = first.call("POST", "/v1/configs", {"config_id": "demo/shop/server",
                                                       "mrenclave": mrenclaves["server"]})
    finally:
        err = first.stop()
    assert "DEVELOPMENT AND TESTS ONLY" in err and "production" in err
    assert stat.S_IMODE((state / "cas.sqlite").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    second = Cas(state, "--listen", "127.0.0.1:0")
    try:
        _, after = second.call("POST", "/v1/configs", {"config_id": "demo/shop/server",
                                                       "mrenclave": mrenclaves["server"]})
        # Uploading the same session again keeps every secret.
        second.call("POST", "/v1/sessions", session)
        _, again = second.call("POST", "/v1/configs", {"config_id": "demo/shop/server",
                                                       "mrenclave": mrenclaves["server"]})
    finally:
        second.stop()
    assert after == before == again


def test_unix_socket_and_loopback_only(tmp_path: Path, application) -> None:
    session, _ = application
    sock = tmp_path / "cas.sock"
    server = Cas(tmp_path / "state", "--unix", str(sock))
    try:
        assert server.address == f"unix:{sock}"
        status, _ = server.call("POST", "/v1/sessions", session)
        assert status == 201
    finally:
        server.stop()
    run = subprocess.run([sys.executable, "-m", "sconify", "cas", "serve", "--state", str(tmp_path / "s2"),
                          "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "loopback only" in run.stderr


# -- the certificates make mutual TLS work between exactly the named peers ------------------------------------


def _write(tmp: Path, files: dict[str, bytes]) -> dict[str, Path]:
    out = {}
    for path, data in files.items():
        local = tmp / path.lstrip("/").replace("/", "_")
        local.write_bytes(data)
        out[path] = local
    return out


def _serve_once(context: ssl.SSLContext, listener: socket.socket, result: list) -> None:
    conn, _ = listener.accept()
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            peer = tls.getpeercert()
            result.append(dict(x[0] for x in peer["subject"]).get("commonName"))
            tls.sendall(b"hello\n")
    except (ssl.SSLError, OSError) as exc:
        result.append(exc)


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "server"):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    result: list = []
    thread = threading.Thread(target=_serve_once, args=(server_ctx, listener, result))
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
            data = tls.recv(16)
    except (ssl.SSLError, OSError) as exc:
        data = exc
    thread.join(10)
    listener.close()
    return data, result


def test_injected_certificates_give_mutual_tls_and_refuse_strangers(cas: Cas, application, tmp_path: Path) -> None:
    from test_cas_support import self_made_client

    session, mrenclaves = application
    cas.call("POST", "/v1/sessions", session)
    server = _write(tmp_path, _files(cas.call("POST", "/v1/configs", {
        "config_id": "demo/shop/server", "mrenclave": mrenclaves["server"]})[1]))
    client = _write(tmp_path, _files(cas.call("POST", "/v1/configs", {
        "config_id": "demo/shop/client", "mrenclave": mrenclaves["client"]})[1]))

    def server_context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server["/tls/server.crt"], server["/tls/server.key"])
        ctx.load_verify_locations(server["/tls/peers.crt"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the peers' CA is an intermediate (docs/app.md)
        return ctx

    def client_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(ca)
        return ctx

    good = client_context(client["/tls/client.crt"], client["/tls/client.key"], client["/tls/ca.crt"])
    data, seen = _handshake(server_context(), good)
    assert data == b"hello\n" and seen == ["client"]

    # A container with a self-made certificate (its own CA) is refused by the server.
    stranger = self_made_client(tmp_path / "stranger")
    bad = client_context(stranger.cert, stranger.key, client["/tls/ca.crt"])
    data, seen = _handshake(server_context(), bad)
    assert isinstance(seen[0], Exception) and not (isinstance(data, bytes) and data == b"hello\n")

    # The server's own certificate (issued by the application's root CA) is no client certificate for it.
    impostor = client_context(server["/tls/server.crt"], server["/tls/server.key"], client["/tls/ca.crt"])
    data, seen = _handshake(server_context(), impostor)
    assert isinstance(seen[0], Exception)

    # The client checks the server's name: the certificate is for "server", not for anything else.
    data, _ = _handshake(server_context(), good, hostname="db")
    assert isinstance(data, Exception)


def test_push_command(tmp_path: Path, cas: Cas, application) -> None:
    session, _ = application
    path = tmp_path / "session.yml"
    path.write_text(yaml.safe_dump(session))
    run = subprocess.run([sys.executable, "-m", "sconify", "cas", "push", str(path), "--cas", cas.address,
                          "--cafile", str(cas.cafile)], capture_output=True, text=True, timeout=30,
                         env={**os.environ})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["name"] == "demo/shop"
