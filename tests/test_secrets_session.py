"""Secrets, TLS certificates and encrypted volumes in the session: each ``sconify convert`` option produces the
session language's ``secrets``, ``images[].injection_files``, ``volumes`` and ``images[].volumes`` (checked
against the JSON Schema of docs/session.md), PVCs in the chart, and bad options end with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_convert_support import (
    Keys,
    keys,  # noqa: F401 (fixture)
    real_runtime,
    run_cli,
)

from sconify.build.runtime import RUNTIME_ENV
from sconify.errors import UsageError
from sconify.policy.secrets import (
    ServiceSecrets,
    check_service_secrets,
    parse_secret,
    parse_service_secrets,
    parse_tls,
    parse_volume,
)
from sconify.policy.session_schema import session_errors


@pytest.fixture(autouse=True)
def runtime_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if not real_runtime():
        monkeypatch.setenv(RUNTIME_ENV, "/usr/bin/busybox")
    empty = tmp_path / "docker-config"
    empty.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(empty))


def _session(spec: ServiceSecrets, service: str = "api") -> dict:
    """A minimal one-service session carrying ``spec`` (as convert builds it)."""
    return {
        "name": "app",
        "version": "0.3.10",
        "services": [{"name": service, "image_name": f"{service}-image", "mrenclaves": ["ab" * 32],
                      "command": "/bin/true", "environment": {}, "pwd": "/"}],
        "images": [{"name": f"{service}-image", "injection_files": spec.injection_files(service),
                    "volumes": spec.image_volumes()}],
        "volumes": spec.session_volumes(),
        "secrets": spec.session_secrets(service),
    }


# -- each option on its own ------------------------------------------------------------------------------------


def test_tls_server_declares_a_key_a_server_certificate_from_the_ca_and_injects_both() -> None:
    spec = parse_service_secrets(tls_server=["/etc/tls/server.crt,/etc/tls/server.key,san=dns:api,san=dns:api.local"])
    secrets = {s["name"]: s for s in spec.session_secrets("api")}
    assert secrets["ca"]["kind"] == "x509-ca"
    assert secrets["api_server_key"] == {"name": "api_server_key", "kind": "private-key"}
    cert = secrets["api_server"]
    assert cert["kind"] == "x509" and cert["endpoint"] == "server"
    assert cert["issuer"] == "ca" and cert["private_key"] == "api_server_key"
    assert cert["dns"] == ["api", "api.local"]
    assert spec.injection_files("api") == [
        {"path": "/etc/tls/server.crt", "content": "$$SCONE::api_server.crt$$"},
        {"path": "/etc/tls/server.key", "content": "$$SCONE::api_server.key$$"},
    ]
    assert session_errors(_session(spec)) == []


def test_tls_client_and_tls_ca() -> None:
    spec = parse_service_secrets(tls_client=["/tls/client.crt,/tls/client.key"], tls_ca=["/tls/ca.crt"])
    secrets = {s["name"]: s for s in spec.session_secrets("web")}
    assert secrets["web_client"]["endpoint"] == "client"
    assert "dns" not in secrets["web_client"]
    files = {f["path"]: f["content"] for f in spec.injection_files("web")}
    assert files == {
        "/tls/client.crt": "$$SCONE::web_client.crt$$",
        "/tls/client.key": "$$SCONE::web_client.key$$",
        "/tls/ca.crt": "$$SCONE::ca.crt$$",
    }
    assert session_errors(_session(spec, "web")) == []


def test_volume_is_a_name_in_the_session_and_a_mount_in_the_image_without_a_key() -> None:
    spec = parse_service_secrets(volumes=["data:/var/lib/data", "logs:/var/log/app"])
    assert spec.session_volumes() == [{"name": "data"}, {"name": "logs"}]
    assert spec.image_volumes() == [{"name": "data", "path": "/var/lib/data"}, {"name": "logs", "path": "/var/log/app"}]
    session = _session(spec)
    assert session_errors(session) == []
    session["volumes"][0]["fspf_key"] = "00" * 32  # a key chosen outside the CAS is not what sconify emits
    assert any("volumes/0" in e for e in session_errors(session))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pw=ascii", {"name": "pw", "kind": "ascii", "size": 32}),
        ("pw=ascii:size=24", {"name": "pw", "kind": "ascii", "size": 24}),
        ("token=binary:size=16", {"name": "token", "kind": "binary", "size": 16}),
        ("k=private-key", {"name": "k", "kind": "private-key"}),
        ("myca=x509-ca:common_name=My CA", {"name": "myca", "kind": "x509-ca", "common_name": "My CA"}),
        (
            "c=x509:private_key=k,issuer=myca,dns=a.example;b.example,endpoint=server",
            {"name": "c", "kind": "x509", "private_key": "k", "issuer": "myca", "dns": ["a.example", "b.example"],
             "endpoint": "server"},
        ),
    ],
)
def test_secret_kinds_and_parameters(text: str, expected: dict) -> None:
    assert parse_secret(text).to_json() == expected


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (lambda: parse_secret("pw=password"), ("pw", "not a secret kind")),
        (lambda: parse_secret("pw"), ("NAME=KIND",)),
        (lambda: parse_secret("1pw=ascii"), ("not a secret name",)),
        (lambda: parse_secret("pw=ascii:size=0"), ("size",)),
        (lambda: parse_secret("pw=ascii:size=99999"), ("size",)),
        (lambda: parse_secret("pw=ascii:dns=x"), ("takes no parameter 'dns'",)),
        (lambda: parse_secret("c=x509:endpoint=peer"), ("server or client",)),
        (lambda: parse_secret("pw=ascii:size=3,size=4"), ("twice",)),
        (lambda: parse_tls("/only-one", "server"), ("PATH_CERT,PATH_KEY",)),
        (lambda: parse_tls("relative.crt,/k", "server"), ("absolute",)),
        (lambda: parse_tls("/a,/a", "server"), ("same path",)),
        (lambda: parse_tls("/a,/b,san=ip:1.2.3.4", "server"), ("san=dns:NAME",)),
        (lambda: parse_tls("/a,/b,san=dns:x", "client"), ("client certificate",)),
        (lambda: parse_tls("/.sconify/x,/b", "server"), ("cannot hold a file",)),
        (lambda: parse_volume("data"), ("NAME:/path",)),
        (lambda: parse_volume("Data:/data"), ("volume name",)),
        (lambda: parse_volume("data:data"), ("absolute",)),
        (lambda: parse_service_secrets(tls_server=["/a,/b", "/c,/d"]), ("once",)),
    ],
)
def test_bad_options_are_one_line_usage_errors(kind, words: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as info:
        kind()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_references_are_checked_against_declared_secrets() -> None:
    spec = parse_service_secrets(secrets=["pw=ascii", "k=private-key"], tls_server=["/s.crt,/s.key"])
    check_service_secrets(spec, "api", [("PW", "$$SCONE::pw$$"), ("K", "$$SCONE::k.key$$"),
                                        ("CERT", "$$SCONE::api_server.crt:base64$$"), ("PLAIN", "x")])
    for env, word in [
        ("$$SCONE::nope$$", "not declared"),
        ("$$SCONE::pw.crt$$", "no part .crt"),
        ("$$SCONE::api_server$$", "needs a part"),
        ("$$SCONE::pw:rot13$$", "not a secret reference"),
    ]:
        with pytest.raises(UsageError, match="--env X") as info:
            check_service_secrets(spec, "api", [("X", env)])
        assert word in str(info.value)
    bad = parse_service_secrets(secrets=["c=x509:issuer=nosuchca"])
    with pytest.raises(UsageError, match="not a declared x509-ca"):
        check_service_secrets(bad, "api", [])
    twice = parse_service_secrets(secrets=["pw=ascii", "pw=binary"])
    with pytest.raises(UsageError, match="declared twice"):
        check_service_secrets(twice, "api", [])
    inside = parse_service_secrets(tls_ca=["/data/ca.crt"], volumes=["data:/data"])
    with pytest.raises(UsageError, match="inside the volume"):
        check_service_secrets(inside, "api", [])


# -- through sconify convert -----------------------------------------------------------------------------------


def _convert(capsys, fixture_image, tmp_path: Path, keys: Keys, *extra: str):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    run = run_cli(
        capsys, "-q", "convert", fixture_image("busybox-sh").reference, f"oci:{work / 'out'}:latest",
        "--policy-out", str(work / "policy"), "--fspf-key", str(keys.fspf), "--enclave-key", str(keys.enclave),
        "--name", "shop", "--service", "api", *extra,
    )
    return run, work


def test_convert_writes_secrets_tls_files_volumes_and_pvcs(capsys, fixture_image, keys: Keys, tmp_path: Path) -> None:  # noqa: F811
    run, work = _convert(
        capsys, fixture_image, tmp_path, keys,
        "--tls-server", "/etc/tls/api.crt,/etc/tls/api.key,san=dns:api",
        "--tls-ca", "/etc/tls/ca.crt",
        "--volume", "data:/var/lib/api",
        "--secret", "db_password=ascii:size=24",
        "--env", "DB_PASSWORD=$$SCONE::db_password$$",
        "--json",
    )
    assert run.code == 0, run.stderr
    session = yaml.safe_load((work / "policy" / "session.yml").read_text())
    assert session_errors(session) == []
    kinds = {s["name"]: s["kind"] for s in session["secrets"]}
    assert kinds == {"ca": "x509-ca", "api_server_key": "private-key", "api_server": "x509", "db_password": "ascii"}
    image = session["images"][0]
    assert session["services"][0]["image_name"] == image["name"]
    assert {f["path"] for f in image["injection_files"]} == {"/etc/tls/api.crt", "/etc/tls/api.key", "/etc/tls/ca.crt"}
    assert image["volumes"] == [{"name": "data", "path": "/var/lib/api"}]
    assert session["volumes"] == [{"name": "data"}]
    assert session["services"][0]["environment"]["DB_PASSWORD"] == "$$SCONE::db_password$$"
    values = yaml.safe_load((work / "policy" / "chart" / "values.yaml").read_text())
    assert values["volumes"] == [{"name": "data", "mountPath": "/var/lib/api", "size": "1Gi"}]
    pvc = (work / "policy" / "chart" / "templates" / "pvc.yaml").read_text()
    assert "PersistentVolumeClaim" in pvc
    report = json.loads((work / "policy" / "report.json").read_text())
    assert report["declared"]["volumes"] == [{"name": "data", "path": "/var/lib/api"}]
    assert "db_password" in report["declared"]["secrets"]
    # The reference stays a reference: no generated value and no variable of the policy leaks into the image.
    config_blobs = [p.read_bytes() for p in (work / "out" / "blobs" / "sha256").iterdir() if p.stat().st_size < 65536]
    assert not any(b"DB_PASSWORD" in blob for blob in config_blobs)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--env", "X=$$SCONE::missing$$"), ("missing", "not declared")),
        (("--secret", "pw=ascii:size=big"), ("size",)),
        (("--tls-server", "server.crt"), ("--tls-server",)),
        (("--volume", "x:/a", "--volume", "x:/b"), ("given twice",)),
    ],
)
def test_convert_refuses_bad_options_with_one_line_and_writes_nothing(
    capsys, fixture_image, keys: Keys, tmp_path: Path, args: tuple[str, ...], words: tuple[str, ...]  # noqa: F811
) -> None:
    run, work = _convert(capsys, fixture_image, tmp_path, keys, *args)
    assert run.code == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sconify: error: ")
    for word in words:
        assert word in lines[0]
    assert list(work.iterdir()) == []
