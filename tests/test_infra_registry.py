"""The registry fixtures work with the real tools: skopeo pushes and pulls, auth is enforced, the token
issuer signs what distribution accepts and refuses what it should."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from infra.docker_config import DockerConfig
from infra.images import skopeo
from infra.registry import Registry, RegistryStartError, parse_challenge, start_registry
from infra.token_issuer import Scope, TokenIssuer, User

pytestmark = pytest.mark.registry

FLAVOURS = ["registry", "registry_basic", "registry_token"]


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwt_parts(token: str) -> tuple[dict, dict, bytes, bytes]:
    header, claims, signature = token.split(".")
    return (
        json.loads(_b64url_decode(header)),
        json.loads(_b64url_decode(claims)),
        f"{header}.{claims}".encode(),
        _b64url_decode(signature),
    )


def _push(reg: Registry, image: str, repository: str, tag: str = "v1", creds: str | None = "default",
          ) -> subprocess.CompletedProcess:
    args = ["copy", "--dest-tls-verify=false"]
    creds = reg.creds() if creds == "default" else creds
    if creds:
        args += ["--dest-creds", creds]
    return skopeo(*args, image, reg.ref(repository, tag), check=False)


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses (hex, as the kernel shows them) listening on TCP ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_registry_listens_on_loopback_only(request: pytest.FixtureRequest, flavour: str) -> None:
    reg: Registry = request.getfixturevalue(flavour)
    host, port = reg.host.split(":")
    assert host == "127.0.0.1"
    assert _listening_addresses(int(port)) == {"0100007F"}  # 127.0.0.1, little-endian hex
    if reg.issuer is not None:
        issuer_port = int(reg.issuer.realm.split(":")[2].split("/")[0])
        assert _listening_addresses(issuer_port) == {"0100007F"}


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_skopeo_pushes_and_the_registry_lists_it(
    request: pytest.FixtureRequest, flavour: str, busybox_image: str, repository_name: str
) -> None:
    reg: Registry = request.getfixturevalue(flavour)
    pushed = _push(reg, busybox_image, repository_name)
    assert pushed.returncode == 0, pushed.stderr

    assert repository_name in reg.repositories()
    assert reg.tags(repository_name) == ["v1"]
    manifest = reg.manifest(repository_name, "v1")
    assert manifest.status_code == 200
    assert manifest.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(manifest.content).hexdigest()

    # skopeo, reading back with the same credentials, sees the very same manifest bytes.
    args = ["inspect", "--raw", "--tls-verify=false"]
    creds = reg.creds()
    if creds:
        args += ["--creds", creds]
    raw = subprocess.run(["skopeo", *args, reg.ref(repository_name, "v1")], capture_output=True, timeout=60)
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == manifest.content


@pytest.mark.parametrize("flavour", ["registry_basic", "registry_token"])
def test_anonymous_push_is_refused(
    request: pytest.FixtureRequest, flavour: str, busybox_image: str, repository_name: str
) -> None:
    reg: Registry = request.getfixturevalue(flavour)
    refused = _push(reg, busybox_image, repository_name, creds=None)
    assert refused.returncode != 0
    # Basic auth says "unauthorized"; an anonymous token with no rights gets "access ... is denied".
    assert any(word in refused.stderr.lower() for word in ("unauthorized", "authentication required", "denied"))
    assert repository_name not in reg.repositories()


@pytest.mark.parametrize("flavour", ["registry_basic", "registry_token"])
def test_wrong_password_is_refused(
    request: pytest.FixtureRequest, flavour: str, busybox_image: str, repository_name: str
) -> None:
    reg: Registry = request.getfixturevalue(flavour)
    refused = _push(reg, busybox_image, repository_name, creds=f"{reg.username}:not-{reg.password}")
    assert refused.returncode != 0
    assert repository_name not in reg.repositories()


def test_auth_registries_challenge_anonymous_clients(registry: Registry, registry_basic: Registry,
                                                     registry_token: Registry) -> None:
    assert requests.get(registry.url + "/v2/", timeout=5).status_code == 200
    basic = requests.get(registry_basic.url + "/v2/", timeout=5)
    assert basic.status_code == 401
    assert parse_challenge(basic.headers["WWW-Authenticate"])[0] == "basic"
    token = requests.get(registry_token.url + "/v2/", timeout=5)
    assert token.status_code == 401
    scheme, params = parse_challenge(token.headers["WWW-Authenticate"])
    assert registry_token.issuer is not None
    assert (scheme, params["realm"], params["service"]) == (
        "bearer", registry_token.issuer.realm, registry_token.issuer.service)


def test_registry_deletes_are_enabled(registry: Registry, busybox_image: str, repository_name: str) -> None:
    assert _push(registry, busybox_image, repository_name).returncode == 0
    digest = registry.manifest(repository_name, "v1").headers["Docker-Content-Digest"]
    deleted = requests.delete(f"{registry.url}/v2/{repository_name}/manifests/{digest}", timeout=10)
    assert deleted.status_code == 202
    assert registry.manifest(repository_name, "v1").status_code == 404
    assert registry.tags(repository_name) == []


def _token(issuer: TokenIssuer, scope: str, auth: tuple[str, str] | None) -> requests.Response:
    return requests.get(issuer.realm, params={"service": issuer.service, "scope": scope}, auth=auth, timeout=5)


def test_token_issuer_refuses_wrong_credentials(registry_token: Registry) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    for auth in [(registry_token.username or "", "wrong"), ("nobody", registry_token.password or "")]:
        resp = _token(issuer, "repository:x/y:pull,push", auth)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].lower().startswith("basic")
        assert "token" not in resp.json()


def test_token_issuer_grants_the_requested_scope_in_a_verifiable_jwt(registry_token: Registry) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    assert registry_token.username and registry_token.password
    resp = _token(issuer, "repository:team/app:pull,push", (registry_token.username, registry_token.password))
    assert resp.status_code == 200
    header, claims, signed, signature = _jwt_parts(resp.json()["token"])

    assert header["alg"] == "ES256"
    groups = header["kid"].split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    assert (claims["iss"], claims["sub"], claims["aud"]) == (issuer.issuer, registry_token.username, issuer.service)
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["jti"]

    # The signature verifies with the key of the certificate the registry trusts.
    cert = x509.load_pem_x509_certificate(issuer.certificate_path.read_bytes())
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key.verify(der, signed + b"x", ec.ECDSA(hashes.SHA256()))


def test_token_issuer_gives_anonymous_clients_no_rights(registry_token: Registry) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    resp = _token(issuer, "repository:team/app:pull,push", None)
    assert resp.status_code == 200
    assert _jwt_parts(resp.json()["token"])[1]["access"] == []


def test_registry_rejects_a_token_whose_kid_names_no_trusted_key(registry_token: Registry) -> None:
    issuer = registry_token.issuer
    assert issuer is not None
    token, _ = issuer.issue(registry_token.username, [Scope("registry", "catalog", ("*",))])
    assert requests.get(registry_token.url + "/v2/_catalog", headers={"Authorization": f"Bearer {token}"},
                        timeout=5).status_code == 200
    # Same key, same claims, another kid: distribution finds no key and refuses the token.
    header, claims, _, _ = _jwt_parts(token)
    forged = issuer._sign({**header, "kid": "AAAA:" + header["kid"][5:]}, claims)
    assert requests.get(registry_token.url + "/v2/_catalog", headers={"Authorization": f"Bearer {forged}"},
                        timeout=5).status_code == 401


def test_token_scope_limits_a_pull_only_user(tmp_path: Path, busybox_image: str) -> None:
    reg = start_registry(tmp_path / "reg", auth="token", users={"reader": User("reader-pw", frozenset({"pull"}))})
    try:
        assert _push(reg, busybox_image, "shared/app").returncode == 0
        refused = _push(reg, busybox_image, "shared/app", tag="v2", creds="reader:reader-pw")
        assert refused.returncode != 0
        assert reg.tags("shared/app") == ["v1"]
        pulled = skopeo("copy", "--src-tls-verify=false", "--src-creds", "reader:reader-pw",
                        reg.ref("shared/app", "v1"), f"oci:{tmp_path / 'pulled'}:v1", check=False)
        assert pulled.returncode == 0, pulled.stderr
        assert reg.issuer is not None
        reader_requests = [r for r in reg.issuer.requests if r.account == "reader"]
        assert reader_requests and all("push" not in s.actions for r in reader_requests for s in r.granted)
    finally:
        reg.stop()
    assert not reg.alive()


def test_docker_config_holds_credentials_skopeo_accepts(docker_config: DockerConfig, registry_basic: Registry,
                                                          registry_token: Registry, busybox_image: str,
                                                          repository_name: str) -> None:
    assert os.environ["DOCKER_CONFIG"] == str(docker_config.dir)
    assert stat.S_IMODE(docker_config.path.stat().st_mode) == 0o600
    auths = json.loads(docker_config.path.read_text())["auths"]
    for reg in (registry_basic, registry_token):
        user, _, password = base64.b64decode(auths[reg.host]["auth"]).decode().partition(":")
        assert (user, password) == (reg.username, reg.password)
        pushed = skopeo("copy", "--dest-tls-verify=false", "--authfile", str(docker_config.path),
                        busybox_image, reg.ref(repository_name, "cfg"), check=False)
        assert pushed.returncode == 0, pushed.stderr
        assert reg.tags(repository_name) == ["cfg"]


def test_registry_start_failure_shows_the_log_tail(tmp_path: Path) -> None:
    # A storage driver the registry does not know: it exits at once and says why in its log.
    with pytest.raises(RegistryStartError) as err:
        start_registry(tmp_path / "reg", overrides={"storage": {"nosuchdriver": {}}})
    assert "nosuchdriver" in str(err.value)
