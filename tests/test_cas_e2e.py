"""End to end under the real Docker engine: an application of two services converted by ``sconify app``, the
development CAS started on a unix socket shared with the containers, both converted services started with only
``SCONE_CAS_ADDR`` (no session file): the client reaches the server over mutual TLS with the certificates the
CAS generated and the runtime injected; an unconverted container with a self-made certificate is refused; an
enclave whose measurement is not in the session gets nothing; and no secret or key shows up in the images, the
logs or the reports.

The servers are OpenSSL's ``s_server``/``s_client`` (Debian's openssl in a fixture image built here), talking
over a unix socket in a directory both containers mount: the containers keep ``--network=none``.
"""

from __future__ import annotations

import base64
import gzip
import json
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from e2e_support import REPOSITORY, load_once, native_image
from infra.dockerd import DockerEngine
from test_cas_dev import Cas
from test_cas_support import self_made_client
from test_convert_support import Keys, keys  # noqa: F401 (keys is a fixture)
from test_runtime_support import runtime_binary  # noqa: F401 (a fixture: builds the launcher when it is stale)

OPENSSL = Path("/usr/bin/openssl")
EXIT_MEASUREMENT = 225
PEER_SH = """#!/bin/sh
# serve: answer each line reversed, to clients whose certificate the peers' CA issued (mutual TLS)
# connect MESSAGE CERT KEY CA: send MESSAGE to the server named "server", checked against CA
case "$1" in
serve)
    exec openssl s_server -unix /run/shared/tls.sock -cert /tls/server.crt -key /tls/server.key \\
        -CAfile /tls/peers.crt -Verify 1 -verify_return_error -partial_chain -rev -quiet ;;
connect)
    (echo "$2"; sleep 2) | openssl s_client -unix /run/shared/tls.sock -cert "$3" -key "$4" -CAfile "$5" \\
        -verify_return_error -verify_hostname server -quiet -no_ign_eof 2>/dev/null
    exit $? ;;
esac
echo "usage: peer.sh serve | connect MESSAGE CERT KEY CA" >&2
exit 2
"""

pytestmark = pytest.mark.usefixtures("runtime_binary")


def _peer_image(base: Path):
    """busybox, Debian's openssl with its libraries, and /app/peer.sh as the entrypoint."""
    from fixtures import parts
    from fixtures.builder import write_spec

    if not OPENSSL.exists():
        pytest.skip("openssl is missing; install the Debian package openssl")
    d = parts.Draft("tls-peer")
    d.add(parts.busybox_base())
    layer = d.new_layer("openssl and /app/peer.sh")
    layer.host_file("/usr/bin/openssl", OPENSSL, mode=0o755)
    parts.add_libraries(layer, [OPENSSL])
    layer.file("/app/peer.sh", PEER_SH, mode=0o755)
    spec = d.finish({"Entrypoint": ["/app/peer.sh"], "Env": parts.env(), "WorkingDir": "/app"})
    return write_spec(spec, base / "layout", "latest")


@pytest.fixture(scope="module")
def application(tmp_path_factory, dockerd: DockerEngine, keys: Keys):  # noqa: F811
    from sconify.application import convert_app, load_app

    base = tmp_path_factory.mktemp("cas-e2e")
    source = _peer_image(base)
    images = {name: (base / f"{name}.tar", f"{REPOSITORY}/tls-{name}:app") for name in ("server", "client")}
    doc = {
        "name": "shop",
        "namespace": "e2e",
        "services": [
            {
                "name": "server",
                "source": source.reference,
                "destination": f"docker-archive:{images['server'][0]}:{images['server'][1]}",
                "command": "/app/peer.sh serve",
                "secrets": ["db_password=ascii:size=24"],
                "env": {"DB_PASSWORD": "$$SCONE::db_password$$"},
                "tls": {"server": {"cert": "/tls/server.crt", "key": "/tls/server.key", "ca": "/tls/peers.crt"},
                        "accepts": ["client"]},
            },
            {
                "name": "client",
                "source": source.reference,
                "destination": f"docker-archive:{images['client'][0]}:{images['client'][1]}",
                "command": "/app/peer.sh connect hello-from-the-client /tls/client.crt /tls/client.key /tls/ca.crt",
                "heap": "80M",
                "tls": {"connects": {"server": {"cert": "/tls/client.crt", "key": "/tls/client.key",
                                                "ca": "/tls/ca.crt"}}},
            },
        ],
    }
    app_file = base / "app.yaml"
    app_file.write_text(yaml.safe_dump(doc))
    result = convert_app(load_app(app_file), policy_out=base / "policy", enclave_key_file=keys.enclave)
    loaded = {name: load_once(dockerd, archive, image) for name, (archive, image) in images.items()}
    native = native_image(dockerd, tmp_path_factory, source)
    return base, result, loaded, native, images


