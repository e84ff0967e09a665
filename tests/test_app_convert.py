"""``sconify app``: an application of several services becomes one session with one CA, mutual TLS between
exactly the peers the file names, one policy set and a chart; the file is checked by a JSON Schema with
messages that name the file, the path in the document and what is wrong."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from test_convert_support import (
    Keys,
    keys,  # noqa: F401 (fixture)
    real_runtime,
    run_cli,
)

from sconify.application import load_app
from sconify.build.runtime import RUNTIME_ENV
from sconify.errors import UsageError
from sconify.policy.session_schema import session_errors


@pytest.fixture(autouse=True)
def runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not real_runtime():
        monkeypatch.setenv(RUNTIME_ENV, "/usr/bin/busybox")
    empty = tmp_path / "docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))


def app_document(source: str, out: Path, **top) -> dict:
    """A server that accepts the client, and the client that connects to it (mutual TLS both ways)."""
    return {
        "name": "shop",
        "namespace": "demo",
        **top,
        "services": [
            {
                "name": "server",
                "source": source,
                "destination": f"oci:{out / 'server'}:latest",
                "env": {"DB_PASSWORD": "$$SCONE::db_password$$"},
                "secrets": ["db_password=ascii:size=20"],
                "volumes": {"data": "/var/lib/server"},
                "tls": {
                    "server": {"cert": "/tls/server.crt", "key": "/tls/server.key", "ca": "/tls/peers.crt",
                               "dns": ["server.local"]},
                    "accepts": ["client"],
                },
            },
            {
                "name": "client",
                "source": source,
                "destination": f"oci:{out / 'client'}:latest",
                "heap": "96M",  # another enclave than the server's, although from the same image
                "tls": {"connects": {"server": {"cert": "/tls/client.crt", "key": "/tls/client.key",
                                                "ca": "/tls/ca.crt"}}},
            },
        ],
    }


def _write(tmp_path: Path, doc: dict, name: str = "app.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_image, keys: Keys):  # noqa: F811
    """The two-service application converted once through the command line (run in-process)."""
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("app")
    (base / "images").mkdir()
    doc = app_document(fixture_image("busybox-sh").reference, base / "images")
    app_file = _write(base, doc)
    env = {**__import__("os").environ}
    if not real_runtime():
        env[RUNTIME_ENV] = "/usr/bin/busybox"
    run = subprocess.run(
        [sys.executable, "-m", "sconify", "-q", "app", str(app_file), "--policy-out", str(base / "policy"),
         "--enclave-key", str(keys.enclave), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return base, json.loads(run.stdout)


def test_one_session_with_every_service_and_one_ca(converted) -> None:
    base, report = converted
    session = yaml.safe_load((base / "policy" / "session.yml").read_text())
    assert session_errors(session) == []
    assert session["name"] == "demo/shop"
    assert [s["name"] for s in session["services"]] == ["server", "client"]
    assert {s["image_name"] for s in session["services"]} == {i["name"] for i in session["images"]}
    secrets = {s["name"]: s for s in session["secrets"]}
    roots = [n for n, s in secrets.items() if s["kind"] == "x509-ca" and "issuer" not in s]
    assert roots == ["ca"], "exactly one root CA"
    assert secrets["server_server"]["issuer"] == "ca"
    assert secrets["server_server"]["endpoint"] == "server"
    assert secrets["server_server"]["dns"] == ["server", "server.local"]
    assert secrets["db_password"] == {"name": "db_password", "kind": "ascii", "size": 20}
    # Report and config ids agree with the session.
    assert [s["config_id"] for s in report["services"]] == ["demo/shop/server", "demo/shop/client"]
    assert report["strict"] is True and report["relaxations"] == []
    assert session["security"]["attestation"] == {"mode": "hardware", "tolerate": [], "ignore_advisories": []}
    assert session["volumes"] == [{"name": "data"}]


def test_mutual_tls_between_exactly_the_named_peers(converted) -> None:
    base, _ = converted
    session = yaml.safe_load((base / "policy" / "session.yml").read_text())
    secrets = {s["name"]: s for s in session["secrets"]}
    images = {i["name"]: {f["path"]: f["content"] for f in i["injection_files"]} for i in session["images"]}
    image_of = {s["name"]: s["image_name"] for s in session["services"]}
    server, client = images[image_of["server"]], images[image_of["client"]]
    # The server trusts only the CA that issues its named peers' client certificates.
    peers_ca = server["/tls/peers.crt"].removeprefix("$$SCONE::").removesuffix(".crt$$")
    assert secrets[peers_ca]["kind"] == "x509-ca" and secrets[peers_ca]["issuer"] == "ca"
    client_cert = client["/tls/client.crt"].removeprefix("$$SCONE::").removesuffix(".crt$$")
    assert secrets[client_cert]["issuer"] == peers_ca
    assert secrets[client_cert]["endpoint"] == "client"
    # The client checks the server against the application's CA.
    assert client["/tls/ca.crt"] == "$$SCONE::ca.crt$$"
    # No certificate of the client is issued by anything else, and the server has no client certificate.
    issued_by_peers = [n for n, s in secrets.items() if s.get("issuer") == peers_ca and s["kind"] == "x509"]
    assert issued_by_peers == [client_cert]
    assert set(server) == {"/tls/server.crt", "/tls/server.key", "/tls/peers.crt"}


def test_one_policy_set_and_an_umbrella_chart(converted) -> None:
    base, _ = converted
    policy = base / "policy"
    assert stat.S_IMODE(policy.stat().st_mode) == 0o700
    assert stat.S_IMODE((policy / "session.yml").stat().st_mode) == 0o600
    assert sorted(p.name for p in (policy / "services").iterdir()) == ["client", "server"]
    assert not list(policy.glob("services/*/session.yml")), "one session for the application"
    assert (policy / "services" / "server" / "enclave.sig").exists()
    chart = yaml.safe_load((policy / "chart" / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "shop"
    sub = {p.name for p in (policy / "chart" / "charts").iterdir()}
    assert sub == {"server", "client"}
    values = yaml.safe_load((policy / "chart" / "charts" / "server" / "values.yaml").read_text())
    assert values["scone"]["configId"] == "demo/shop/server"
    assert values["volumes"][0]["name"] == "data"
    report = json.loads((policy / "report.json").read_text())
    digests = {s["name"]: s["digest"] for s in report["services"]}
    index = json.loads((base / "images" / "server" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == digests["server"]


def test_relaxations_are_explicit_and_reported(tmp_path: Path, fixture_image) -> None:
    doc = app_document(fixture_image("busybox-sh").reference, tmp_path / "images",
                       security={"allow_debug": True, "tolerate": ["hyperthreading"],
                                 "ignore_advisories": ["INTEL-SA-00334"]})
    app = load_app(_write(tmp_path, doc))
    names = [r for r, _ in app.relaxations]
    assert names == ["debug-mode", "hyperthreading", "ignore-advisory:INTEL-SA-00334"]
    assert all(s.options.allow_debug for s in app.services)
    assert app.tolerate == ("debug-mode", "hyperthreading")


def test_per_service_charts(tmp_path: Path, fixture_image, keys: Keys) -> None:  # noqa: F811
    from sconify.application import convert_app

    (tmp_path / "images").mkdir()
    doc = app_document(fixture_image("busybox-sh").reference, tmp_path / "images", chart="per-service")
    result = convert_app(load_app(_write(tmp_path, doc)), policy_out=tmp_path / "policy",
                         enclave_key_file=keys.enclave)
    assert sorted(p.name for p in (tmp_path / "policy" / "charts").iterdir()) == ["client", "server"]
    assert not (tmp_path / "policy" / "chart").exists()
    assert len({r.mrsigner for r in result.services}) == 1, "one enclave signer for the application"


def _error(tmp_path: Path, doc: dict) -> str:
    path = _write(tmp_path, doc)
    with pytest.raises(UsageError) as info:
        load_app(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path) + ": ")
    return message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d["services"][0]["tls"]["server"].pop("ca"), ("services/0/tls/server", "'ca' is a required")),
        (lambda d: d["services"][1].update(colour="blue"), ("services/1", "unknown key", "colour")),
        (lambda d: d["services"][1].update(name="Client_1"), ("services/1/name", "service name")),
        (lambda d: d["services"][0]["tls"]["server"].update(cert="tls/server.crt"), ("services/0/tls/server/cert",
                                                                                     "absolute path")),
        (lambda d: d.update(security={"tolerate": ["everything"]}), ("security/tolerate/0",)),
        (lambda d: d.pop("services"), ("(top level)", "'services' is a required")),
        (lambda d: d["services"][0]["tls"].update(accepts=[]), ("services/1/tls/connects/server",
                                                                "does not list 'client'")),
        (lambda d: d["services"][1]["tls"].pop("connects"), ("services/0/tls/accepts/0", "does not connect")),
        (lambda d: d["services"][1]["tls"]["connects"].update(nobody=d["services"][1]["tls"]["connects"]["server"]),
         ("connects/nobody", "no service 'nobody'")),
        (lambda d: d["services"][1].update(name="server"), ("services/1/name", "named twice")),
        (lambda d: d["services"][0].update(env={"X": "$$SCONE::nope$$"}), ("services/0 (server)", "not declared")),
        (lambda d: d["services"][0].update(secrets=["pw=magic"]), ("services/0 (server)", "not a secret kind")),
        (lambda d: d["services"][1].update(secrets=["db_password=binary"]), ("services/1 (client)",
                                                                             "already declared")),
    ],
)
def test_bad_application_files_name_file_path_and_problem(tmp_path: Path, change, words) -> None:
    doc = app_document("oci:/nowhere:latest", tmp_path / "images")
    change(doc)
    message = _error(tmp_path, doc)
    for word in words:
        assert word in message, message


def test_reference_errors_surface_before_any_conversion(capsys, tmp_path: Path, fixture_image) -> None:
    (tmp_path / "images").mkdir()
    doc = app_document(fixture_image("busybox-sh").reference, tmp_path / "images")
    doc["services"][1]["env"] = {"TOKEN": "$$SCONE::api_token$$"}  # the second service names an unknown secret
    path = _write(tmp_path, doc)
    run = run_cli(capsys, "-q", "app", str(path), "--policy-out", str(tmp_path / "policy"))
    assert run.code == 2, run.stderr
    assert "services/1 (client)" in run.stderr and "api_token" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "policy").exists() and not list((tmp_path / "images").iterdir())


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UsageError, match="line"):
        load_app(bad)
    with pytest.raises(UsageError, match="does not exist"):
        load_app(tmp_path / "missing.yaml")


def test_check_prints_the_peer_graph(capsys, tmp_path: Path) -> None:
    path = _write(tmp_path, app_document("oci:/nowhere:latest", tmp_path / "images"))
    run = run_cli(capsys, "app", str(path), "--check", "--json")
    assert run.code == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["services"] == [{"name": "server", "accepts": ["client"], "connects": []},
                                {"name": "client", "accepts": [], "connects": ["server"]}]