def _wait_for_server(dockerd: DockerEngine, container: str, shared: Path, failure: str) -> None:
    """Until the server's socket appears in the shared directory; fails with its logs if it stops first."""
    deadline = time.monotonic() + 60
    while not (shared / "tls.sock").exists():
        state = dockerd.run("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        if state != "true" or time.monotonic() > deadline:
            logs = dockerd.run("logs", container)
            pytest.fail(f"{failure}: {logs.stdout} {logs.stderr}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def running(application, dockerd: DockerEngine, tmp_path_factory):
    """The CAS with the application's session, and the converted server running detached."""
    base, result, loaded, _, _ = application
    shared = tmp_path_factory.mktemp("shared")
    cas_dir = tmp_path_factory.mktemp("cas-socket")
    shared.chmod(0o777)
    cas = Cas(tmp_path_factory.mktemp("cas-state"), "--unix", str(cas_dir / "cas.sock"))
    status, body = cas.call("POST", "/v1/sessions", yaml.safe_load((base / "policy" / "session.yml").read_text()))
    assert status == 201, body
    mounts = ("-v", f"{shared}:/run/shared", "-v", f"{cas_dir}:/run/cas", "-e", "SCONE_CAS_ADDR=unix:/run/cas/cas.sock")
    started = dockerd.run("run", "-d", "--network=none", *mounts, loaded["server"], check=True)
    container = started.stdout.strip()
    _wait_for_server(dockerd, container, shared, "the converted server did not start")
    yield cas, mounts, container, shared
    dockerd.run("rm", "-f", container)
    cas.stop()


def test_the_client_reaches_the_server_over_mutual_tls(application, running, dockerd: DockerEngine) -> None:
    _, _, loaded, _, _ = application
    _, mounts, _, _ = running
    done = dockerd.run("run", "--rm", "--network=none", *mounts, loaded["client"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "hello-from-the-client"[::-1] in done.stdout


def test_an_unconverted_container_with_a_self_made_certificate_is_refused(
    application, running, dockerd: DockerEngine, tmp_path: Path
) -> None:
    _, _, _, native, _ = application
    _, _, _, shared = running
    stranger = self_made_client(tmp_path / "stranger")
    tmp_path.chmod(0o755)
    (tmp_path / "stranger").chmod(0o755)
    stranger.key.chmod(0o644)
    # It does not even check the server; it only tries to get in with its own certificate.
    script = ("(echo hello-from-a-stranger; sleep 2) | openssl s_client -unix /run/shared/tls.sock "
              "-cert /self/self.crt -key /self/self.key -quiet -no_ign_eof")
    done = dockerd.run(
        "run", "--rm", "--network=none", "-v", f"{shared}:/run/shared", "-v", f"{tmp_path / 'stranger'}:/self",
        "--entrypoint", "/bin/sh", native, "-c", script, timeout=60,
    )
    assert "hello-from-a-stranger"[::-1] not in done.stdout
    assert "alert unknown ca" in done.stderr, done.stderr


def test_an_enclave_not_in_the_session_gets_nothing(application, running, dockerd: DockerEngine) -> None:
    _, _, loaded, _, _ = application
    _, mounts, _, _ = running
    # Another heap is another enclave: its MRENCLAVE is not the one the session allows for the client.
    done = dockerd.run("run", "--rm", "--network=none", *mounts, "-e", "SCONE_HEAP=96M", loaded["client"],
                       timeout=60)
    assert done.returncode == EXIT_MEASUREMENT, done.stderr
    assert "refused" in done.stderr and done.stdout == ""


def _layers(archive: Path) -> list[bytes]:
    """Every member of a docker-archive, decompressed when it is gzip."""
    out = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if data[:2] == b"\x1f\x8b":
                    data = gzip.decompress(data)
                out.append(data)
    return out


def test_secrets_and_keys_never_appear_in_images_logs_or_reports(
    application, running, dockerd: DockerEngine
) -> None:
    base, result, _, _, images = application
    cas, mounts, container, _ = running
    dockerd.run("run", "--rm", "--network=none", *mounts, loaded_client(application), timeout=60)
    markers: set[bytes] = set()
    for svc in result.services:
        config_id = svc.plan.config_id
        status, config = cas.call("POST", "/v1/configs", {"config_id": config_id, "mrenclave": svc.mrenclave})
        assert status == 200
        markers.add(config["fspf_key"].encode())
        markers.update(v.encode() for k, v in config["environment"].items() if k == "DB_PASSWORD")
        for f in config["injection_files"]:
            content = base64.b64decode(f["content_base64"])
            if b"PRIVATE KEY" in content:  # the whole PEM body and the raw private scalar
                markers.add(b"".join(content.splitlines()[1:-1]))
                key = serialization.load_pem_private_key(content, None)
                markers.add(key.private_numbers().private_value.to_bytes(32, "big"))  # type: ignore[union-attr]
    assert len(markers) >= 7
    places: dict[str, bytes] = {}
    for name, (archive, _) in images.items():
        for i, blob in enumerate(_layers(archive)):
            places[f"{name} image member {i}"] = blob
    logs = dockerd.run("logs", container)
    places["server log"] = (logs.stdout + logs.stderr).encode()
    for report in [base / "policy" / "report.json", *sorted((base / "policy" / "services").glob("*/report.json"))]:
        places[str(report)] = report.read_bytes()
    places["app result"] = json.dumps(result.report).encode()
    for where, data in places.items():
        for marker in markers:
            assert marker not in data, f"a secret shows in {where}"


def loaded_client(application) -> str:
    return application[2]["client"]


def test_the_server_restarted_with_its_old_file_system_starts_again(
    application, running, dockerd: DockerEngine
) -> None:
    """``docker restart`` keeps the container's file system: the runtime finds the TLS files the CAS injected at
    the first start (in the authenticated root) and must accept them, replace them and start the server again."""
    _, mounts, container, shared = running
    (shared / "tls.sock").unlink()
    dockerd.run("restart", "-t", "5", container, check=True, timeout=60)
    _wait_for_server(dockerd, container, shared, "the restarted server did not start")
    done = dockerd.run("run", "--rm", "--network=none", *mounts, loaded_client(application), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "hello-from-the-client"[::-1] in done.stdout
